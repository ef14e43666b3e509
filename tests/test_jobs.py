"""Jobs that outlive the terminal: the SQLite store under real concurrency, detached workers, cancel, cache."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import probe, synapse_cmd, wait_for
from tests.modal_fake.fixtures import synapse_deployed


SMALL = ["--set", "output_width=90", "--set", "output_height=160"]


def jobs(cli, *args) -> dict:
    run = cli("jobs", "list", "--json", *args)
    assert run.exit_code == 0, run.stderr
    return json.loads(run.stdout)


def pids_of(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def test_every_run_is_recorded_with_wall_time(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL)
    assert run.exit_code == 0
    bad = cli("export", tmp_path / "missing.mp4", "-o", tmp_path / "b.mp4")
    assert bad.exit_code == 2  # rejected before the job: nothing to record
    listed = jobs(cli)
    assert [j["status"] for j in listed["jobs"]] == ["completed"]
    job = listed["jobs"][0]
    assert job["kind"] == "export" and job["backend"] == "local" and job["wall_s"] > 0
    assert job["result"]["output"] == str(tmp_path / "a.mp4")
    shown = json.loads(cli("jobs", "show", job["id"][:6], "--json").stdout)  # a unique prefix is enough
    assert shown["id"] == job["id"] and shown["spec"]["job"] == "framing"


def test_failed_job_is_recorded_with_its_error(cli, db, clips, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = clips["landscape"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert cli("export", cut, "-o", tmp_path / "o.mp4", *SMALL).exit_code == 1
    job = jobs(cli)["jobs"][0]
    assert job["status"] == "failed" and job["error_code"] == 1 and "ffmpeg exited" in job["error_message"]
    assert jobs(cli, "--status", "failed")["jobs"] and not jobs(cli, "--status", "completed")["jobs"]


def barrier_ffmpeg(path: Path, arrived: Path, party: int, patience_s: int = 120) -> Path:
    """An ``ffmpeg`` that waits until ``party`` of its kind have started (each drops a file in ``arrived``),
    then runs the real one. Alone for ``patience_s``, it exits 1 instead: jobs run one at a time fail.
    Python without site (a few ms to start), polling in-process: a shell loop forked ls, wc, date and sleep
    each turn, about 0.1 CPU s a second for each waiting job, and on a loaded machine the eight wait long."""
    import sys

    from tests.conftest import ffmpeg_exe

    arrived.mkdir()
    path.write_text(
        f"#!{sys.executable} -S\n"
        "import os, sys, time\n"
        f"arrived, party = {str(arrived)!r}, {party}\n"
        f"end = time.monotonic() + {patience_s}\n"  # by the clock: on a loaded machine each turn of the loop is slow
        "open(os.path.join(arrived, str(os.getpid())), 'w').close()\n"
        "while len(os.listdir(arrived)) < party:\n"
        "    if time.monotonic() > end:\n"
        "        sys.exit(f'barrier: error: only {len(os.listdir(arrived))} of {party} arrived')\n"
        "    time.sleep(0.05)\n"
        f"os.execv({ffmpeg_exe()!r}, [{ffmpeg_exe()!r}, *sys.argv[1:]])\n"
    )
    path.chmod(0o755)
    return path


@pytest.mark.slow
def test_eight_concurrent_exports_all_recorded(db, tiny, tmp_path):
    """Eight processes write the store while all eight jobs are running: each job's ffmpeg waits at a
    barrier until all eight have started, so the jobs overlap however the machine schedules them."""
    ffmpeg = barrier_ffmpeg(tmp_path / "ffmpeg", tmp_path / "arrived", party=8)
    env = {**os.environ, "SYNAPSE_FFMPEG": str(ffmpeg)}
    logs = [(tmp_path / f"o{i}.log").open("w+") for i in range(8)]
    procs = [
        subprocess.Popen([*synapse_cmd(), "export", str(tiny), "-o", str(tmp_path / f"o{i}.mp4"), "--no-cache", *SMALL],
                         stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
        for i, log in enumerate(logs)
    ]
    deadline = time.monotonic() + 300
    try:  # until all have exited, or one has failed (whichever it is: run one at a time, it need not be the first)
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]  # every one, each time: any() would stop at the first still running
            if None not in codes or any(codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()  # a no-op once it has exited
            p.wait()
    errs = []
    for log in logs:
        log.seek(0)
        errs.append(log.read())
        log.close()
    assert [p.returncode for p in procs] == [0] * 8, [e for p, e in zip(procs, errs) if p.returncode]
    assert not any("locked" in e for e in errs), errs
    assert len(list((tmp_path / "arrived").iterdir())) == 8
    rows = sqlite3.connect(db).execute("SELECT status, started_at, finished_at FROM jobs").fetchall()
    assert sorted(r[0] for r in rows) == ["completed"] * 8
    # the store's own record: every job started before any finished, so all eight were processing at once
    assert max(r[1] for r in rows) < min(r[2] for r in rows)


def test_identical_job_reuses_the_result_unless_no_cache(cli, db, tiny, tmp_path):
    first = cli("export", tiny, "-o", tmp_path / "a.mp4", "--json", *SMALL)
    second = cli("export", tiny, "-o", tmp_path / "b.mp4", "--json", *SMALL)
    logs = [e["message"] for e in second.events() if e["type"] == "log"]
    assert any("reusing the result of job" in m for m in logs)
    assert (tmp_path / "b.mp4").read_bytes() == (tmp_path / "a.mp4").read_bytes()
    assert second.events()[-1]["result"]["output"] == str(tmp_path / "b.mp4")
    assert not any(e["type"] == "progress" for e in second.events())  # nothing was encoded
    third = cli("export", tiny, "-o", tmp_path / "c.mp4", "--json", "--no-cache", *SMALL)
    assert any(e["type"] == "progress" for e in third.events())
    other_params = cli("export", tiny, "-o", tmp_path / "d.mp4", "--json", "--set", "output_width=100", "--set", "output_height=160")
    assert any(e["type"] == "progress" for e in other_params.events())
    assert first.exit_code == 0


@pytest.mark.slow
def test_two_identical_jobs_started_together_run_once(db, clips, tmp_path):
    procs = [
        subprocess.Popen([*synapse_cmd(), "export", str(clips["landscape"]), "-o", str(tmp_path / f"o{i}.mp4"), "--json", *SMALL],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    encodes = [sum(json.loads(ln)["type"] == "progress" and json.loads(ln).get("phase") == "encode" for ln in out.splitlines()) > 0 for out, _ in results]
    reused = ["reusing the result" in out or "already running" in out for out, _ in results]
    assert sorted(reused) == [False, True], results
    assert (tmp_path / "o0.mp4").read_bytes() == (tmp_path / "o1.mp4").read_bytes()
    assert encodes.count(True) >= 1


def test_detach_then_wait(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", *SMALL)
    assert run.exit_code == 0, run.stderr
    job_id = run.stdout.strip()
    assert job_id.startswith("j")
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr
    assert waited.events()[-1]["type"] == "finished"
    assert probe(tmp_path / "d.mp4").width == 90
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["status"] == "completed"


def test_wait_exits_with_the_failed_jobs_code(cli, db, clips, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = clips["landscape"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    job_id = cli("export", cut, "-o", tmp_path / "o.mp4", "--detach", *SMALL).stdout.strip()
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 1
    assert waited.events()[-1]["type"] == "error" and "ffmpeg exited" in waited.events()[-1]["message"]


@pytest.mark.slow
def test_cancel_a_running_local_export(cli, db, long_clip, tmp_path):
    out = tmp_path / "o.mp4"
    job_id = cli("export", long_clip, "-o", out, "--detach", env={"SYNAPSE_FFMPEG_PRESET": "medium"}).stdout.strip()
    wait_for(lambda: json.loads(cli("jobs", "show", job_id, "--json").stdout)["done"])  # encoding
    assert pids_of(str(tmp_path)), "no ffmpeg running"
    start = time.monotonic()
    run = cli("jobs", "cancel", job_id)
    assert run.exit_code == 0, run.stderr
    wait_for(lambda: not pids_of(str(tmp_path)), timeout=2.0)
    assert time.monotonic() - start < 2.5
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["status"] == "cancelled"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == []  # no partial output
    assert cli("jobs", "wait", job_id).exit_code == 130


@pytest.mark.slow
def test_sigkilled_worker_is_marked_failed(cli, db, long_clip, tmp_path):
    job_id = cli("export", long_clip, "-o", tmp_path / "o.mp4", "--detach", env={"SYNAPSE_FFMPEG_PRESET": "medium"}).stdout.strip()
    job = wait_for(lambda: (j := json.loads(cli("jobs", "show", job_id, "--json").stdout))["done"] and j)
    os.kill(job["pid"], signal.SIGKILL)
    wait_for(lambda: subprocess.run(["ps", "-p", str(job["pid"]), "-o", "stat="], capture_output=True, text=True).stdout.strip() in ("", "Z"))
    for pid in pids_of(str(tmp_path)):  # its ffmpeg, orphaned by the kill
        os.kill(int(pid), signal.SIGKILL)
    listed = jobs(cli)["jobs"]
    assert listed[0]["id"] == job_id and listed[0]["status"] == "failed"
    assert "stale heartbeat" in listed[0]["error_message"]


def test_newer_schema_is_refused_and_kept(cli, db):
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.execute("CREATE TABLE jobs (id TEXT)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    run = cli("jobs", "list")
    assert run.exit_code == 2
    assert "schema 99" in run.stderr and "SYNAPSE_JOBS_DB" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert db.read_bytes() == before


def test_corrupt_database_is_refused_and_kept(cli, db, tiny, tmp_path):
    db.write_bytes(b"this is not sqlite" * 100)
    run = cli("export", tiny, "-o", tmp_path / "o.mp4")
    assert run.exit_code == 2 and "move it aside" in run.stderr
    assert db.read_bytes() == b"this is not sqlite" * 100
    assert not (tmp_path / "o.mp4").exists()


def test_prune_and_list_totals(cli, db, tiny, tmp_path):
    cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL)
    assert cli("jobs", "prune", "--older-than", "1h").stdout.strip() == "pruned 0 job(s)"
    conn = sqlite3.connect(db)
    conn.execute("UPDATE jobs SET created_at = created_at - 691200, started_at = started_at - 691200, finished_at = finished_at - 691200")  # ran 8 days ago
    conn.commit()
    listed = jobs(cli)
    assert listed["total_wall_s"] > 0 and listed["total_cost_usd"] == 0
    assert cli("jobs", "prune", "--older-than", "7d").stdout.strip() == "pruned 1 job(s)"
    assert jobs(cli)["jobs"] == []
    assert cli("jobs", "prune", "--older-than", "soon").exit_code == 2


def test_the_prune_query_reads_an_index_not_the_whole_table(cli, db, tiny, tmp_path):
    from synapse_cli.store import ENDED_BEFORE

    cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL)  # makes the store, as any run does
    conn = sqlite3.connect(db)
    plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + ENDED_BEFORE, (time.time(),)))
    assert "USING INDEX jobs_ended" in plan, plan
    conn.execute("DROP INDEX jobs_ended")  # a store made by a synapse before the index
    conn.commit()
    assert cli("jobs", "prune", "--older-than", "7d").exit_code == 0
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs_ended'").fetchone() is not None


def test_github_step_summary(cli, db, tiny, tmp_path):
    summary = tmp_path / "summary.md"
    run = cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert run.exit_code == 0
    text = summary.read_text()
    assert "| job | backend | status | time | output |" in text
    assert "| export | local | completed |" in text and str(tmp_path / "a.mp4") in text


# -- Modal: .spawn() a wrapper, progress through a Dict ------------------------------------


@pytest.fixture
def deployed(modal_deployment, monkeypatch):
    with synapse_deployed(modal_deployment, monkeypatch) as fake:
        yield fake


def test_modal_detach_wait_downloads_the_output_and_reports_cost(cli, db, deployed, tiny, tmp_path):
    out = tmp_path / "remote.mp4"
    run = cli("export", tiny, "--use-modal", "--detach", "--json", "-o", out, *SMALL)
    assert run.exit_code == 0, run.stderr
    job_id = json.loads(run.stdout)["job_id"]
    assert deployed.function_calls[-1].function_name == "export_detached"
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr
    result = waited.events()[-1]["result"]
    assert result["output"] == str(out) and probe(out).width == 90
    assert result["modal"]["gpu"] is None and result["modal"]["estimated_cost_usd"] >= 0
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "completed" and shown["remote"]["call_id"]


def test_modal_detached_cancel(cli, db, deployed, long_clip, tmp_path):
    run = cli("export", long_clip, "--use-modal", "--detach", "-o", tmp_path / "o.mp4", env={"SYNAPSE_FFMPEG_PRESET": "medium"})
    job_id = run.stdout.strip()
    wait_for(lambda: deployed.function_calls and deployed.function_calls[-1].outcome == "running")
    assert cli("jobs", "cancel", job_id).exit_code == 0
    wait_for(lambda: deployed.function_calls[-1].outcome == "cancelled")
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["status"] == "cancelled"
