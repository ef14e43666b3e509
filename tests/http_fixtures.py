"""Real servers on loopback ports for the HTTP tests: uvicorn in a thread, or `synapse serve` as a process.

httpx's ASGITransport buffers the whole response body (encode/httpx#3059), so it cannot
show events arriving while the job runs; a real server can (httpx's own tests/conftest.py
runs uvicorn in a thread the same way).

Also: ``TestDirSpec``/``copy_into_dir``, a tiny job kind with a directory output, which the
tests register in ``synapse_cli.jobs.JOBS`` (the registry is the extension point) to cover
what export cannot: directory outputs and a job that fails with a JobError.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Iterator, NamedTuple

API_KEY = "test-key-3f9c2a7e5b1d"


@functools.cache
def tls_context() -> Any:
    """httpx's default SSL context (``verify=True``), built once."""
    import httpx

    return httpx.create_ssl_context()


def _fresh(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        import httpx

        kwargs.setdefault("verify", tls_context())
        return getattr(httpx, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


http = SimpleNamespace(**{name: _fresh(name) for name in ("request", "stream", "get", "head", "options", "post", "put", "patch", "delete")})
"""httpx's functions (``http.get(url, ...)`` as ``httpx.get(url, ...)``: a client of its own per call, so no connection
or cookie outlives the call) that pass every client the one ``tls_context()``. httpx would build an SSL context for each,
loading the CA bundle: ~45 ms of CPU per request to a loopback server that never uses TLS, seconds for a test that polls."""


@dataclass
class Endpoint:
    url: str
    work_dir: Path
    key: str | None

    def job_dirs(self) -> list[Path]:
        jobs = self.work_dir / "jobs"
        return sorted(jobs.iterdir()) if jobs.is_dir() else []


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> until the block ends; yields the base URL."""
    import uvicorn

    from synapse_cli.cli.serve import _bind

    sock = _bind("127.0.0.1", 0)  # as synapse serve binds (a TCP socket: asyncio turns Nagle's algorithm off)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serve_app(work_dir: Path, key: str | None = API_KEY, **kwargs: Any) -> Iterator[Endpoint]:
    from synapse_cli.server import create_app

    app = create_app(work_dir=work_dir, api_key=key, allow_anonymous=key is None, **kwargs)
    with uvicorn_thread(app) as url:
        yield Endpoint(url, work_dir, key)


START_TIMEOUT_S = 60  # the first start on a busy two-core machine imports FastAPI, uvicorn and the job kinds
LOG_TAIL = 40


class Served(NamedTuple):
    """What ``serve_process`` yields."""

    url: str
    process: subprocess.Popen
    log: list[str]  # the server's stderr lines so far; a thread appends to it while the server runs


@contextmanager
def serve_process(work: Path, *, key: str | None = API_KEY, env: dict[str, str] | None = None, stop_timeout_s: float = 30) -> Iterator[Served]:
    """``synapse serve --port 0 --work-dir work`` as a process of its own session, until the block ends.

    ``key`` is its SYNAPSE_API_KEY (None: unset, so the server makes one and prints it after the
    ``listening on`` line); ``env`` goes over this process's environment. A thread reads stderr into
    ``log`` from the start, so the pipe never fills, and the log's tail is printed at the end, where
    pytest shows it for a failed test. At the end a server still running gets SIGTERM (its graceful
    stop, which stops its jobs), then SIGKILL after ``stop_timeout_s``; then the processes mentioning
    ``work/jobs`` are killed (ffmpeg runs in a session of its own: a killed server leaves it running).
    A test may signal or kill ``process`` itself; what it left is then only waited for and reaped."""
    from tests.conftest import synapse_cmd

    environ = {name: value for name, value in os.environ.items() if name != "SYNAPSE_API_KEY"}
    if key is not None:
        environ["SYNAPSE_API_KEY"] = key
    environ.update(env or {})
    process = subprocess.Popen([*synapse_cmd(), "serve", "--port", "0", "--work-dir", str(work)],
                               stderr=subprocess.PIPE, text=True, env=environ, start_new_session=True)  # fmt: skip
    log: list[str] = []
    listening = threading.Event()

    def drain() -> None:
        for line in process.stderr:
            log.append(line)
            if "listening on " in line:
                listening.set()
        listening.set()  # end of stderr: the server exited, listening or not

    reader = threading.Thread(target=drain, name=f"serve-stderr-{process.pid}", daemon=True)
    reader.start()
    try:
        listening.wait(START_TIMEOUT_S)
        line = next((line for line in log if "listening on " in line), None)
        assert line is not None, f"synapse serve did not start (exit status {process.poll()}):\n" + "".join(log)
        yield Served(line.split("listening on ")[1].split()[0], process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        kill_processes_mentioning(str(work / "jobs"))
        reader.join(timeout=5)
        if not reader.is_alive():
            process.stderr.close()
        print(f"-- synapse serve --work-dir {work}: exit status {process.returncode}; the last {LOG_TAIL} lines of its stderr --")
        print("".join(log[-LOG_TAIL:]), end="")


@contextmanager
def paused(process: Any) -> Iterator[Any]:
    """SIGSTOP ``process`` (a job's ffmpeg, a ``psutil.Process``) for the block, SIGCONT after: a job that
    stays mid-way for as long as a test needs, however fast or loaded the machine, at no CPU cost. One that
    ended meanwhile is fine: a cancel or a stopping server SIGKILLs it, which a stopped process obeys."""
    import psutil

    process.suspend()
    try:
        yield process
    finally:
        try:
            process.resume()
        except psutil.NoSuchProcess:
            pass


def server_ffmpeg(served: "Served", job_id: str) -> Any:
    """The live ffmpeg of job ``job_id`` on ``served`` (a ``psutil.Process``: in a session of its own, still the
    server's child, its command line naming the job's folder), or None while there is none."""
    import psutil

    for child in psutil.Process(served.process.pid).children(recursive=True):
        try:
            if "ffmpeg" in child.name() and child.status() != psutil.STATUS_ZOMBIE and f"/jobs/{job_id}/" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def job_ffmpeg(job_dir: Path, timeout_s: float = 30) -> Any:
    """The job's ffmpeg (a ``psutil.Process``: the live ffmpeg whose command line names ``job_dir``) once it
    runs; AssertionError after ``timeout_s``."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        for process in psutil.process_iter(["name", "cmdline", "status"]):
            info = process.info
            if "ffmpeg" in (info["name"] or "") and info["status"] != psutil.STATUS_ZOMBIE and str(job_dir) in " ".join(info["cmdline"] or ()):
                return process
        assert time.monotonic() < deadline, f"no ffmpeg of {job_dir} within {timeout_s} s"
        time.sleep(0.02)


def kill_processes_mentioning(text: str) -> list[int]:
    """SIGKILL the processes whose command line contains ``text`` (a test's own tmp path): orphans of a killed server."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


# -- a test job kind with a directory output ------------------------------------------


@dataclass
class TestDirSpec:
    input: str
    output_dir: str
    fail: bool = False
    overwrite: bool = False
    sleep_s: float = 0.0  # first wait this long in a child process (started with its own session, like ffmpeg)
    spam: int = 0  # then yield this many 1 KB log events

    INPUTS: ClassVar[tuple[str, ...]] = ("input",)
    OUTPUTS: ClassVar[tuple[str, ...]] = ("output_dir",)
    __test__ = False  # not a pytest class


def copy_into_dir(spec: TestDirSpec) -> Iterator[Any]:
    """Writes ``output_dir/head.txt`` (the input's first bytes) and ``output_dir/sub/size.txt``.

    The input may be a folder: its files are read in sorted order, as one."""
    from synapse_cli.errors import JobError
    from synapse_cli.events import Artifact, Finished, Log, Progress, Started

    yield Started(job="dirtest", total=2)
    if spec.sleep_s:
        import subprocess
        import sys

        # the output path in its command line: tests find it with kill_processes_mentioning(job dir)
        subprocess.run([sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", str(spec.sleep_s), spec.output_dir], start_new_session=True)
    for i in range(spec.spam):
        yield Log(f"{i:08d} " + "x" * 1024)
    src = Path(spec.input)
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    data = b"".join(p.read_bytes() for p in files)
    if spec.fail:
        raise JobError(f"cannot use {spec.input}: told to fail")
    out = Path(spec.output_dir)
    (out / "sub").mkdir(parents=True, exist_ok=True)
    (out / "head.txt").write_bytes(data[:16])
    yield Progress(done=1, total=2)
    (out / "sub" / "size.txt").write_text(str(len(data)))
    yield Progress(done=2, total=2)
    yield Artifact(path=str(out), bytes=16 + len(str(len(data))))
    names = [str(p) for p in files] if src.is_dir() else []
    yield Finished(result={"input": spec.input, "output_dir": str(out), "files": 2, **({"read": names} if names else {})})


def _dirtest_kind() -> object:
    from synapse_cli.jobs import JobKind

    return JobKind(name="dirtest", spec="tests.http_fixtures:TestDirSpec", run="tests.http_fixtures:copy_into_dir")


DIRTEST_JOB = _dirtest_kind()
