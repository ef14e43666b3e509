"""The sweep of an idle server: ``synapse serve`` expires outputs (``serve.artifact_ttl_s``) and prunes
old detached jobs (``serve.keep_jobs_days``) on a timer of its own, every ``min(60 s, artifact_ttl_s)``,
without waiting for the next job to be submitted.

Each test runs ``synapse serve`` as a process on loopback with a TTL of a second or two, submits what
it needs, and then only reads (GETs never sweep): what disappears, the timer removed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time


from tests.http_fixtures import API_KEY, http, serve_process
from tests.test_serve_detached import TINY, listed, record, status_of, submit, ts, wait_status
from tests.test_serve_jobs import wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TTL_S = 2.0  # long enough to download an output right after its job, short enough to watch it go


def expired_folder(work, name: str = "deadjobdeadjobdeadjob0"):
    """A finished job's folder whose outputs expired an hour ago (its ``.done`` says when it ended)."""
    folder = work / "jobs" / name
    (folder / "out").mkdir(parents=True)
    (folder / "out" / "s.mp4").write_bytes(b"x")
    (folder / ".done").touch()
    old = time.time() - 3600
    os.utime(folder / ".done", (old, old))
    return folder


def test_an_idle_server_expires_outputs_artifact_ttl_s_after_their_job(tmp_path):
    """A streamed job and a detached one; then no request but GETs. Both folders go within a sweep of
    the TTL; the streamed output answers 404, the detached one 410 (its record stays, without artifacts)."""
    work = tmp_path / "srv"
    with serve_process(work, env={"SYNAPSE_SERVE_ARTIFACT_TTL_S": str(TTL_S)}) as (url, server, _):
        with http.stream("POST", f"{url}/v1/jobs/sample", json=TINY, headers=AUTH, timeout=60) as r:
            streamed_id = r.headers["x-synapse-job"]
            events = [json.loads(line) for line in r.iter_lines() if line]
        streamed = next(e["path"] for e in events if e["type"] == "artifact")
        assert events[-1]["type"] == "finished" and http.get(url + streamed, headers=AUTH).status_code == 200
        detached_id = submit(url)  # the last request that can sweep
        rec = wait_status(url, detached_id, ("completed",))
        detached = rec["artifacts"][0]["url"]
        assert http.get(url + detached, headers=AUTH).status_code == 200
        folders = [work / "jobs" / streamed_id, work / "jobs" / detached_id]
        assert all(f.is_dir() for f in folders)
        assert wait_for(lambda: not any(f.exists() for f in folders), TTL_S + 10), "the idle server kept expired outputs"
        assert time.time() - ts(rec["finished_at"]) > TTL_S  # not before their time
        r = http.get(url + streamed, headers=AUTH)
        assert r.status_code == 404 and r.json()["type"] == "error"
        r = http.get(url + detached, headers=AUTH)
        assert r.status_code == 410 and "expired" in r.json()["message"]
        after = record(url, detached_id)
        assert after["status"] == "completed" and after["artifacts"] == [] and after["result"] == rec["result"]
        assert server.poll() is None


def test_an_idle_server_prunes_detached_jobs_that_ended_keep_jobs_days_ago(tmp_path):
    keep_s = 2.0
    env = {"SYNAPSE_SERVE_ARTIFACT_TTL_S": "1", "SYNAPSE_SERVE_KEEP_JOBS_DAYS": str(keep_s / 86400)}
    with serve_process(tmp_path / "srv", env=env) as (url, server, _):
        job_id = submit(url)
        rec = wait_status(url, job_id, ("completed",))
        assert listed(url) == {job_id}
        assert wait_for(lambda: job_id not in listed(url), keep_s + 10), "the idle server kept a job past keep_jobs_days"
        assert time.time() - ts(rec["finished_at"]) > keep_s
        assert status_of(url, job_id) == 404
        assert http.get(f"{url}/v1/jobs/{job_id}/events", headers=AUTH).status_code == 404
        assert not (tmp_path / "srv" / "jobs" / job_id).exists()


def test_a_sweep_that_fails_is_one_warning_line_and_the_timer_goes_on(tmp_path):
    """The jobs folder vanishes (moved away) under an idle server: each sweep meanwhile is one line on
    stderr, no traceback; once it is back, the next sweep removes an expired folder as usual."""
    work = tmp_path / "srv"
    with serve_process(work, env={"SYNAPSE_SERVE_ARTIFACT_TTL_S": "1"}) as (url, server, log):
        (work / "jobs").rename(work / "away")
        assert wait_for(lambda: any("sweep" in line and "failed" in line for line in log), 10), "no warning for a failed sweep"
        (work / "away").rename(work / "jobs")
        folder = expired_folder(work)
        assert wait_for(lambda: not folder.exists(), 10), "the timer stopped after a failed sweep"
        assert server.poll() is None and http.get(f"{url}/v1/health", timeout=10).status_code == 200
        failures = [line for line in log if "sweep" in line and "failed" in line]
        assert all("FileNotFoundError" in line and "/jobs" in line for line in failures), failures
        assert "Traceback" not in "".join(log)


def test_sigterm_stops_a_server_whose_sweep_timer_runs_at_once(tmp_path):
    """The timer is running (it removed an expired folder while the server was idle); SIGTERM ends the
    server within a second or two, its lifespan shut down cleanly, no traceback."""
    work = tmp_path / "srv"
    with serve_process(work, env={"SYNAPSE_SERVE_ARTIFACT_TTL_S": "1"}) as (url, server, log):
        folder = expired_folder(work)
        assert wait_for(lambda: not folder.exists(), 10), "no sweep while idle"
        expired_folder(work, "deadjobdeadjobdeadjob1")  # for the sweep due while it stops
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert server.wait(10) == 0
        took = time.monotonic() - signalled
    assert took < 3, f"the server took {took:.1f} s to stop"
    text = "".join(log)
    assert "Application shutdown complete" in text and "Traceback" not in text and "Error" not in text


def test_a_locked_job_store_is_one_warning_line_and_does_not_hold_up_the_stop(tmp_path):
    """Another process holds jobs.db's write lock: each sweep's prune gives up after a second with one
    line (no traceback), the rest of the sweep goes on (an expired folder goes), and SIGTERM meanwhile
    stops the server at once, not when the store's 30 s busy timeout runs out."""
    work = tmp_path / "srv"
    with serve_process(work, env={"SYNAPSE_SERVE_ARTIFACT_TTL_S": "1"}) as (url, server, log):
        db = sqlite3.connect(work / "jobs.db", isolation_level=None, timeout=10)
        db.execute("BEGIN EXCLUSIVE")
        try:
            assert wait_for(lambda: any("cannot prune" in line for line in log), 10), "no warning for a locked store"
            folder = expired_folder(work)
            assert wait_for(lambda: not folder.exists(), 10), "a locked store stopped the sweep"
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert server.wait(15) == 0
            took = time.monotonic() - signalled
        finally:
            db.close()
    assert took < 3, f"the server took {took:.1f} s to stop"
    warnings = [line for line in log if "cannot prune" in line]
    assert all("database is locked" in line and "next sweep" in line for line in warnings), warnings
    assert "Traceback" not in "".join(log)
