"""A job's life behind the endpoint (issue #12 items 4-7): its processes die with it, at once; time and
concurrency limits; stalled and silent streams; the sweep and other processes sharing the work dir.

``dirtest`` (tests/http_fixtures.py) stands in for a job whose child process runs a long time without
an event (``sleep_s``: a child in its own session, as ffmpeg is) or floods events (``spam``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.http_fixtures import API_KEY, DIRTEST_JOB, http, kill_processes_mentioning, serve_app, serve_process

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(autouse=True)
def dirtest(monkeypatch):
    from synapse_cli.jobs import JOBS

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)


def slow_job(ep, sleep_s: float = 30.0, **spec) -> tuple[httpx.Client, httpx.Response, Iterator[str]]:
    """Open a dirtest stream whose job sleeps ``sleep_s`` in a child; returns once ``started`` arrived
    (with the rest of the stream's lines, as an iterator)."""
    client = httpx.Client(timeout=60)
    body = {"spec": json.dumps({"input": "a.txt", "output_dir": "out", "sleep_s": sleep_s, **spec})}
    r = client.send(client.build_request("POST", f"{ep.url}/v1/jobs/dirtest", data=body, files=[("input", ("a.txt", b"hello"))], headers=AUTH), stream=True)
    assert r.status_code == 200, r.read()
    lines = r.iter_lines()
    assert json.loads(next(lines))["type"] == "started"
    return client, r, lines


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def sleepers(text: str) -> list[int]:
    """pids of live (not zombie) processes whose command line mentions ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode("utf-8", "replace") and " Z " not in (entry / "stat").read_text():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# -- item 6: a job's processes die with it, at once ---------------------------------------------


def test_a_client_that_disconnects_kills_the_jobs_process_at_once(tmp_path):
    """The job is silent for 30 s (a child sleeping): closing the stream kills the child now, not in 30 s."""
    with serve_app(tmp_path / "srv") as ep:
        client, r, _ = slow_job(ep)
        job_dir = ep.work_dir / "jobs" / r.headers["x-synapse-job"]
        assert wait_for(lambda: sleepers(str(job_dir)), 5)
        r.close()
        client.close()
        closed = time.monotonic()
        assert wait_for(lambda: not sleepers(str(job_dir)), 5), "the job's child outlived the disconnect"
        assert time.monotonic() - closed < 3
        assert wait_for(lambda: not job_dir.exists(), 5)


def test_sigterm_stops_the_jobs_processes_before_the_server_exits(tmp_path):
    """`synapse serve` with a job encoding (real ffmpeg, a long `sample`): SIGTERM, and when the server
    has exited no ffmpeg of its work dir is left; the client's stream ends with an error line."""
    work = tmp_path / "srv"
    lines: list[str] = []
    with serve_process(work) as (url, server, _):
        def run() -> None:
            spec = {"output": "s.mp4", "seconds": 300, "width": 1920, "height": 1080}
            with http.stream("POST", f"{url}/v1/jobs/sample", json=spec, headers=AUTH, timeout=60) as r:
                lines.extend(r.iter_lines())

        client = threading.Thread(target=run)
        client.start()
        assert wait_for(lambda: any(".part" in p.name for p in work.rglob("*")), 20)
        assert sleepers(str(work))  # ffmpeg is encoding
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
        survivors = kill_processes_mentioning(str(work))
        client.join(timeout=10)
    assert survivors == [], "ffmpeg outlived the server"
    last = json.loads(lines[-1])
    assert last["type"] == "error" and "shutting down" in last["message"] and last["code"] == 3


# -- item 4: concurrency and time limits --------------------------------------------------------


def test_jobs_past_max_concurrent_jobs_get_429_with_retry_after(tmp_path):
    with serve_app(tmp_path / "srv", max_concurrent_jobs=1) as ep:
        client, r, lines = slow_job(ep, sleep_s=3.0)
        second = http.post(f"{ep.url}/v1/jobs/sample", json={"output": "s.mp4", "seconds": 0.1, "width": 32, "height": 32}, headers=AUTH)
        assert second.status_code == 429 and second.headers["retry-after"] and "serve.max_concurrent_jobs" in second.json()["message"]
        assert json.loads(list(lines)[-1])["type"] == "finished"
        r.close()
        client.close()
        third = http.post(f"{ep.url}/v1/jobs/sample", json={"output": "s.mp4", "seconds": 0.1, "width": 32, "height": 32}, headers=AUTH)
        assert third.status_code == 200


def test_a_job_past_job_timeout_s_is_stopped_and_removed(tmp_path):
    with serve_app(tmp_path / "srv", job_timeout_s=1.0) as ep:
        started = time.monotonic()
        client, r, lines = slow_job(ep, sleep_s=60)
        job_dir = ep.work_dir / "jobs" / r.headers["x-synapse-job"]
        last = json.loads(list(lines)[-1])
        client.close()
        assert last["type"] == "error" and "serve.job_timeout_s" in last["message"] and last["code"] == 1
        assert time.monotonic() - started < 6
        assert wait_for(lambda: not sleepers(str(job_dir)), 3)
        assert wait_for(lambda: not job_dir.exists(), 5)


# -- item 5: stalled and silent streams ---------------------------------------------------------


def test_a_client_that_stops_reading_cannot_hold_a_job(tmp_path):
    """The job floods 200 MB of events; the client sends its request and never reads: past
    stall_timeout_s the job is cancelled and its folder removed."""
    with serve_app(tmp_path / "srv", stall_timeout_s=1.0) as ep:
        host, port = ep.url.removeprefix("http://").split(":")
        request = httpx.Request("POST", f"{ep.url}/v1/jobs/dirtest", data={"spec": json.dumps({"input": "a.txt", "output_dir": "out", "spam": 200_000})},
                                files=[("input", ("a.txt", b"hello"))], headers=AUTH)
        body = request.read()
        with socket.create_connection((host, int(port))) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"POST /v1/jobs/dirtest HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                      f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert wait_for(lambda: ep.job_dirs() != [], 5)
            assert wait_for(lambda: ep.job_dirs() == [], 30), "a stalled client held its job"


def test_a_silent_job_sends_keepalive_lines_and_the_client_waits_it_out(tmp_path):
    """A job silent for 3 s, a client whose read timeout is 1 s: blank keep-alive lines every 0.2 s
    keep the stream alive, and the real client (HttpBackend) skips them. (The timeout leaves a loaded
    machine 5 keep-alive periods of slack; the job stays silent for three timeouts.)"""
    from synapse_cli.backends.http import HttpBackend
    from synapse_cli.events import Finished
    from tests.http_fixtures import TestDirSpec

    with serve_app(tmp_path / "srv", keepalive_s=0.2) as ep:
        with http.stream("POST", f"{ep.url}/v1/jobs/dirtest", data={"spec": json.dumps({"input": "a.txt", "output_dir": "o", "sleep_s": 3.0})},
                         files=[("input", ("a.txt", b"hello"))], headers=AUTH, timeout=1.0) as r:
            lines = list(r.iter_lines())
        assert lines.count("") >= 6 and json.loads(lines[-1])["type"] == "finished"
        (tmp_path / "in.txt").write_text("hello")
        backend = HttpBackend(ep.url, API_KEY, timeout_s=1.0, max_retries=0)
        events = list(backend.run("dirtest", TestDirSpec(input=str(tmp_path / "in.txt"), output_dir=str(tmp_path / "out"), sleep_s=3.0)))
        backend.close()
        assert isinstance(events[-1], Finished) and (tmp_path / "out" / "head.txt").read_text() == "hello"


# -- item 7: the sweep and other processes -----------------------------------------------------


def test_the_sweep_spares_another_processs_running_job_and_removes_a_dead_ones(tmp_path):
    """Two servers share a work dir; B expires outputs at once (ttl 0). A's job, running longer than
    that, survives B's sweep; a folder whose heartbeat stopped (its process died) is removed."""
    work = tmp_path / "shared"
    with serve_app(work) as a, serve_app(work, artifact_ttl_s=0) as b:
        client, r, _ = slow_job(a, sleep_s=30.0)
        job_dir = a.work_dir / "jobs" / r.headers["x-synapse-job"]
        dead = work / "jobs" / "deadjobdeadjobdeadjob0"
        (dead / "out").mkdir(parents=True)
        (dead / ".alive").touch()
        old = time.time() - 600
        os.utime(dead / ".alive", (old, old))
        os.utime(job_dir, (old, old))  # the folder itself looks old: only the heartbeat tells
        time.sleep(0.05)
        spec = {"output": "s.mp4", "seconds": 0.1, "width": 32, "height": 32, "audio": False}
        assert http.post(f"{b.url}/v1/jobs/sample", json=spec, headers=AUTH).status_code == 200  # B sweeps
        assert job_dir.exists() and not (job_dir / ".done").exists() and not dead.exists()
        assert sleepers(str(job_dir))  # A's job is still running
        r.close()
        client.close()


def test_a_sample_spec_out_of_range_ends_with_a_usage_error_naming_the_field_not_a_traceback(tmp_path, caplog):
    """Found by schemathesis (issue 27): seconds=-1e308 with fps=60 made make_sample raise OverflowError
    (a traceback in the server's log). A spec sent over HTTP skips the command's checks: the job checks."""
    cases = [({"seconds": -1.7e308, "fps": 60}, "seconds"), ({"seconds": 0}, "seconds"), ({"seconds": float("nan")}, "seconds"),
             ({"width": 15}, "width"), ({"height": -2}, "height"), ({"fps": 0}, "fps")]
    with serve_app(tmp_path / "srv") as ep, httpx.Client(base_url=ep.url, headers=AUTH, timeout=30) as client:
        for fields, name in cases:
            body = json.dumps({"output": "s.mp4", "audio": False, **fields})  # NaN as JSON's NaN, which Python's json reads
            r = client.post("/v1/jobs/sample", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            last = json.loads([line for line in r.text.splitlines() if line.strip()][-1])
            assert last["type"] == "error" and last["code"] == 2 and last["message"].startswith(f"{name} must be"), (fields, last)
    assert not [rec for rec in caplog.records if rec.exc_info], [rec.getMessage() for rec in caplog.records if rec.exc_info]


def test_a_work_dir_removed_under_the_server_is_a_503_not_a_500(tmp_path):
    """Seen while fuzzing (issue 27): with its jobs folder gone, every submit was a 500 with a traceback
    (shutil.disk_usage raised outside the route's error handling)."""
    import shutil

    with serve_app(tmp_path / "srv", min_free_mb=0) as ep:
        shutil.rmtree(ep.work_dir / "jobs")
        r = http.post(f"{ep.url}/v1/jobs/sample", json={"output": "s.mp4", "seconds": 0.1, "width": 32, "height": 32, "audio": False}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"] == "BackendError" and "work dir is unavailable" in r.json()["message"]
        assert r.headers["retry-after"] == "60"
