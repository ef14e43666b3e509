"""The compile job's engine workers: forked by one fork server per process, killed on timeout, replaced.

Real engines in real processes; the requests are the job's own (``compile``, ``check``).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from synapse_cli.jobs.compile import pool as pool_mod
from synapse_cli.jobs.compile.pool import WorkerPool

pytest.importorskip("llguidance")
psutil = pytest.importorskip("psutil")


def _compile(pattern: str):
    """A task: compile one regex for llguidance; its result is the worker's answer and the worker's pid."""
    response = yield ("compile", "llguidance", "regex", pattern, [])
    return response


def _fork_server() -> psutil.Process:
    [zygote] = [z for z in pool_mod._ZYGOTES.values()]
    return psutil.Process(zygote.proc.pid)


def _children_become(server: psutil.Process, pids: list[int]) -> list[int]:
    """The fork server's children once they are ``pids`` (a killed worker takes a moment to go), or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        now = sorted(p.pid for p in server.children() if p.status() != psutil.STATUS_ZOMBIE)
        if now == sorted(pids) or time.monotonic() > deadline:
            return now
        time.sleep(0.02)


def test_workers_are_forked_by_one_fork_server_that_outlives_the_pool():
    with WorkerPool(2, timeout_s=30, warm=("llguidance",)) as pool:
        results = dict(pool.run((i, _compile(f"a{i}+")) for i in range(4)))
        server = _fork_server()
        assert _children_become(server, [w.pid for w in pool.all]) == sorted(w.pid for w in pool.all)
        assert len(pool.all) == 2
    assert [results[i][0] for i in range(4)] == ["ok"] * 4
    assert all(f"a{i}+" in results[i][1]["artefact"] for i in range(4))
    assert server.ppid() == os.getpid()
    # the next job in this process forks from the same server: its imports are not paid again
    with WorkerPool(1, timeout_s=30, warm=("llguidance",)) as pool:
        assert dict(pool.run([(0, _compile("b+"))]))[0][0] == "ok"
    assert _fork_server().pid == server.pid


def test_a_request_past_its_timeout_gets_a_new_worker_and_the_next_task_runs():
    pytest.importorskip("outlines_core")

    def slow():  # outlines-core's index of any object: about 9 s on these machines
        return (yield ("compile", "outlines", "json_schema", {"type": "object"}, ["type"]))

    with WorkerPool(1, timeout_s=0.5, warm=("outlines", "llguidance")) as pool:
        results = dict(pool.run([("slow", slow()), ("fast", _compile("c+"))]))
        # the slow one's worker was killed: the fork server has one child left, the replacement
        assert _children_become(_fork_server(), [w.pid for w in pool.all]) == [w.pid for w in pool.all]
    assert results["slow"] == ("timeout", "timed out after 0.5s")
    assert results["fast"][0] == "ok"


def test_a_dead_fork_server_is_started_again():
    with WorkerPool(1, timeout_s=30, warm=("llguidance",)) as pool:
        assert dict(pool.run([(0, _compile("d+"))]))[0][0] == "ok"
    old = _fork_server()
    old.send_signal(signal.SIGKILL)
    old.wait(5)
    with WorkerPool(1, timeout_s=30, warm=("llguidance",)) as pool:
        assert dict(pool.run([(0, _compile("e+"))]))[0][0] == "ok"
    assert _fork_server().pid != old.pid


def test_a_worker_that_dies_mid_request_is_reported_and_replaced():
    pytest.importorskip("outlines_core")

    def crash():  # outlines-core's index of any object: seconds of work, during which the worker is killed
        return (yield ("compile", "outlines", "json_schema", {"type": "object"}, ["type"]))

    with WorkerPool(1, timeout_s=30, warm=("llguidance",)) as pool:
        assert dict(pool.run([(0, _compile("f+"))]))[0][0] == "ok"
        [worker] = pool.all
        process = psutil.Process(worker.pid)
        idle = sum(process.cpu_times()[:2])

        def kill_mid_request() -> None:  # SIGKILL, as the OOM killer would, once the worker is working on the request
            deadline = time.monotonic() + 20
            while sum(process.cpu_times()[:2]) < idle + 0.2 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(worker.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_mid_request)
        killer.start()  # (killed while idle, it was a race: a dead worker found at send time is replaced, not reported)
        results = dict(pool.run([("crash", crash()), ("next", _compile("g+"))]))
        killer.join()
    assert results["crash"] == ("fail", "engine crashed (its worker process died)")
    assert results["next"][0] == "ok"
