"""Reaping: a job is failed only when its worker is gone, never while its local process lives."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synapse_cli.store import PENDING_GRACE_S, STALE_AFTER_S, JobStore


@pytest.fixture
def store(db):
    s = JobStore(db)
    yield s
    s.close()


def sql(db: Path, statement: str, *args) -> None:
    conn = sqlite3.connect(db)
    conn.execute(statement, args)
    conn.commit()
    conn.close()


def exited_pid() -> int:
    """The pid of a real process that has exited (and been waited for)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_live_local_job_with_a_stale_heartbeat_is_not_reaped_and_keeps_its_result(store, db):
    job, _ = store.claim_or_find("export", {"src": "a.mp4"}, "local", None)  # this process is its worker, and lives
    sql(db, "UPDATE jobs SET heartbeat_at = ?", time.time() - 10 * STALE_AFTER_S)  # a long lock, a suspended laptop
    assert store.reap() == []
    assert store.get(job.id).status == "processing"
    store.finish(job.id, "completed", result={"output": "o.mp4"})
    assert store.get(job.id).status == "completed" and store.get(job.id).result == {"output": "o.mp4"}


def test_another_hosts_job_is_reaped_only_once_its_heartbeat_is_stale(store, db):
    fresh, _ = store.claim_or_find("export", {}, "local", None)
    stale, _ = store.claim_or_find("export", {}, "local", None)
    sql(db, "UPDATE jobs SET host = 'elsewhere'")
    sql(db, "UPDATE jobs SET heartbeat_at = ? WHERE id = ?", time.time() - STALE_AFTER_S - 1, stale.id)
    assert store.reap() == [stale.id]
    assert store.get(fresh.id).status == "processing" and store.get(stale.id).status == "failed"
    store.finish(stale.id, "completed", result={"output": "late.mp4"})  # it was alive after all: its result is kept
    assert store.get(stale.id).status == "completed" and store.get(stale.id).result == {"output": "late.mp4"}


def test_a_gone_or_reused_local_pid_is_reaped_at_once(store, db):
    gone, _ = store.claim_or_find("export", {}, "local", None)
    reused, _ = store.claim_or_find("export", {}, "local", None)
    sql(db, "UPDATE jobs SET pid = ? WHERE id = ?", exited_pid(), gone.id)
    sql(db, "UPDATE jobs SET pid_start = pid_start - 1 WHERE id = ?", reused.id)  # our pid, but not the process that started the job
    assert sorted(store.reap()) == sorted([gone.id, reused.id])


def test_pending_rows_whose_worker_never_started_are_reaped(store, db):
    dead_worker = store.create("export", {}, "local", detached=True)
    store.set_pid(dead_worker.id, exited_pid())  # the worker was started, and died before it took the job
    creating = store.create("export", {}, "local", detached=True)  # this process is still starting it
    lost_old = store.create("export", {}, "local", detached=True)
    lost_new = store.create("export", {}, "local", detached=True)
    sql(db, "UPDATE jobs SET host = 'elsewhere', pid = NULL WHERE id IN (?, ?)", lost_old.id, lost_new.id)
    sql(db, "UPDATE jobs SET created_at = ? WHERE id = ?", time.time() - PENDING_GRACE_S - 1, lost_old.id)
    assert sorted(store.reap()) == sorted([dead_worker.id, lost_old.id])
    statuses = {j.id: j.status for j in store.list()}
    assert statuses[creating.id] == statuses[lost_new.id] == "pending"
    assert "never started" in store.get(dead_worker.id).error_message


def test_a_worker_whose_job_was_reaped_first_does_not_run_it(store, db):
    job = store.create("export", {}, "local", detached=True)
    store.finish(job.id, "failed", error_code=1, error_message="reaped")
    assert store.start(job.id) is False and store.get(job.id).status == "failed"


def test_heartbeat_survives_a_locked_store_and_keeps_beating(store, db):
    from synapse_cli.store.recording import _Heartbeat

    job, _ = store.claim_or_find("export", {}, "local", None)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the heartbeat's timeout
    beat = _Heartbeat(db, job.id, busy_s=0.1, every_s=0.05)
    try:
        deadline = time.monotonic() + 10
        while beat.errors < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat.errors >= 3 and beat.beats == 0
        locker.execute("ROLLBACK")
        released = time.time()
        while beat.beats == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat.beats > 0 and beat._thread.is_alive()
        assert store.get(job.id).heartbeat_at >= released
    finally:
        beat.stop()
        locker.close()


def test_cancel_never_signals_a_reused_pid(cli, store, db):
    job = store.create("export", {}, "local", detached=True)
    # a real worker takes the job (recording its pid and start time), then dies
    subprocess.run([sys.executable, "-c", f"from synapse_cli.store import JobStore; JobStore({str(db)!r}).start({job.id!r})"], check=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        sql(db, "UPDATE jobs SET pid = ? WHERE id = ?", bystander.pid, job.id)  # the OS handed its pid to another process
        cli("jobs", "cancel", job.id)
        time.sleep(0.2)
        assert bystander.poll() is None, "jobs cancel signalled a process that is not the job's worker"
        assert store.get(job.id).status in ("failed", "cancelled")
    finally:
        bystander.kill()
        bystander.wait()
