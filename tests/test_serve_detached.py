"""Detached jobs over HTTP (issue #15, the server side): ``POST /v1/jobs/{kind}?detach=true`` and
``GET/DELETE /v1/jobs/{id}``, ``/v1/jobs/{id}/events`` (NDJSON and SSE), ``GET /v1/jobs``.

Every test talks to a real server on loopback: the app under uvicorn in a thread (``serve_app``), or
``synapse serve`` as a process where the test kills and restarts it. Jobs are real: ``sample`` runs
ffmpeg; ``dirtest`` (tests/http_fixtures.py) gives an exact number of events and a silent child."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.http_fixtures import API_KEY, DIRTEST_JOB, Endpoint, http, job_ffmpeg, kill_processes_mentioning, paused, serve_app, serve_process
from tests.test_serve_jobs import sleepers, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TINY = {"output": "s.mp4", "seconds": 0.2, "width": 32, "height": 32, "audio": False}
LONG = {"output": "long.mp4", "seconds": 300, "width": 1280, "height": 720}


@pytest.fixture(autouse=True)
def dirtest(monkeypatch):
    from synapse_cli.jobs import JOBS

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)


def submit(ep: Endpoint | str, kind: str = "sample", spec: dict | None = None, **files: bytes) -> str:
    url = ep if isinstance(ep, str) else ep.url
    if files:
        r = http.post(f"{url}/v1/jobs/{kind}?detach=true", data={"spec": json.dumps(spec)},
                      files=[(name, (f"{name}.txt", data)) for name, data in files.items()], headers=AUTH, timeout=30)
    else:
        r = http.post(f"{url}/v1/jobs/{kind}?detach=true", json=spec or TINY, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def record(url: str, job_id: str) -> dict[str, Any]:
    r = http.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(url: str, job_id: str, statuses: tuple[str, ...], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        rec = record(url, job_id)
        if rec["status"] in statuses or time.monotonic() > deadline:
            assert rec["status"] in statuses, rec
            return rec
        time.sleep(0.05)


def ndjson_events(url: str, job_id: str, after: int | None = None, limit: int | None = None) -> list[dict]:
    """The /events lines (keep-alives dropped); stop after ``limit`` events, closing the connection."""
    out: list[dict] = []
    params = {} if after is None else {"after": after}
    with http.stream("GET", f"{url}/v1/jobs/{job_id}/events", params=params, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            event = json.loads(line)
            if event["type"] == "keepalive":
                continue
            out.append(event)
            if limit is not None and len(out) == limit:
                break
    return out


def sse_events(url: str, job_id: str, last_event_id: int | None = None, limit: int | None = None, raw: list[str] | None = None) -> list[dict]:
    """Parse the SSE stream: each message's id, event and data; stop after ``limit`` messages."""
    headers = {**AUTH, "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    out: list[dict] = []
    with http.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        message: dict[str, str] = {}
        for line in r.iter_lines():
            if raw is not None:
                raw.append(line)
            if line.startswith(":"):
                continue
            if line == "":
                if message:
                    data = json.loads(message["data"])
                    assert int(message["id"]) == data["index"] and message["event"] == data["type"]
                    out.append(data)
                    message = {}
                    if limit is not None and len(out) == limit:
                        break
                continue
            name, _, value = line.partition(": ")
            message[name] = value
    return out


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- submit, poll, complete ---------------------------------------------------------------------


def test_a_detached_job_is_answered_202_at_once_and_polled_to_completion(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        started = time.monotonic()
        r = http.post(f"{ep.url}/v1/jobs/sample?detach=true", json={**TINY, "seconds": 4, "width": 1280, "height": 720}, headers=AUTH)  # 720p: long enough to be seen processing, also on a loaded machine
        assert r.status_code == 202 and time.monotonic() - started < 2
        body = r.json()
        job_id = body["id"]
        assert body == {"id": job_id, "status": "pending",
                        "links": {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events", "cancel": f"/v1/jobs/{job_id}"}}
        assert r.headers["location"] == f"/v1/jobs/{job_id}"
        seen = set()
        deadline = time.monotonic() + 60
        while (rec := record(ep.url, job_id))["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            seen.add(rec["status"])
            time.sleep(0.02)
        assert rec["status"] == "completed", rec["error"]
        assert seen <= {"pending", "processing"} and "processing" in seen
        assert set(rec) == {"id", "kind", "status", "progress", "created_at", "started_at", "finished_at", "result", "error", "artifacts"}
        assert rec["kind"] == "sample" and rec["error"] is None
        assert rec["progress"]["done"] == rec["progress"]["total"] == 120
        assert ts(rec["created_at"]) <= ts(rec["started_at"]) <= ts(rec["finished_at"]) and rec["finished_at"].endswith("Z")
        assert rec["result"]["output"] == "s.mp4" and rec["result"]["duration_s"] == 4
        [art] = rec["artifacts"]
        assert art["path"] == "s.mp4" and art["url"].startswith(f"/v1/artifacts/{job_id}.0")
        data = http.get(ep.url + art["url"], headers=AUTH).content
        assert len(data) == art["bytes"] == rec["result"]["bytes"] and data[4:8] == b"ftyp"
        listed = http.get(f"{ep.url}/v1/jobs", headers=AUTH).json()["jobs"]
        assert [j["id"] for j in listed] == [job_id] and listed[0] == rec
        # the events end with the finished event, which carries the record's result
        events = ndjson_events(ep.url, job_id)
        assert events[0]["type"] == "started" and events[-1]["type"] == "finished" and events[-1]["result"] == rec["result"]
        assert [e["index"] for e in events] == list(range(len(events)))


def test_a_directory_outputs_artifacts_are_named_as_the_client_saves_them(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        job_id = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "outdir"}, input=b"hello world")
        rec = wait_status(ep.url, job_id, ("completed",))
        assert sorted(a["path"] for a in rec["artifacts"]) == ["outdir/head.txt", "outdir/sub/size.txt"]
        for a in rec["artifacts"]:
            assert http.get(ep.url + a["url"], headers=AUTH).content == (b"hello world" if a["path"].endswith("head.txt") else b"11")


def test_a_failing_detached_job_records_its_error(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        job_id = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "fail": True}, input=b"x")
        rec = wait_status(ep.url, job_id, ("failed",))
        assert rec["error"] == {"code": 1, "message": "cannot use a.txt: told to fail", "error": "JobError"}
        assert rec["result"] is None and rec["artifacts"] == [] and rec["finished_at"]
        assert ndjson_events(ep.url, job_id)[-1] == {"type": "error", "code": 1, "message": "cannot use a.txt: told to fail", "error": "JobError", "index": 1}
        assert wait_for(lambda: not (ep.work_dir / "jobs" / job_id).exists(), 5)


def test_job_routes_need_the_key_and_answer_404_for_unknown_ids(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        job_id = submit(ep)
        for method, path in [("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"),
                             ("DELETE", f"/v1/jobs/{job_id}")]:
            r = http.request(method, ep.url + path)
            assert r.status_code == 401 and r.json()["code"] == 3, (method, path)
        assert http.post(f"{ep.url}/v1/jobs/sample?detach=true", json=TINY).status_code == 401
        for method, path in [("GET", "/v1/jobs/nosuchjob"), ("GET", "/v1/jobs/nosuchjob/events"), ("DELETE", "/v1/jobs/nosuchjob")]:
            r = http.request(method, ep.url + path, headers=AUTH)
            assert r.status_code == 404 and r.json()["type"] == "error", (method, path)
        for query in ("detach=maybe", "detach=true&shards=0"):
            assert http.post(f"{ep.url}/v1/jobs/sample?{query}", json=TINY, headers=AUTH).status_code == 422
        for query in ("status=done", "limit=0", "limit=501", "limit=x"):
            assert http.get(f"{ep.url}/v1/jobs?{query}", headers=AUTH).status_code == 422, query
        assert http.get(f"{ep.url}/v1/jobs/{job_id}/events?after=-1", headers=AUTH).status_code == 422
        assert http.get(f"{ep.url}/v1/jobs/{job_id}/events", headers={**AUTH, "Last-Event-ID": "x"}).status_code == 422
        # a bad spec is refused before anything is recorded
        assert http.post(f"{ep.url}/v1/jobs/sample?detach=true", json={**TINY, "bogus": 1}, headers=AUTH).status_code == 422
        wait_status(ep.url, job_id, ("completed",))
        assert [j["id"] for j in http.get(f"{ep.url}/v1/jobs", headers=AUTH).json()["jobs"]] == [job_id]


def test_the_list_filters_by_status_and_limits_newest_first(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        ids = [submit(ep) for _ in range(3)]
        failing = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "fail": True}, input=b"x")
        for job_id in ids:
            wait_status(ep.url, job_id, ("completed",))
        wait_status(ep.url, failing, ("failed",))
        jobs = http.get(f"{ep.url}/v1/jobs", headers=AUTH).json()["jobs"]
        assert [j["id"] for j in jobs] == [failing, *reversed(ids)]
        assert [j["id"] for j in http.get(f"{ep.url}/v1/jobs?status=completed&limit=2", headers=AUTH).json()["jobs"]] == [ids[2], ids[1]]
        assert [j["id"] for j in http.get(f"{ep.url}/v1/jobs?status=failed", headers=AUTH).json()["jobs"]] == [failing]


def test_shards_combine_with_detach(tmp_path):
    from tests.conftest import make_clip

    clip = make_clip(tmp_path / "c.mp4", size="320x180", seconds=4)
    with serve_app(tmp_path / "srv") as ep:
        r = http.post(f"{ep.url}/v1/jobs/export?detach=true&shards=2", data={"spec": json.dumps({"input": "c.mp4", "output": "o.mp4", "preset": "ultrafast"})},
                      files=[("input", ("c.mp4", clip.read_bytes()))], headers=AUTH)
        assert r.status_code == 202, r.text
        rec = wait_status(ep.url, r.json()["id"], ("completed",), 120)
        assert [s["index"] for s in rec["result"]["shards"]] == [0, 1] and rec["artifacts"][0]["path"] == "o.mp4"
        assert {e.get("shard") for e in ndjson_events(ep.url, rec["id"]) if e["type"] == "log"} >= {"1/2", "2/2"}


# -- the job outlives its client ------------------------------------------------------------------


def test_the_job_survives_its_client_going_away(tmp_path):
    """A client process submits, follows /events, and is SIGKILLed mid-job: the job completes anyway."""
    with serve_app(tmp_path / "srv") as ep:
        client = subprocess.Popen([sys.executable, "-c", """
import httpx, json, sys
url, key = sys.argv[1], sys.argv[2]
auth = {"Authorization": "Bearer " + key}
spec = {"output": "s.mp4", "seconds": 5, "width": 1280, "height": 720}
job = httpx.post(url + "/v1/jobs/sample?detach=true", json=spec, headers=auth).json()["id"]
print(job, flush=True)
with httpx.stream("GET", url + "/v1/jobs/" + job + "/events", headers=auth, timeout=60) as r:
    for line in r.iter_lines():
        print(line, flush=True)
""", ep.url, API_KEY], stdout=subprocess.PIPE, text=True)
        job_id = client.stdout.readline().strip()
        assert json.loads(client.stdout.readline())["type"] == "started"
        client.kill()
        client.wait(10)
        assert record(ep.url, job_id)["status"] == "processing"
        rec = wait_status(ep.url, job_id, ("completed", "failed"), 120)
        assert rec["status"] == "completed" and rec["artifacts"]


# -- following: resume exactly, NDJSON and SSE --------------------------------------------------------


def test_events_after_n_resume_exactly_without_gap_or_duplicate(tmp_path):
    """A job with a known, long event list (dirtest: 1 s silent, then 40 logs): read a few live, drop
    the connection, resume with ?after=N, and so on; the pieces join to exactly the full list."""
    with serve_app(tmp_path / "srv") as ep:
        job_id = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "sleep_s": 1.0, "spam": 40}, input=b"hello")
        pieces: list[dict] = []
        while (not pieces or pieces[-1]["type"] != "finished") and len(pieces) < 100:
            pieces += ndjson_events(ep.url, job_id, after=len(pieces), limit=7)
        full = ndjson_events(ep.url, job_id)
        assert len(full) == 1 + 40 + 2 + 2 + 1  # started, logs, progress x2, an artifact per file of the output dir, finished
        assert pieces == full and [e["index"] for e in full] == list(range(len(full)))
        for n in (0, 1, 20, len(full) - 1):
            assert ndjson_events(ep.url, job_id, after=n) == full[n:]
        assert ndjson_events(ep.url, job_id, after=len(full)) == []  # past the end of a finished job: nothing, and the stream ends
        # the stored events are the streamed route's events (plus index)
        with http.stream("POST", f"{ep.url}/v1/jobs/dirtest", data={"spec": json.dumps({"input": "a.txt", "output_dir": "o", "spam": 40})},
                         files=[("input", ("a.txt", b"hello"))], headers=AUTH) as r:
            streamed = [json.loads(line) for line in r.iter_lines() if line]
        strip = lambda e: {k: v for k, v in e.items() if k not in ("index", "path", "elapsed_s")}  # noqa: E731
        assert [strip(e) for e in full] == [strip(e) for e in streamed]


def test_sse_resumes_at_last_event_id_plus_one(tmp_path):
    with serve_app(tmp_path / "srv", keepalive_s=0.2) as ep:
        job_id = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "sleep_s": 1.0, "spam": 30}, input=b"hello")
        raw: list[str] = []
        first = sse_events(ep.url, job_id, limit=1, raw=raw)  # `started`, then the job is silent for 1 s
        assert first[0]["type"] == "started" and first[0]["index"] == 0
        pieces = first
        while pieces[-1]["type"] != "finished" and len(pieces) < 100:
            pieces += sse_events(ep.url, job_id, last_event_id=pieces[-1]["index"], limit=5, raw=raw)
        full = ndjson_events(ep.url, job_id)
        assert pieces == full
        assert raw[:3] == ["id: 0", "event: started", f"data: {json.dumps(full[0], separators=(',', ':'))}"]
        # keep-alives while the job was silent: SSE comments
        live = []
        job2 = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "sleep_s": 1.0}, input=b"hello")
        sse_events(ep.url, job2, raw=live)
        assert ": keepalive" in live
        lines = []
        job3 = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "sleep_s": 1.0}, input=b"hello")
        with http.stream("GET", f"{ep.url}/v1/jobs/{job3}/events", headers=AUTH, timeout=0.5) as r:
            lines = [json.loads(line) for line in r.iter_lines()]
        assert {"type": "keepalive"} in lines and lines[-1]["type"] == "finished"
        # the Last-Event-ID header wins over ?after= (an EventSource reconnects to its first URL)
        assert sse_events(ep.url + "", job_id, last_event_id=len(full) - 2)[0]["index"] == len(full) - 1


