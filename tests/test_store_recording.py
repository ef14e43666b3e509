"""Recording is best-effort: a job store that fails mid-run costs a warning, never the job."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import make_clip, paced_ffmpeg, probe, synapse_cmd

SMALL = ["--set", "output_width=90", "--set", "output_height=160"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", size="160x90", seconds=8)


@pytest.mark.slow
def test_a_store_locked_mid_run_does_not_stop_the_export(tmp_path, clip, monkeypatch):
    db = tmp_path / "jobs.sqlite3"
    monkeypatch.setenv("SYNAPSE_JOBS_DB", str(db))
    monkeypatch.setenv("SYNAPSE_FFMPEG", str(paced_ffmpeg(tmp_path / "ffmpeg")))  # the job is still running when the lock is taken
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen([*synapse_cmd(), "export", str(clip), "-o", str(out), "--json", *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locker = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until the job is encoding and has written progress
            try:
                conn = sqlite3.connect(db)
                row = conn.execute("SELECT done FROM jobs WHERE status = 'processing'").fetchone()
                conn.close()
            except sqlite3.Error:
                row = None
            if row and row[0]:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("the job never recorded progress")
        locker = sqlite3.connect(db, isolation_level=None, timeout=30)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the store's write lock from now until the job ends
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        if locker is not None:
            locker.close()
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert events[-1]["type"] == "finished" and events[-1]["result"]["output"] == str(out)
    warnings = [e for e in events if e["type"] == "log" and e.get("level") == "warning"]
    assert len(warnings) == 1 and "could not record" in warnings[0]["message"] and "locked" in warnings[0]["message"]
    assert probe(out).width == 90  # the output is there and whole


def _row(tmp_path):
    from synapse_cli.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.create("export", {}, "http", status="processing")
    return store, job


def test_one_recorder_a_failure_after_the_result_keeps_it_and_progress_is_coalesced(tmp_path):
    """The Recorder every path uses: progress written at most every flush_s (the row's progress is the
    newest), ``finished`` held until the stream ends, an ``error`` after it ends the job ``failed`` with the
    result kept (events.Outcome), and the state written with the last events."""
    from synapse_cli.events import Failed, Finished, Progress, Started
    from synapse_cli.store.recording import Recorder

    store, job = _row(tmp_path)
    rec = Recorder(store, job.id, flush_s=3600)
    rec.event(Started(job="compile", total=3))
    assert [e["type"] for _, e in store.events(job.id)] == ["started"] and store.get(job.id).total == 3
    rec.event(Progress(1, 3))
    rec.event(Progress(2, 3, phase="lower"))
    assert store.get(job.id).done == 0  # coalesced: not yet written
    rec.event(Finished(result={"output_dir": "out"}))
    assert [e["type"] for _, e in store.events(job.id)] == ["started"]  # held: written with the final state
    rec.event(Failed(1, "1 of 3 inputs failed", "JobError"))
    row = store.get(job.id)
    assert (row.status, row.result, row.error_code, row.error_message) == ("failed", {"output_dir": "out"}, 1, "1 of 3 inputs failed")
    assert (row.done, row.phase) == (2, "lower")
    assert [e["type"] for _, e in store.events(job.id)] == ["started", "progress", "progress", "finished", "error"]
    rec.event(Progress(3, 3))
    rec.end()
    assert len(store.events(job.id)) == 5  # nothing follows the job's last event


def test_a_keepalive_writes_what_waited_for_the_next_event_but_never_a_held_finished(tmp_path):
    """An endpoint's keep-alive line (``tick``): a quiet job's buffered progress reaches the store once
    ``flush_s`` has gone by, not only at its next event; its ``finished`` still waits for the end."""
    from synapse_cli.events import Finished, Progress, Started
    from synapse_cli.store.recording import Recorder

    store, job = _row(tmp_path)
    rec = Recorder(store, job.id, flush_s=3600)
    rec.event(Started(job="export", total=4))
    rec.event(Progress(1, 4))
    rec.tick()
    assert [e["type"] for _, e in store.events(job.id)] == ["started"] and store.get(job.id).done == 0  # flush_s not gone by
    rec.flush_s = 0.0  # (as if an hour had passed)
    rec.tick()
    assert [e["type"] for _, e in store.events(job.id)] == ["started", "progress"] and store.get(job.id).done == 1
    rec.tick()
    assert len(store.events(job.id)) == 2  # nothing new: nothing written twice
    rec.event(Finished(result={"output": "o.mp4"}))
    rec.tick()
    assert [e["type"] for _, e in store.events(job.id)] == ["started", "progress"] and store.get(job.id).status == "processing"
    rec.end()
    assert [e["type"] for _, e in store.events(job.id)] == ["started", "progress", "finished"] and store.get(job.id).status == "completed"


def test_the_recorder_skips_rows_and_deliveries_already_there(tmp_path):
    """Two followers of one endpoint job (``written``: the server's event i is row i + 1) write each row
    once; an endpoint's whole list of deliveries is kept once, however often it is reported."""
    from synapse_cli.events import Deliveries, Finished, Log, Started
    from synapse_cli.store.recording import Recorder

    store, job = _row(tmp_path)
    first, second = Recorder(store, job.id, written=0), Recorder(store, job.id, written=0)
    first.event(Started(job="export"))
    second.event(Started(job="export"))
    first.event(Log("a"))
    second.event(Log("a"))
    second.event(Log("b"))
    assert [e.get("message") for _, e in store.events(job.id)] == [None, "a", "b"]
    second.event(Finished(result={"output": "o.mp4"}))
    second.end()
    assert store.get(job.id).status == "completed"
    hooks = [{"event": "started", "webhook_id": "msg_1", "target": "https://h.example/x", "outcome": "delivered", "attempts": 1,
              "http_status": 204, "detail": None, "at": "2026-12-07T05:00:00.000Z"}]
    first.deliveries(hooks, whole=True)
    first.event(Deliveries(hooks + [{**hooks[0], "event": "finished", "webhook_id": "msg_2", "outcome": "failed", "http_status": 503}]))
    first.deliveries(hooks, whole=True)
    got = store.deliveries(job.id)
    assert [(d["event"], d["outcome"]) for d in got] == [("started", "delivered"), ("finished", "failed")]
    assert got[0]["at"] == 1796619600.0 and got[0]["target"] == "https://h.example/x"
