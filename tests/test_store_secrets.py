"""The job store keeps no secrets, is private to its owner, and keeps no row for a job that never started."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest


SMALL = ["--set", "output_width=90", "--set", "output_height=160"]
KEY = "sk-test-" + "7" * 24


@pytest.fixture
def db(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store" / "jobs.sqlite3"
    monkeypatch.setenv("SYNAPSE_JOBS_DB", str(path))
    return path


def rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, status, flags FROM jobs ORDER BY created_at").fetchall()
    finally:
        conn.close()


def test_api_key_is_never_stored_nor_shown(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", "--api-key", KEY, *SMALL)
    assert run.exit_code == 0, run.stderr
    job_id = run.stdout.strip()
    waited = cli("jobs", "wait", job_id)
    assert waited.exit_code == 0, waited.stderr
    shown = cli("jobs", "show", job_id, "--json")
    assert KEY not in shown.stdout and "api_key" not in json.loads(shown.stdout)["flags"]
    assert KEY not in cli("jobs", "list", "--json").stdout
    for f in db.parent.glob("jobs.sqlite3*"):  # nor anywhere in the database, its WAL included
        assert KEY.encode() not in f.read_bytes(), f


def test_a_secret_stored_by_an_older_synapse_is_not_shown(cli, db, tiny, tmp_path):
    assert cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL).exit_code == 0
    conn = sqlite3.connect(db)
    conn.execute("UPDATE jobs SET flags = ?", (json.dumps({"api_key": KEY, "backend": None}),))
    conn.commit()
    conn.close()
    assert KEY not in cli("jobs", "list", "--json").stdout


def test_database_and_its_wal_files_are_owner_only(cli, db, tiny, tmp_path):
    from synapse_cli.store import JobStore

    old = os.umask(0o022)
    try:
        assert cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL).exit_code == 0
        store = JobStore(db)  # while a connection is open, the -wal and -shm files exist
        store.create("export", {}, "local")
        files = sorted(db.parent.glob("jobs.sqlite3*"))
        assert {f.name for f in files} >= {"jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"}
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        store.close()
    finally:
        os.umask(old)


def test_an_existing_world_readable_database_is_made_private(cli, db):
    db.parent.mkdir(parents=True)
    sqlite3.connect(db).close()
    os.chmod(db, 0o644)
    assert cli("jobs", "list").exit_code == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_an_endpoint_detach_that_cannot_reach_it_leaves_no_pending_row(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", "--endpoint", "http://127.0.0.1:9", *SMALL,
              env={"SYNAPSE_HTTP_MAX_RETRIES": "0"})  # fmt: skip
    assert run.exit_code == 3 and "cannot reach http://127.0.0.1:9" in run.stderr
    assert [r[1] for r in rows(db)] == ["failed"]


def test_detach_that_fails_to_start_leaves_no_pending_row(cli, db, tiny, tmp_path):
    db.parent.mkdir(parents=True)
    (db.parent / "logs").write_text("a file where the worker's log folder goes")  # the worker cannot start
    run = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", *SMALL)
    assert run.exit_code != 0
    (job,) = rows(db)
    assert job[1] == "failed"
    assert json.loads(cli("jobs", "show", job[0], "--json").stdout)["error_message"].startswith("could not start")


def test_modal_detach_without_credentials_leaves_no_pending_row(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "-o", tmp_path / "d.mp4", "--use-modal", "--detach", *SMALL)
    assert run.exit_code == 3, run.stderr
    assert [r[1] for r in rows(db)] == ["failed"]


def test_secrets_an_older_synapse_stored_are_scrubbed_from_the_file(cli, db, tiny, tmp_path):
    assert cli("export", tiny, "-o", tmp_path / "a.mp4", *SMALL).exit_code == 0
    conn = sqlite3.connect(db)
    conn.execute("UPDATE jobs SET flags = ?", (json.dumps({"api_key": KEY, "backend": "local"}),))
    conn.execute("ALTER TABLE jobs DROP COLUMN pid_start")
    conn.execute("PRAGMA user_version = 1")  # as synapse with schema 1 left it
    conn.commit()
    conn.close()
    listed = cli("jobs", "list", "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout)["jobs"][0]["flags"] == {"backend": "local"}
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert KEY not in conn.execute("SELECT flags FROM jobs").fetchone()[0]
    conn.close()