# -- cancel ---------------------------------------------------------------------------------------


def ffmpeg_of(job_dir: Path) -> list[int]:
    return [pid for pid in sleepers(str(job_dir)) if "ffmpeg" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


def test_delete_kills_ffmpeg_within_2_s_and_leaves_nothing(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        job_id = submit(ep, spec=LONG)
        job_dir = ep.work_dir / "jobs" / job_id
        assert wait_for(lambda: ffmpeg_of(job_dir), 20), "ffmpeg never started"
        [pid] = ffmpeg_of(job_dir)
        follower: list[dict] = []
        reader = threading.Thread(target=lambda: follower.extend(ndjson_events(ep.url, job_id)))
        reader.start()
        asked = time.monotonic()
        r = http.delete(f"{ep.url}/v1/jobs/{job_id}", headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        rec = r.json()
        assert rec["status"] == "cancelled" and rec["error"]["code"] == 130 and rec["error"]["error"] == "Interrupted" and rec["artifacts"] == []
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text(), 2 - (time.monotonic() - asked))
        assert time.monotonic() - asked < 2
        assert wait_for(lambda: not job_dir.exists(), 2)
        reader.join(10)
        assert follower[-1]["type"] == "error" and follower[-1]["code"] == 130  # a follower's stream ends with the cancel
        again = http.delete(f"{ep.url}/v1/jobs/{job_id}", headers=AUTH)
        assert again.status_code == 409 and again.json()["type"] == "error"
        assert record(ep.url, job_id)["status"] == "cancelled"


def test_delete_of_a_queued_job_and_of_a_finished_one(tmp_path):
    with serve_app(tmp_path / "srv", max_concurrent_jobs=1) as ep:
        running = submit(ep, spec=LONG)
        queued = submit(ep)
        wait_status(ep.url, running, ("processing",))
        assert record(ep.url, queued)["status"] == "pending"
        r = http.delete(f"{ep.url}/v1/jobs/{queued}", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["started_at"] is None
        assert not (ep.work_dir / "jobs" / queued).exists()
        assert http.delete(f"{ep.url}/v1/jobs/{running}", headers=AUTH).json()["status"] == "cancelled"
        done = submit(ep)
        wait_status(ep.url, done, ("completed",))
        r = http.delete(f"{ep.url}/v1/jobs/{done}", headers=AUTH)
        assert r.status_code == 409 and "already ended" in r.json()["message"]
        rec = record(ep.url, done)
        assert rec["status"] == "completed" and http.get(ep.url + rec["artifacts"][0]["url"], headers=AUTH).status_code == 200


# -- restart ----------------------------------------------------------------------------------------


def test_a_restarted_server_keeps_finished_jobs_and_fails_running_ones(tmp_path):
    work = tmp_path / "srv"
    with serve_process(work) as (url, server, _):
        done = submit(url)
        rec = wait_status(url, done, ("completed",))
        data = http.get(url + rec["artifacts"][0]["url"], headers=AUTH).content
        running = submit(url, spec=LONG)
        wait_status(url, running, ("processing",))
        assert wait_for(lambda: ffmpeg_of(work / "jobs" / running), 20)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    kill_processes_mentioning(str(work))  # ffmpeg runs in its own session: the orphan a dead server leaves
    with serve_process(work) as (url, server, _):
        jobs = {j["id"]: j for j in http.get(f"{url}/v1/jobs", headers=AUTH).json()["jobs"]}
        assert set(jobs) == {done, running}
        assert jobs[done]["status"] == "completed" and jobs[done]["artifacts"] == rec["artifacts"]
        assert http.get(url + rec["artifacts"][0]["url"], headers=AUTH).content == data
        failed = jobs[running]
        assert failed["status"] == "failed" and failed["finished_at"]
        assert failed["error"] == {"code": 3, "message": "interrupted by a server restart: the server stopped while this job was running", "error": "BackendError"}
        assert not (work / "jobs" / running).exists()
        events = ndjson_events(url, running)
        assert events[0]["type"] == "started" and events[-1]["type"] == "error" and events[-1]["message"] == failed["error"]["message"]
        # a new job on the restarted server runs as usual
        assert wait_status(url, submit(url), ("completed",))["artifacts"]


def test_sigterm_stops_detached_jobs_and_fails_the_queued_ones(tmp_path):
    """A graceful stop: the running job's ffmpeg is gone when the server has exited, the running job is
    failed ("shutting down"), the one waiting for a slot too; the next server lists both so."""
    work = tmp_path / "srv"
    with serve_process(work, env={"SYNAPSE_SERVE_MAX_CONCURRENT_JOBS": "1"}) as (url, server, _):
        running = submit(url, spec=LONG)
        queued = submit(url)
        wait_status(url, running, ("processing",))
        assert wait_for(lambda: ffmpeg_of(work / "jobs" / running), 20)
        assert record(url, queued)["status"] == "pending"
        server.send_signal(signal.SIGTERM)
        server.wait(20)
        assert kill_processes_mentioning(str(work)) == [], "ffmpeg outlived the server"
    with serve_process(work) as (url, server, _):
        jobs = {j["id"]: j for j in http.get(f"{url}/v1/jobs", headers=AUTH).json()["jobs"]}
        assert jobs[running]["status"] == jobs[queued]["status"] == "failed"
        assert "shutting down" in jobs[running]["error"]["message"] and "had not started" in jobs[queued]["error"]["message"]
        assert not (work / "jobs" / running).exists() and not (work / "jobs" / queued).exists()


# -- pruning (serve.keep_jobs_days) -------------------------------------------------------------------

KEEP_S = 3.0  # keep_jobs_days is a float: a few seconds make "ended long ago" real, no clock faked
FAIL = {"input": "a.txt", "output_dir": "o", "fail": True}


def status_of(url: str, job_id: str) -> int:
    return http.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=30).status_code


def listed(url: str) -> set[str]:
    return {j["id"] for j in http.get(f"{url}/v1/jobs", headers=AUTH, timeout=30).json()["jobs"]}


def sleep_past(url: str, job_ids: list[str], seconds: float) -> None:
    """Until every one of ``job_ids`` ended more than ``seconds`` ago (by the server's ``finished_at``)."""
    last_end = max(ts(record(url, j)["finished_at"]) for j in job_ids)
    time.sleep(max(0.0, last_end + seconds + 0.2 - time.time()))


def test_jobs_that_ended_keep_jobs_days_ago_are_pruned_by_the_sweep_running_and_recent_ones_stay(tmp_path):
    # artifact_ttl_s=0: every POST sweeps (the sweep runs at most every min(60 s, artifact_ttl_s))
    with serve_app(tmp_path / "srv", max_concurrent_jobs=1, artifact_ttl_s=0, keep_jobs_days=KEEP_S / 86400) as ep:
        done = submit(ep)
        art = wait_status(ep.url, done, ("completed",))["artifacts"][0]["url"]
        failed = submit(ep, "dirtest", FAIL, input=b"x")
        wait_status(ep.url, failed, ("failed",))
        running = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "sleep_s": 120}, input=b"x")
        wait_status(ep.url, running, ("processing",))
        pending = submit(ep)  # the one slot is taken: it waits
        cancelled = submit(ep)
        assert http.delete(f"{ep.url}/v1/jobs/{cancelled}", headers=AUTH).json()["status"] == "cancelled"
        ended = [done, failed, cancelled]
        sleep_past(ep.url, ended, KEEP_S)
        assert http.get(ep.url + art, headers=AUTH).status_code == 410  # expired, still recorded
        trigger = submit(ep)  # its POST sweeps, and prunes what ended KEEP_S ago
        for job_id in ended:
            assert status_of(ep.url, job_id) == 404, job_id
            r = http.get(f"{ep.url}/v1/jobs/{job_id}/events", headers=AUTH)
            assert r.status_code == 404 and r.json()["type"] == "error"
        assert http.get(ep.url + art, headers=AUTH).status_code == 404  # no record left to say "expired"
        # running and pending for longer than KEEP_S, but not ended: never pruned
        assert listed(ep.url) == {running, pending, trigger}
        assert record(ep.url, running)["status"] == "processing" and record(ep.url, pending)["status"] == "pending"
        # a job that ended just now stays through a sweep
        assert http.delete(f"{ep.url}/v1/jobs/{running}", headers=AUTH).json()["status"] == "cancelled"
        again = submit(ep)
        assert record(ep.url, running)["status"] == "cancelled"
        for job_id in (pending, trigger, again):
            wait_status(ep.url, job_id, ("completed",))
        assert listed(ep.url) == {running, pending, trigger, again}
        # and once they too ended KEEP_S ago, the next sweep takes them
        sleep_past(ep.url, [running, pending, trigger, again], KEEP_S)
        last = submit(ep)
        assert listed(ep.url) == {last}
        wait_status(ep.url, last, ("completed",))


