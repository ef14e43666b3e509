"""Load through a kill: 200 detached jobs over HTTP, the server SIGKILLed mid-way and restarted on its work dir.

``synapse serve`` with ``max_concurrent_jobs = 2`` takes 200 tiny jobs (samples, and exports of an uploaded
clip, alternating) submitted one after another over HTTP; once some have completed it is SIGKILLed (its
process group: no graceful stop), and a new server is started on the same work dir while the old one's
ffmpeg may still be running. Then:

- every job reaches a terminal state with a reason: ``completed``, or ``failed`` with the restart's message
  for a job that was running when the server died; none stays ``pending`` or ``processing``;
- the jobs still queued at the kill are run by the new server, in the order they were submitted, after
  nothing else: the queue survives the restart;
- no process of the old server's jobs is left once the new server listens;
- every completed job's output downloads whole (its recorded size, and ffmpeg decodes every frame without
  an error); a failed job has no artifact and no folder.

Printed: jobs per minute (from the first submit to the last job's end, the restart included), the p50
and p95 submit latency, and the restart's recovery time (from the SIGKILL until the new server listens,
and until it has started the first queued job).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import ffmpeg_exe, make_clip, wait_for
from tests.http_fixtures import API_KEY, serve_process

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JOBS = 200
KILL_AFTER_COMPLETED = 30
SUBMITTERS = 8
SAMPLE = {"output": "s.mp4", "seconds": 0.2, "width": 32, "height": 32, "fps": 10, "audio": False}
EXPORT = {"input": "in.mp4", "output": "e.mp4", "job": "framing", "preset": "ultrafast",
          "params": {"output_width": 32, "output_height": 56}}
RESTART_MESSAGE = "interrupted by a server restart: the server stopped while this job was running"
TERMINAL = ("completed", "failed", "cancelled")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _when(stamp: str | None) -> float | None:
    return None if stamp is None else datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _records(client: httpx.Client) -> dict[str, dict]:
    r = client.get("/v1/jobs", params={"limit": 500})
    assert r.status_code == 200, r.text
    return {j["id"]: j for j in r.json()["jobs"]}


def _processes_in(folder: Path) -> list[int]:
    needle = (str(folder) + "/").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ") and " Z " not in (entry / "stat").read_text():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_200_detached_jobs_survive_a_sigkill_of_the_server(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", size="96x64", seconds=0.4, fps=10, audio=False).read_bytes()
    work = tmp_path / "srv"
    env = {"SYNAPSE_SERVE_MAX_CONCURRENT_JOBS": "2", "SYNAPSE_SERVE_MAX_QUEUED_JOBS": str(JOBS), "SYNAPSE_SERVE_MIN_FREE_MB": "0"}
    latencies: list[float] = []
    first_submit = time.time()
    with serve_process(work, env=env) as (url, server, _):
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:

            def submit(i: int) -> str:
                started = time.monotonic()
                if i % 2:
                    r = client.post("/v1/jobs/export", params={"detach": "true"}, data={"spec": json.dumps(EXPORT)},
                                    files=[("input", ("in.mp4", clip, "application/octet-stream"))])
                else:
                    r = client.post("/v1/jobs/sample", params={"detach": "true"}, json=SAMPLE)
                latencies.append(time.monotonic() - started)
                assert r.status_code == 202, r.text
                return r.json()["id"]

            # several clients at once, so that jobs arrive faster than two slots run them and a queue builds up
            with ThreadPoolExecutor(SUBMITTERS) as pool:
                ids = list(pool.map(submit, range(JOBS)))
            wait_for(lambda: sum(j["status"] == "completed" for j in _records(client).values()) >= KILL_AFTER_COMPLETED, 300)
            order = list(reversed(_records(client)))  # the order the server took them in (its queue's): /v1/jobs lists the newest first
            assert sorted(order) == sorted(ids)
        os.killpg(server.pid, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        server.wait(10)
        left = [pid for pid in _processes_in(work / "jobs") if _is_ffmpeg(pid)]  # it runs in a session of its own: it outlives the server

        with serve_process(work, env=env) as (url2, server2, log2):
            listening_s = time.monotonic() - killed_at
            still_there = [pid for pid in left if pid in _processes_in(work / "jobs")]
            assert not still_there, f"the old server's ffmpeg outlived the restart: {still_there}"
            with httpx.Client(base_url=url2, headers=AUTH, timeout=60) as client:
                deadline = time.monotonic() + 600
                while True:
                    records = _records(client)
                    if all(r["status"] in TERMINAL for r in records.values()) or time.monotonic() > deadline:
                        break
                    time.sleep(0.25)
                starts = {i: _when(r["started_at"]) for i, r in records.items()}
                last_end = max(_when(r["finished_at"]) or 0.0 for r in records.values())
                before = [i for i in order if starts[i] is not None and starts[i] < killed_wall]
                after = [i for i in order if i not in before]
                failed = [i for i in order if records[i]["status"] == "failed"]

                statuses = {s: sum(r["status"] == s for r in records.values()) for s in sorted({r["status"] for r in records.values()})}
                minutes = (last_end - first_submit) / 60
                first_start = min((starts[i] for i in after if starts[i] is not None), default=float("nan")) - killed_wall
                print(f"{JOBS} jobs {statuses} in {minutes * 60:.1f} s: {JOBS / minutes:.0f} jobs/min (the kill and restart included); "
                      f"submit latency p50 {_percentile(latencies, 0.5) * 1000:.0f} ms, p95 {_percentile(latencies, 0.95) * 1000:.0f} ms; "
                      f"recovery: the new server listened {listening_s:.2f} s after the SIGKILL and started the first queued job "
                      f"after {first_start:.2f} s; {len(before)} jobs had started before the kill, {len(after)} were queued again; "
                      f"{len(left)} ffmpeg of the old server's jobs were running at the kill")

                assert set(records) == set(order)
                assert set(statuses) <= {"completed", "failed"}, statuses  # none pending or processing, none lost
                assert after, "the kill came after the last job had started: nothing was queued to survive it"
                # FIFO: the jobs started before the kill are a prefix of the submission order, the rest ran on the new server
                assert before == order[: len(before)]
                assert all(records[i]["status"] == "completed" for i in after)
                late = [(a, b, round(starts[a] - starts[b], 3)) for a, b in zip(after, after[1:]) if starts[b] < starts[a] - 0.05]
                assert not late, f"the new server did not keep the queue's order: {late[:5]}"
                for job_id in failed:  # only the jobs that were running when the server died
                    assert job_id in before and records[job_id]["error"]["message"] == RESTART_MESSAGE, records[job_id]
                    assert (_when(records[job_id]["finished_at"]) or 0.0) >= killed_wall
                    assert records[job_id]["artifacts"] == [] and not (work / "jobs" / job_id).exists()
                assert len(failed) <= 2  # max_concurrent_jobs
                (tmp_path / "check").mkdir()
                downloaded = []
                for job_id in order:  # whole outputs
                    if records[job_id]["status"] == "completed":
                        [art] = records[job_id]["artifacts"]
                        data = client.get(art["url"]).content
                        assert len(data) == art["bytes"] > 0
                        downloaded.append(tmp_path / "check" / f"{job_id}.mp4")
                        downloaded[-1].write_bytes(data)
                _decode(downloaded)
            assert not any("Traceback" in line for line in log2)


def _is_ffmpeg(pid: int) -> bool:
    try:
        return b"ffmpeg" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _decode(paths: list[Path]) -> None:
    """ffmpeg decodes every frame of every stream of each file without an error. One ffmpeg with an input per
    file (it reports an error as one of input ``in#N``'s), not a process per file: 170 of those took ~3 CPU s."""
    inputs = [arg for path in paths for arg in ("-i", str(path))]
    maps = [arg for i in range(len(paths)) for arg in ("-map", str(i))]
    run = subprocess.run([ffmpeg_exe(), "-v", "error", *inputs, *maps, "-f", "null", "-"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and not run.stderr.strip(), (run.stderr, [f"in#{i}: {path.name}" for i, path in enumerate(paths)])
