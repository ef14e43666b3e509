"""Worker processes for engine work, each request bounded by a timeout.

A thread cannot be stopped, and xgrammar or outlines-core can spend minutes on a hard
schema inside native code, so every engine call runs in a worker process; a request
that outlives its timeout gets its worker killed and replaced. Workers live for the
whole run.

Workers are forked by a fork server (``_Zygote``): one ``python -m`` process per
synapse process that imports the engines' modules once and forks a worker per
request. xgrammar's import alone takes seconds of CPU (it loads torch and
transformers); a forked worker starts in milliseconds, so a pool of N workers, a
worker replaced after a timeout and the next job in the same process (``synapse
serve``, the Python API) pay that import once, not each time. The fork server only
imports: engine objects (tokenizers, compilers, their threads) are made in each
worker, after the fork. Where a process cannot pass descriptors (no ``fork`` or
``socket.send_fds``), or the fork server cannot be started, each worker is a
``python -m`` process of its own, as before.

A *task* is a generator that yields requests (tuples) and receives the responses:
``("ok", value)``, ``("fail", message)`` or ``("timeout", message)``. Its return value
is the task's result, yielded by ``WorkerPool.run`` with the task's key.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Generator, Iterable, Iterator

Task = Generator[tuple, tuple, Any]


def _worker_main(conn_in: Connection, conn_out: Connection) -> None:
    from synapse_cli.errors import one_line
    from synapse_cli.jobs.compile import engines

    while True:
        try:
            request = conn_in.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        op, args = request[0], request[1:]
        try:
            if op == "warm":  # imports are paid here, outside any request's timeout
                for engine in args[0]:
                    try:
                        engines._warm(engine)
                    except BaseException as exc:  # reported by the compile request itself
                        if isinstance(exc, KeyboardInterrupt):
                            return
                response: tuple = ("ok", None)
            elif op == "compile":
                response = ("ok", engines.compile_artefact(*args))
            elif op == "check":
                response = ("ok", engines.check_artefact(*args))
            else:
                response = ("fail", f"unknown request {op!r}")
        except engines.EngineFailure as exc:
            response = ("fail", str(exc))
        except KeyboardInterrupt:
            return
        except BaseException as exc:  # pyo3 PanicException derives from BaseException
            response = ("fail", one_line(f"{type(exc).__name__}: {exc}", engines.ERROR_CHARS))
        try:
            conn_out.send(response)
        except (OSError, ValueError):
            return


def _quiet_stdio(quiet: bool) -> None:
    """Engines print from native code: stdout becomes stderr (or nothing, when quiet), stdin /dev/null."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull if quiet else 2, 1)
    if quiet:
        os.dup2(devnull, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us


def _child() -> None:
    """Entry point of a worker: requests on stdin, responses on the original stdout (a copy kept for the protocol)."""
    rfd, wfd = os.dup(0), os.dup(1)
    _quiet_stdio("--quiet" in sys.argv)
    _worker_main(Connection(rfd, writable=False), Connection(wfd, readable=False))


def _zygote_main(fd: int) -> None:
    """Entry point of the fork server: each message on ``fd`` lists engines to import, then asks
    for a worker; the answer is the worker's pid and our end of a socket pair to it."""
    _quiet_stdio("--quiet" in sys.argv)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our workers
    from synapse_cli.jobs.compile import engines

    ctl = socket.socket(fileno=fd)
    while True:
        try:
            msg = ctl.recv(4096)
        except OSError:
            return
        if not msg:  # the synapse process is gone
            return
        for engine in json.loads(msg):
            engines.preload(engine)
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                ctl.close()
                ours.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                conn = Connection(theirs.detach())
                _worker_main(conn, conn)
            finally:
                os._exit(0)
        theirs.close()
        try:
            socket.send_fds(ctl, [str(pid).encode()], [ours.fileno()])
        except OSError:
            return
        finally:
            ours.close()


def _child_env() -> tuple[dict[str, str], str]:
    """The environment of a worker or fork server: this checkout's package first on the path."""
    import synapse_cli

    env = dict(os.environ)
    src = str(Path(synapse_cli.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env, src


class _Worker:
    """A ``python -m`` subprocess (not multiprocessing: that re-runs the caller's ``__main__``)."""

    def __init__(self, quiet: bool) -> None:
        env, _ = _child_env()
        cmd = [sys.executable, "-m", "synapse_cli.jobs.compile.pool"] + (["--quiet"] if quiet else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.tx = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.conn = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()

    def send(self, request: tuple) -> None:
        self.tx.send(request)

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.tx.close()
            self.conn.close()


class _ForkedWorker:
    """A worker forked by the fork server: the same interface as ``_Worker``, over one socket."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.conn = self.tx = Connection(fd)
        try:  # signals go to this process, never to a later one that got its pid
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def send(self, request: tuple) -> None:
        self.tx.send(request)

    @property
    def exitcode(self) -> int | None:
        return None  # the fork server's child: its status is the kernel's to reap

    def kill(self) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        finally:
            self.conn.close()
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None


FORK_TIMEOUT_S = 120.0  # for a fork server's answer: its first imports included, as WorkerPool's warm_timeout_s


class _Zygote:
    """The fork server process: ``fork(engines)`` imports them there (once) and returns a new worker."""

    def __init__(self, quiet: bool) -> None:
        env, src = _child_env()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "synapse_cli.jobs.compile.pool", "--zygote", str(theirs.fileno())]
        if quiet:
            cmd.append("--quiet")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, cwd=src, close_fds=True,
                                         pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        ours.settimeout(FORK_TIMEOUT_S)  # a fork server stuck importing is given up (then a worker of its own)
        self.sock = ours
        self.lock = threading.Lock()

    def fork(self, engines: tuple[str, ...]) -> _ForkedWorker:
        with self.lock:
            self.sock.sendall(json.dumps(list(engines)).encode())
            msg, fds, _, _ = socket.recv_fds(self.sock, 64, 1)
        if not fds:
            raise OSError("the engine fork server is gone")
        os.set_inheritable(fds[0], False)
        return _ForkedWorker(int(msg), fds[0])

    def close(self) -> None:
        self.sock.close()  # it exits at end of file
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_ZYGOTES: dict[bool, _Zygote] = {}
_ZYGOTES_LOCK = threading.Lock()


def _forked(quiet: bool, engines: tuple[str, ...]) -> _ForkedWorker | None:
    """A worker from this process's fork server (started on first use, restarted once if it died);
    None where there is no fork server to be had."""
    if not (hasattr(os, "fork") and hasattr(socket, "send_fds")):
        return None
    for _ in range(2):
        with _ZYGOTES_LOCK:
            zygote = _ZYGOTES.get(quiet)
            if zygote is None or zygote.proc.poll() is not None:
                try:
                    zygote = _ZYGOTES[quiet] = _Zygote(quiet)
                except OSError:
                    return None
        try:
            return zygote.fork(engines)
        except (OSError, ValueError):
            with _ZYGOTES_LOCK:
                if _ZYGOTES.get(quiet) is zygote:
                    del _ZYGOTES[quiet]
            zygote.close()
    return None


@atexit.register
def _close_zygotes() -> None:
    with _ZYGOTES_LOCK:
        zygotes = list(_ZYGOTES.values())
        _ZYGOTES.clear()
    for zygote in zygotes:
        zygote.close()


class WorkerPool:
    """``run(tasks)`` drives task generators over ``size`` processes; ``close()`` kills them."""

    def __init__(self, size: int, timeout_s: float, quiet: bool | None = None, warm: tuple[str, ...] = (),
                 warm_timeout_s: float = 120.0) -> None:
        self.size = max(1, size)
        self.timeout_s = timeout_s
        self.warm = tuple(warm)
        self.warm_timeout_s = warm_timeout_s
        self.quiet = (os.environ.get("SYNAPSE_TRACEBACK") != "1") if quiet is None else quiet
        self.idle: list[_Worker | _ForkedWorker] = []
        self.all: list[_Worker | _ForkedWorker] = []

    def _start(self, n: int) -> None:
        """Start ``n`` workers and wait until each has imported the engines (in parallel)."""
        new = [_forked(self.quiet, self.warm) or _Worker(self.quiet) for _ in range(n)]
        for w in new:
            if self.warm:
                w.send(("warm", self.warm))
        deadline = time.monotonic() + self.warm_timeout_s
        for w in new:
            if self.warm:
                try:
                    ok = w.conn.poll(max(0.0, deadline - time.monotonic())) and w.conn.recv()
                except (EOFError, OSError):
                    ok = False
                if not ok:  # it could not even import: requests to it fail and are reported
                    pass
            self.all.append(w)
            self.idle.append(w)

    def _get(self) -> _Worker | _ForkedWorker:
        if not self.idle:
            self._start(1)
        return self.idle.pop()

    def _drop(self, w: _Worker | _ForkedWorker) -> None:
        w.kill()
        if w in self.all:
            self.all.remove(w)

    def run(self, tasks: Iterable[tuple[Any, Task]]) -> Iterator[tuple[Any, Any]]:
        pending = deque(tasks)
        self._start(max(0, min(self.size, len(pending)) - len(self.all)))
        busy: dict[Connection, tuple[_Worker | _ForkedWorker, Any, Task, float]] = {}

        def advance(key: Any, task: Task, response: tuple | None, worker: _Worker | _ForkedWorker | None) -> Any:
            """Feed ``response`` to the task; send its next request to a worker, or return its result."""
            try:
                request = next(task) if response is None else task.send(response)
            except StopIteration as stop:
                if worker is not None:
                    self.idle.append(worker)
                return stop
            w = worker or self._get()
            try:
                w.send(request)
            except (OSError, ValueError):  # the worker died between requests
                self._drop(w)
                w = self._get()
                w.send(request)
            busy[w.conn] = (w, key, task, time.monotonic() + self.timeout_s)
            return None

        while pending or busy:
            while pending and len(busy) < self.size:
                key, task = pending.popleft()
                done = advance(key, task, None, None)
                if done is not None:
                    yield key, done.value
            if not busy:
                continue
            now = time.monotonic()
            wait_s = max(0.0, min(deadline for *_, deadline in busy.values()) - now)
            ready = wait(list(busy), timeout=wait_s)
            for conn in ready:
                w, key, task, _ = busy.pop(conn)  # type: ignore[call-overload]  # (wait() returns the connections it was given)
                response: tuple[Any, ...] | None
                try:
                    response = conn.recv()  # type: ignore[union-attr,call-arg,assignment]  # (a multiprocessing Connection)
                except (EOFError, OSError):
                    code = w.exitcode
                    self._drop(w)
                    died = "its worker process died" if code is None else f"worker exit code {code}"
                    response, w = ("fail", f"engine crashed ({died})"), None
                done = advance(key, task, response, w)
                if done is not None:
                    yield key, done.value
            now = time.monotonic()
            for conn, (w, key, task, deadline) in list(busy.items()):
                if deadline <= now and conn not in ready:
                    del busy[conn]
                    self._drop(w)
                    done = advance(key, task, ("timeout", f"timed out after {self.timeout_s:g}s"), None)
                    if done is not None:
                        yield key, done.value

    def close(self) -> None:
        for w in list(self.all):
            self._drop(w)
        self.idle.clear()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    if "--zygote" in sys.argv:
        _zygote_main(int(sys.argv[sys.argv.index("--zygote") + 1]))
    else:
        _child()