def test_a_job_running_on_another_server_sharing_the_work_dir_is_never_pruned(tmp_path):
    """Server b prunes the store it shares with server a: a's running and waiting jobs, older than b's
    keep_jobs_days, are not b's to protect by id; their status alone keeps them."""
    work, keep_s = tmp_path / "srv", 1.0
    with serve_app(work, max_concurrent_jobs=1) as a, serve_app(work, artifact_ttl_s=0, keep_jobs_days=keep_s / 86400) as b:
        running = submit(a, "dirtest", {"input": "a.txt", "output_dir": "o", "sleep_s": 120}, input=b"x")
        wait_status(a.url, running, ("processing",))
        pending = submit(a)
        time.sleep(keep_s + 0.3)
        trigger = submit(b)  # b's sweep
        assert record(b.url, running)["status"] == "processing" and record(b.url, pending)["status"] == "pending"
        assert listed(b.url) == {running, pending, trigger}
        assert http.delete(f"{a.url}/v1/jobs/{running}", headers=AUTH).json()["status"] == "cancelled"
        for url, job_id in ((a.url, pending), (b.url, trigger)):
            wait_status(url, job_id, ("completed",))


def test_keep_jobs_days_0_keeps_every_job(tmp_path):
    with serve_app(tmp_path / "srv", artifact_ttl_s=0, keep_jobs_days=0) as ep:
        done = submit(ep)
        wait_status(ep.url, done, ("completed",))
        failed = submit(ep, "dirtest", FAIL, input=b"x")
        wait_status(ep.url, failed, ("failed",))
        time.sleep(0.2)
        trigger = submit(ep)  # sweeps
        wait_status(ep.url, trigger, ("completed",))
        assert listed(ep.url) == {done, failed, trigger}
        assert record(ep.url, done)["status"] == "completed" and record(ep.url, failed)["status"] == "failed"


