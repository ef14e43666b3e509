"""Recording is best-effort: a job store that fails mid-run costs a warning, never the job."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import make_clip, probe, synapse_cmd

SMALL = ["--set", "output_width=90", "--set", "output_height=160"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", size="1280x720", seconds=24)


@pytest.mark.slow
def test_a_store_locked_mid_run_does_not_stop_the_export(tmp_path, clip, monkeypatch):
    db = tmp_path / "jobs.sqlite3"
    monkeypatch.setenv("SYNAPSE_JOBS_DB", str(db))
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
