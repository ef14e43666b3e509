"""A detached job is keyed in the result cache like an attached one."""

from __future__ import annotations

import json

import pytest


SMALL = ["--set", "output_width=90", "--set", "output_height=160"]


def test_an_identical_job_after_a_detached_one_reuses_its_result(cli, db, tiny, tmp_path):
    job_id = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", *SMALL).stdout.strip()
    assert cli("jobs", "wait", job_id).exit_code == 0
    again = cli("export", tiny, "-o", tmp_path / "a.mp4", "--json", *SMALL)
    assert again.exit_code == 0, again.stderr
    assert any(e["type"] == "log" and f"reusing the result of job {job_id}" in e["message"] for e in again.events())
    assert not any(e["type"] == "progress" for e in again.events())  # nothing was encoded
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "d.mp4").read_bytes()


def test_a_detached_no_cache_job_has_no_key(cli, db, tiny, tmp_path):
    job_id = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", "--no-cache", *SMALL).stdout.strip()
    assert cli("jobs", "wait", job_id).exit_code == 0
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["cache_key"] is None


def test_an_identical_job_runs_rather_than_wait_on_a_detached_remote_one(cli, db, tiny, tmp_path):
    """A detached Modal or endpoint job's events reach this store only while `synapse jobs wait` runs, so an
    identical job must not follow it (it waited for ever): it runs itself."""
    import sqlite3
    import subprocess
    import time

    from tests.conftest import synapse_cmd

    assert cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL).exit_code == 0
    with sqlite3.connect(db) as conn:  # that job, as if it were detached to an endpoint and still running there
        (count,) = conn.execute(
            "UPDATE jobs SET status = 'processing', detached = 1, backend = 'http', pid = NULL, heartbeat_at = ?, "
            "remote = '{\"endpoint\": \"http://127.0.0.1:9\", \"id\": \"x\"}' RETURNING 1", (time.time(),)
        ).fetchone()
    proc = subprocess.run([*synapse_cmd(), "export", str(tiny), "-o", str(tmp_path / "b.mp4"), "--json", *SMALL],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not any("already running the same job" in e.get("message", "") for e in events)
    assert any(e["type"] == "progress" for e in events) and (tmp_path / "b.mp4").stat().st_size > 0


@pytest.mark.slow
def test_a_copy_under_another_name_runs_rather_than_reuse_results_naming_the_first(cli, db, tmp_path):
    """infer's results name their source: the same bytes under another path must not be answered with
    a file naming the other path. Under the same path, the result is reused as before."""
    from tests.conftest import bus_image

    first, copy = bus_image(tmp_path / "a" / "bus.jpg"), bus_image(tmp_path / "b" / "bus.jpg")
    assert cli("infer", first, "-o", tmp_path / "first.json").exit_code == 0
    run = cli("infer", copy, "-o", tmp_path / "copy.json", "--json")
    assert run.exit_code == 0, run.stderr
    assert not any("reusing the result" in e.get("message", "") for e in run.events())
    assert json.loads((tmp_path / "copy.json").read_text())["source"] == str(copy)
    again = cli("infer", copy, "-o", tmp_path / "again.json", "--json")
    assert again.exit_code == 0, again.stderr
    assert any("reusing the result" in e.get("message", "") for e in again.events())
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "copy.json").read_bytes()