def test_a_restarted_server_prunes_at_start_the_jobs_and_folders_that_ended_keep_jobs_days_ago(tmp_path):
    """The setting as ``synapse serve`` reads it (SYNAPSE_SERVE_KEEP_JOBS_DAYS), applied when it starts:
    the completed job goes with its folder (its outputs had an hour to live); the job that this start
    marks failed ended just now, and stays."""
    work = tmp_path / "srv"
    with serve_process(work) as (url, server, _):
        done = submit(url)
        rec = wait_status(url, done, ("completed",))
        running = submit(url, spec=LONG)
        wait_status(url, running, ("processing",))
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    kill_processes_mentioning(str(work))
    assert (work / "jobs" / done).is_dir()
    time.sleep(max(0.0, ts(rec["finished_at"]) + 1.2 - time.time()))
    with serve_process(work, env={"SYNAPSE_SERVE_KEEP_JOBS_DAYS": str(1 / 86400)}) as (url, server, _):
        assert status_of(url, done) == 404
        assert not (work / "jobs" / done).exists()
        assert listed(url) == {running} and record(url, running)["status"] == "failed"
    db = sqlite3.connect(work / "jobs.db")
    assert db.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (done,)).fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (running,)).fetchone()[0] > 0
    db.close()


def test_the_job_store_stops_growing_across_prune_cycles(tmp_path):
    """Each cycle stores ~1 MB of events; each POST prunes the previous cycle's job. jobs.db is measured
    after a checkpoint (the -wal file folded in), so its size is what the rows take."""
    keep_s = 0.5
    with serve_app(tmp_path / "srv", artifact_ttl_s=0, keep_jobs_days=keep_s / 86400) as ep:
        path = ep.work_dir / "jobs.db"

        def size() -> int:
            db = sqlite3.connect(path, timeout=30)
            try:
                assert wait_for(lambda: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, 10)  # 1: a reader was in the way
                return path.stat().st_size
            finally:
                db.close()

        sizes = []
        for _ in range(6):
            job = submit(ep, "dirtest", {"input": "a.txt", "output_dir": "o", "spam": 1000}, input=b"x")
            wait_status(ep.url, job, ("completed",))
            sizes.append(size())
            sleep_past(ep.url, [job], keep_s)
        assert sizes[0] > 1_000_000
        assert max(sizes[1:]) <= sizes[0] * 1.2, sizes  # without pruning: ~1 MB more each cycle
        wait_status(ep.url, submit(ep), ("completed",))  # prunes the last big job: its pages go back to the file system
        assert size() < sizes[0] / 4, (size(), sizes)


