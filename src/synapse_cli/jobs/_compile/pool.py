"""Worker processes for engine work, each request bounded by a timeout.

A thread cannot be stopped, and xgrammar or outlines-core can spend minutes on a hard
schema inside native code, so every engine call runs in a worker process; a request
that outlives its timeout gets its worker killed and replaced. Workers live for the
whole run, so each imports its engines once.

A *task* is a generator that yields requests (tuples) and receives the responses:
``("ok", value)``, ``("fail", message)`` or ``("timeout", message)``. Its return value
is the task's result, yielded by ``WorkerPool.run`` with the task's key.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Generator, Iterable, Iterator

Task = Generator[tuple, tuple, Any]


def _worker_main(conn: Connection, quiet: bool) -> None:
    if quiet:  # engines print to stdout/stderr from native code; stdout carries NDJSON
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    else:
        os.dup2(2, 1)
    from synapse_cli.jobs._compile import engines

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        op, args = request[0], request[1:]
        try:
            if op == "compile":
                response: tuple = ("ok", engines.compile_artefact(*args))
            elif op == "check":
                response = ("ok", engines.check_artefact(*args))
            else:
                response = ("fail", f"unknown request {op!r}")
        except engines.EngineFailure as exc:
            response = ("fail", str(exc))
        except KeyboardInterrupt:
            return
        except BaseException as exc:  # pyo3 PanicException derives from BaseException
            response = ("fail", engines._one_line(f"{type(exc).__name__}: {exc}"))
        try:
            conn.send(response)
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, ctx: Any, quiet: bool) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, quiet), daemon=True, name="synapse-compile-worker")
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        finally:
            self.conn.close()


class WorkerPool:
    """``run(tasks)`` drives task generators over ``size`` processes; ``close()`` kills them."""

    def __init__(self, size: int, timeout_s: float, quiet: bool | None = None) -> None:
        self.size = max(1, size)
        self.timeout_s = timeout_s
        self.quiet = (os.environ.get("SYNAPSE_TRACEBACK") != "1") if quiet is None else quiet
        self.ctx = mp.get_context("spawn")
        self.idle: list[_Worker] = []
        self.all: list[_Worker] = []

    def _get(self) -> _Worker:
        if self.idle:
            return self.idle.pop()
        w = _Worker(self.ctx, self.quiet)
        self.all.append(w)
        return w

    def _drop(self, w: _Worker) -> None:
        w.kill()
        if w in self.all:
            self.all.remove(w)

    def run(self, tasks: Iterable[tuple[Any, Task]]) -> Iterator[tuple[Any, Any]]:
        pending = deque(tasks)
        busy: dict[Connection, tuple[_Worker, Any, Task, float]] = {}

        def advance(key: Any, task: Task, response: tuple | None, worker: _Worker | None) -> Any:
            """Feed ``response`` to the task; send its next request to a worker, or return its result."""
            try:
                request = next(task) if response is None else task.send(response)
            except StopIteration as stop:
                if worker is not None:
                    self.idle.append(worker)
                return stop
            w = worker or self._get()
            try:
                w.conn.send(request)
            except (OSError, ValueError):  # the worker died between requests
                self._drop(w)
                w = self._get()
                w.conn.send(request)
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
                w, key, task, _ = busy.pop(conn)  # type: ignore[index]
                try:
                    response = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    code = w.proc.exitcode
                    self._drop(w)
                    response, w = ("fail", f"engine crashed (worker exit code {code})"), None
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