def test_expired_artifacts_leave_the_record_and_answer_410(tmp_path):
    with serve_app(tmp_path / "srv", artifact_ttl_s=0) as ep:
        job_id = submit(ep)
        rec = wait_status(ep.url, job_id, ("completed",))
        assert rec["artifacts"]
        time.sleep(0.05)
        submit(ep)  # a new job sweeps the expired folder
        assert wait_for(lambda: not (ep.work_dir / "jobs" / job_id).exists(), 5)
        after = record(ep.url, job_id)
        assert after["status"] == "completed" and after["result"] == rec["result"] and after["artifacts"] == []
        r = http.get(ep.url + rec["artifacts"][0]["url"], headers=AUTH)
        assert r.status_code == 410 and r.json()["type"] == "error"
        assert http.get(f"{ep.url}/v1/artifacts/{'x' * 22}.0", headers=AUTH).status_code == 404


# -- many at once -----------------------------------------------------------------------------------


def test_twenty_detached_jobs_at_once_none_lost_and_the_limit_held(tmp_path):
    with serve_app(tmp_path / "srv", max_concurrent_jobs=2) as ep:
        ids: list[str] = []
        barrier = threading.Barrier(20)

        def post() -> None:
            barrier.wait()
            ids.append(submit(ep))

        threads = [threading.Thread(target=post) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(set(ids)) == 20
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = http.get(f"{ep.url}/v1/jobs?limit=500", headers=AUTH).json()["jobs"]
            if all(j["status"] == "completed" for j in jobs):
                break
            assert sum(j["status"] == "processing" for j in jobs) <= 2
            time.sleep(0.05)
        assert sorted(j["id"] for j in jobs) == sorted(ids) and all(j["status"] == "completed" and j["artifacts"] for j in jobs)
        spans = [(ts(j["started_at"]), ts(j["finished_at"])) for j in jobs]
        most = max(sum(s <= start < f for s, f in spans) for start, _ in spans)
        assert most <= 2, f"{most} jobs ran at once"
        assert most == 2  # and the slots were used


def test_detached_jobs_past_the_queue_limit_get_429(tmp_path):
    with serve_app(tmp_path / "srv", max_concurrent_jobs=1, max_queued_jobs=1) as ep:
        running = submit(ep, spec=LONG)
        wait_status(ep.url, running, ("processing",))
        queued = submit(ep)
        r = http.post(f"{ep.url}/v1/jobs/sample?detach=true", json=TINY, headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"] and "max_queued_jobs" in r.json()["message"]
        # a streamed job gets 429 too while the slot is taken
        assert http.post(f"{ep.url}/v1/jobs/sample", json=TINY, headers=AUTH).status_code == 429
        http.delete(f"{ep.url}/v1/jobs/{running}", headers=AUTH)
        assert wait_status(ep.url, queued, ("completed",))["artifacts"]


# -- the OpenAPI document -------------------------------------------------------------------------


def openapi_doc(ep: Endpoint) -> dict:
    r = http.get(f"{ep.url}/v1/openapi.json", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def test_the_openapi_document_is_behind_the_key_and_describes_every_route(tmp_path):
    from fastapi.routing import APIRoute

    from synapse_cli.jobs import JOBS

    with serve_app(tmp_path / "srv") as ep:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert http.get(ep.url + path, headers=AUTH).status_code == 404, path
        assert http.get(f"{ep.url}/v1/openapi.json").status_code == 401
        doc = openapi_doc(ep)
        assert doc["openapi"].startswith("3.1") and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        paths = doc["paths"]
        from synapse_cli.server import create_app

        app = create_app(work_dir=tmp_path / "other", api_key=API_KEY)
        for route in app.routes:
            if not isinstance(route, APIRoute):
                continue
            for method in route.methods - {"HEAD"}:
                if route.path == "/v1/jobs/{kind}":
                    assert all("post" in paths[f"/v1/jobs/{kind}"] for kind in JOBS), "a kind without its POST"
                else:
                    assert method.lower() in paths.get(route.path, {}), f"{method} {route.path} is not described"
        schemas = doc["components"]["schemas"]
        # multipart bodies from each kind's spec: the spec part (JSON) and one file part per input
        export = paths["/v1/jobs/export"]["post"]
        body = export["requestBody"]["content"]["multipart/form-data"]
        assert body["encoding"]["spec"]["contentType"] == "application/json"
        assert body["schema"]["properties"]["input"]["format"] == "binary" and body["schema"]["required"] == ["spec", "input"]
        assert schemas["ExportSpec"]["properties"]["crf"]["type"] == "integer" and "output" in schemas["ExportSpec"]["required"]
        compile_ = paths["/v1/jobs/compile"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert compile_["properties"]["inputs"]["type"] == "array" and compile_["properties"]["inputs"]["items"]["format"] == "binary"
        assert paths["/v1/jobs/sample"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SampleSpec"}
        assert paths["/v1/jobs/dirtest"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["input"]["format"] == "binary"
        assert {p["name"] for p in export["parameters"]} == {"detach", "shards", "report_webhooks"}
        assert set(export["responses"]) >= {"200", "202", "401", "413", "422", "429"}
        assert "application/x-ndjson" in export["responses"]["200"]["content"]
        assert export["responses"]["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        events = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
        assert set(events) == {"application/x-ndjson", "text/event-stream"}
        assert paths["/v1/jobs/{job_id}"]["delete"]["responses"]["409"]
        # the schemas describe what the server really sends
        import jsonschema

        job_id = submit(ep)
        record_ = wait_status(ep.url, job_id, ("completed",))
        resolver = {"components": doc["components"]}

        def check(value: Any, name: str) -> None:
            jsonschema.validate(value, {**resolver, "$ref": f"#/components/schemas/{name}"}, cls=jsonschema.Draft202012Validator)

        check(record_, "JobRecord")
        check(http.get(f"{ep.url}/v1/jobs", headers=AUTH).json(), "JobList")
        for event in ndjson_events(ep.url, job_id):
            check(event, "IndexedEvent")
        check(http.get(f"{ep.url}/v1/jobs/nosuch", headers=AUTH).json(), "Error")
        with pytest.raises(jsonschema.ValidationError):
            check({**record_, "status": "done"}, "JobRecord")


def test_the_openapi_document_passes_openapi_spec_validator(tmp_path):
    validator = pytest.importorskip("openapi_spec_validator")
    with serve_app(tmp_path / "srv") as ep:
        validator.validate(openapi_doc(ep))


def sse_items(body: str) -> list[dict[str, str]]:
    """The events of a text/event-stream body as fields (``: comment`` lines dropped), as an SSE client reads them."""
    items = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            items.append(fields)
    return items


def test_the_openapi_document_describes_the_sse_stream_the_links_and_each_paths_methods(tmp_path):
    """/events with Accept: text/event-stream: each item has the documented ``id``, ``event`` and ``data``,
    the data being a documented IndexedEvent; a detached submit's 202 links to the job's record, events and
    cancel; a 405 lists in ``Allow`` the methods the document gives that path (issue 27 item 5)."""
    import jsonschema

    with serve_app(tmp_path / "srv") as ep:
        doc = openapi_doc(ep)
        components = {"components": doc["components"]}
        job_id = submit(ep)
        wait_status(ep.url, job_id, ("completed",))
        r = http.get(f"{ep.url}/v1/jobs/{job_id}/events", headers={**AUTH, "Accept": "text/event-stream"}, timeout=30)
        assert r.headers["content-type"].startswith("text/event-stream")
        items = sse_items(r.text)
        schema = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        item_schema = {**components, **schema}
        assert [json.loads(i["data"])["type"] for i in items][:1] == ["started"] and json.loads(items[-1]["data"])["type"] == "finished"
        for item in items:
            jsonschema.validate(item, item_schema, cls=jsonschema.Draft202012Validator)
            data = json.loads(item["data"])
            content = doc["components"]["schemas"]["ServerSentEvent"]["properties"]["data"]["contentSchema"]
            jsonschema.validate(data, {**components, **content}, cls=jsonschema.Draft202012Validator)
            assert item["event"] == data["type"] and item["id"] == str(data["index"])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"event": "started", "data": "{}"}, item_schema, cls=jsonschema.Draft202012Validator)  # no id
        # links: submit -> get, events, cancel; get -> events, cancel
        operations = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
        for kind in ("sample", "export", "dirtest"):
            links = doc["paths"][f"/v1/jobs/{kind}"]["post"]["responses"]["202"]["links"]
            assert {link["operationId"] for link in links.values()} == {"get_job", "job_events", "cancel_job"} <= operations
            assert all(link["parameters"] == {"job_id": "$response.body#/id"} for link in links.values())
        assert set(doc["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["links"]) == {"job_events", "cancel_job"}
        # 405: Allow as the document says, though /v1/jobs/{kind} and /v1/jobs/{job_id} share a shape
        for method, path, allow in (("OPTIONS", f"/v1/jobs/{job_id}", "DELETE, GET"), ("PUT", "/v1/jobs/sample", "POST"),
                                    ("POST", f"/v1/jobs/{job_id}/events", "GET"), ("PATCH", "/v1/jobs", "GET")):
            r = http.request(method, ep.url + path, headers=AUTH)
            assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers.get("allow"))
            assert r.json()["type"] == "error"


def test_a_restarted_server_kills_what_the_dead_one_left_running_and_runs_its_queue_in_order(tmp_path):
    """SIGKILL (no graceful stop): the running job's ffmpeg, in a session of its own, outlives the server.
    The next server on the work dir kills it before it listens and fails that job; the jobs that were
    still queued are queued again and run, in the order they were submitted."""
    work = tmp_path / "srv"
    env = {"SYNAPSE_SERVE_MAX_CONCURRENT_JOBS": "1"}
    with serve_process(work, env=env) as (url, server, _):
        running = submit(url, spec=LONG)
        queued = [submit(url, spec={**TINY, "output": f"q{i}.mp4"}) for i in range(3)]
        wait_status(url, running, ("processing",))
        assert wait_for(lambda: ffmpeg_of(work / "jobs" / running), 20)
        [pid] = ffmpeg_of(work / "jobs" / running)
        assert all(record(url, q)["status"] == "pending" for q in queued)
        with paused(job_ffmpeg(work / "jobs" / running)):  # it waits, stopped, for the next server to kill it: nothing encoded meanwhile
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
            assert ffmpeg_of(work / "jobs" / running) == [pid]
            with serve_process(work, env=env) as (url2, _, log):
                assert not ffmpeg_of(work / "jobs" / running), "the dead server's ffmpeg outlived the restart"
                failed = record(url2, running)
                assert failed["status"] == "failed" and failed["error"]["message"] == "interrupted by a server restart: the server stopped while this job was running"
                done = [wait_status(url2, q, ("completed",)) for q in queued]
                assert [d["started_at"] for d in done] == sorted(d["started_at"] for d in done)
                for d, i in zip(done, range(3)):
                    [art] = d["artifacts"]
                    assert art["path"] == f"q{i}.mp4" and len(http.get(url2 + art["url"], headers=AUTH).content) == art["bytes"]
                assert any("queued here" in line for line in log)


# -- outputs optional, names checked before a job starts (issue #27 items 3 and 4) ---------------------------


SMALL_FRAMING = {"output_width": 90, "output_height": 160}


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory) -> bytes:
    from tests.conftest import make_clip

    return make_clip(tmp_path_factory.mktemp("names") / "in.mp4", size="160x90", seconds=0.4).read_bytes()


def test_a_streamed_export_without_an_output_writes_the_clis_default_name(tmp_path, small_clip):
    """``{"input": "in.mp4", "job": "framing"}``: the server names the output as ``synapse export`` would."""
    with serve_app(tmp_path / "srv") as ep:
        spec = {"input": "in.mp4", "job": "framing", "params": SMALL_FRAMING}
        r = http.post(f"{ep.url}/v1/jobs/export", data={"spec": json.dumps(spec)}, files=[("input", ("in.mp4", small_clip, "video/mp4"))],
                      headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        events = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        assert events[-1]["type"] == "finished", events[-3:]
        assert events[-1]["result"]["output"] == "in.framing.mp4"
        [art] = [e for e in events if e["type"] == "artifact"]
        assert art["path"].endswith("?output=output&save=in.framing.mp4"), art
        assert http.get(ep.url + art["path"], headers=AUTH).content[4:8] == b"ftyp"


def test_a_detached_export_without_an_output_names_its_artifact_as_the_cli_would(tmp_path, small_clip):
    from synapse_cli.jobs.export.build import default_output

    with serve_app(tmp_path / "srv") as ep:
        spec = {"input": "clips/in.mp4", "job": "overlay", "params": {"keyframes": [{"time": 0, "x": 40, "y": 40, "radius_x": 20, "radius_y": 10}]}}
        r = http.post(f"{ep.url}/v1/jobs/export?detach=true", data={"spec": json.dumps(spec)},
                      files=[("input", ("in.mp4", small_clip, "video/mp4"))], headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        rec = wait_status(ep.url, r.json()["id"], ("completed", "failed"), timeout_s=120)
        assert rec["status"] == "completed", rec["error"]
        expected = str(default_output("clips/in.mp4", "overlay.mp4"))  # the CLI's own function
        assert expected == "clips/in.overlay.mp4"
        [art] = rec["artifacts"]
        assert art["path"] == expected and rec["result"]["output"] == expected
        assert http.get(ep.url + art["url"], headers=AUTH).content[4:8] == b"ftyp"


def test_a_compile_without_an_output_dir_writes_compiled(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        spec = {"inputs": ["s.json"], "engines": ["llguidance"]}
        r = http.post(f"{ep.url}/v1/jobs/compile?detach=true", data={"spec": json.dumps(spec)},
                      files=[("inputs", ("s.json", b'{"type": "object", "properties": {"a": {"type": "integer"}}}', "application/json"))],
                      headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        rec = wait_status(ep.url, r.json()["id"], ("completed", "failed"), timeout_s=120)
        assert rec["status"] == "completed", rec["error"]
        assert rec["artifacts"] and all(a["path"].startswith("compiled/") for a in rec["artifacts"]), rec["artifacts"]
        assert not (tmp_path / "compiled").exists() and not Path("compiled").exists()


def test_the_names_hooks_derive_what_the_cli_derives():
    from synapse_cli.jobs import settle_names

    assert settle_names("export", {"input": "/v/in.mp4", "job": "framing"})["output"] == "/v/in.framing.mp4"
    assert settle_names("export", {"input": "in.mp4"})["output"] == "in.framing.mp4"  # the spec's default job
    assert settle_names("export", {"input": "in.mp4", "job": "annotate"}, "out")["output"] == "out/in.annotate.mp4"
    assert settle_names("infer", {"source": "/v/match.mp4", "task": "track"})["output"] == "/v/match.track.json"
    assert settle_names("infer", {"source": "clip.mov"})["output"] == "clip.pose.json"
    assert settle_names("compile", {"inputs": ["a.json"]})["output_dir"] == "compiled"
    assert settle_names("sample", {})["output"] == "sample.mp4"
    assert settle_names("export", {"input": "in.mp4", "output": "given.mov"})["output"] == "given.mov"


@pytest.mark.parametrize("kind, spec, field", [
    ("sample", {"output": "noext", "seconds": 1}, "output"),
    ("sample", {"output": "clip.webm", "seconds": 1}, "output"),
    ("export", {"input": "in.mp4", "output": "out.xyz"}, "output"),
    ("infer", {"source": "in.mp4", "output": "results.txt"}, "output"),
    ("infer", {"source": "in.mp4", "annotated": "a.gif"}, "annotated"),
])
def test_an_output_name_no_muxer_knows_is_a_422_naming_the_field_before_anything_runs(tmp_path, small_clip, kind, spec, field):
    with serve_app(tmp_path / "srv") as ep:
        for detach in ("", "?detach=true"):
            if kind == "sample":
                r = http.post(f"{ep.url}/v1/jobs/{kind}{detach}", json=spec, headers=AUTH, timeout=30)
            else:
                name = "input" if kind == "export" else "source"
                r = http.post(f"{ep.url}/v1/jobs/{kind}{detach}", data={"spec": json.dumps(spec)},
                              files=[(name, ("in.mp4", small_clip, "video/mp4"))], headers=AUTH, timeout=30)
            assert r.status_code == 422, r.text
            assert r.json()["message"].startswith(f"bad {kind} spec: {field}: "), r.text
        assert ep.job_dirs() == []
        assert http.get(f"{ep.url}/v1/jobs", headers=AUTH).json()["jobs"] == []


def test_an_output_name_no_muxer_knows_is_exit_2_on_the_cli_and_a_usage_error_in_the_api(cli, tmp_path, monkeypatch, small_clip):
    import synapse_cli
    from synapse_cli.errors import UsageError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.mp4").write_bytes(small_clip)
    run = cli("sample", "noext", "--seconds", "1")
    assert run.exit_code == 2, run.stderr
    assert run.stderr.strip().count("\n") == 0 and "output: 'noext'" in run.stderr and ".mp4" in run.stderr
    with pytest.raises(UsageError, match="output: 'noext'"):
        synapse_cli.run("sample", "noext", seconds=1)
    with pytest.raises(UsageError, match="output: 'out.xyz'"):
        synapse_cli.run("export", "in.mp4", output="out.xyz")
    run = cli("export", "in.mp4", "-o", "out", "--no-modal")
    assert run.exit_code == 2 and "output: 'out'" in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_a_detached_infer_without_an_output_names_its_results_as_the_cli_would(tmp_path):
    from tests.conftest import bus_image

    image = bus_image(tmp_path / "bus.jpg").read_bytes()
    with serve_app(tmp_path / "srv") as ep:
        r = http.post(f"{ep.url}/v1/jobs/infer?detach=true", data={"spec": json.dumps({"source": "photos/bus.jpg"})},
                      files=[("source", ("bus.jpg", image, "image/jpeg"))], headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        rec = wait_status(ep.url, r.json()["id"], ("completed", "failed"), timeout_s=180)
        assert rec["status"] == "completed", rec["error"]
        [art] = rec["artifacts"]
        assert art["path"] == rec["result"]["output"] == "photos/bus.pose.json"
        assert isinstance(json.loads(http.get(ep.url + art["url"], headers=AUTH).content), dict)
