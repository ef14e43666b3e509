"""Running a job again in the same process (CliRunner, the Python API) never waits on a row nobody will end.

Every run ends its row in a final state, whether it fails before the job starts (a bad input found
by the backend, a refused --shards) or after; and a row of this process that no run here is
executing any more (its final write lost) is not followed by an identical job, which would wait for ever.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.modal_fake.fixtures import synapse_deployed

from synapse_cli.store import ORPHANED, JobStore

DEADLINE_S = 60.0  # a rerun takes a second or two; before the fix it waited for ever


def within(db: Path, seconds: float, call: Callable[[], Any]) -> Any:
    """``call()`` in a thread, which must end within ``seconds``: returns its value or raises its exception.

    If it is still running then, every active row is failed so the waiter ends (and with it the
    CliRunner's redirection of stdout), and the test fails."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE jobs SET status = 'failed', error_code = 1, error_message = 'ended by the test' "
                         "WHERE status IN ('pending', 'processing')")  # fmt: skip
        thread.join(30)
        raise AssertionError(f"the rerun was still running after {seconds:g} s: it waited on a row nobody will end")
    if "error" in box:
        raise box["error"]
    return box["value"]


def rows(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT id, status, error_code, error_message FROM jobs ORDER BY created_at")]


@pytest.fixture
def deployed(modal_deployment, monkeypatch):  # modal_deployment skips the test where modal is not installed
    with synapse_deployed(modal_deployment, monkeypatch) as fake:
        yield fake


def test_a_modal_run_refused_before_it_starts_ends_its_row_and_an_identical_rerun_ends_too(cli, deployed, db, tmp_path):
    notes = tmp_path / "notes.mp4"  # a text file renamed .mp4: found out when --shards auto probes it, before any call
    notes.write_text("not a video, only its name says so\n")
    args = ("export", notes, "--use-modal", "-o", tmp_path / "out.mp4")

    first = cli(*args)
    assert first.exit_code == 2, first.stderr
    line = first.stderr.strip()
    assert line.startswith("UsageError: ") and "is not readable media" in line and len(first.stderr.splitlines()) == 1
    (row,) = rows(db)
    assert (row["status"], row["error_code"]) == ("failed", 2)
    assert row["error_message"] == line.removeprefix("UsageError: ")

    again = within(db, DEADLINE_S, lambda: cli(*args))  # the same process: before the fix, it followed the first row
    assert (again.exit_code, again.stderr.strip()) == (2, line)
    assert [(r["status"], r["error_code"]) for r in rows(db)] == [("failed", 2), ("failed", 2)]
    assert deployed.function_calls == []  # neither run got as far as a Modal call


def test_a_local_run_refused_before_it_starts_ends_its_row_and_an_identical_rerun_ends_too(db, tmp_path, monkeypatch):
    from synapse_cli import api
    from synapse_cli.errors import UsageError

    monkeypatch.setenv("SYNAPSE_SHARDS_COUNT", "2")  # sample does not shard: refused once the backend is chosen, after the row exists
    run = lambda: api.run("sample", str(tmp_path / "s.mp4"), seconds=0.5, size="64x64")  # noqa: E731

    with pytest.raises(UsageError, match="sample jobs do not shard") as first:
        run()
    assert first.value.exit_code == 2
    (row,) = rows(db)
    assert (row["status"], row["error_code"], row["error_message"]) == ("failed", 2, "--shards: sample jobs do not shard")

    with pytest.raises(UsageError, match="sample jobs do not shard"):
        within(db, DEADLINE_S, run)
    assert [r["status"] for r in rows(db)] == ["failed", "failed"]
    assert not (tmp_path / "s.mp4").exists()


def test_a_row_of_this_process_that_no_run_here_executes_is_not_followed(cli, db, tmp_path):
    args = ("sample", "--seconds", "0.5", "--size", "64x64", "--no-audio", "--json")
    assert cli(*args, tmp_path / "a.mp4").exit_code == 0
    with sqlite3.connect(db) as conn:  # as if that run's final write had been lost (a store locked past its timeout)
        conn.execute("UPDATE jobs SET status = 'processing', finished_at = NULL, result = NULL")
        conn.execute("DELETE FROM events WHERE json_extract(event, '$.type') IN ('artifact', 'finished')")  # written with the state
    (lost,) = rows(db)

    again = within(db, DEADLINE_S, lambda: cli(*args, tmp_path / "b.mp4"))
    assert again.exit_code == 0, again.stderr
    events = again.events()
    assert not any("already running the same job" in e.get("message", "") for e in events)
    assert events[-1]["type"] == "finished" and events[-1]["result"]["output"] == str(tmp_path / "b.mp4")
    assert (tmp_path / "b.mp4").stat().st_size > 0
    statuses = {r["id"]: (r["status"], r["error_message"]) for r in rows(db)}
    assert statuses.pop(lost["id"]) == ("failed", ORPHANED)
    assert list(statuses.values()) == [("completed", None)]


def test_a_row_a_run_here_still_executes_is_followed_until_released(db):
    store = JobStore(db)
    try:
        running, other = store.claim_or_find("export", {"input": "a.mp4"}, "local", "key")
        assert other is None
        follower, other = store.claim_or_find("export", {"input": "a.mp4"}, "local", "key")
        assert other is not None and other.id == running.id  # another thread of this process runs it: wait for it
        store.release(running.id)
        store.release(follower.id)  # both runs ended without writing their end
        third, other = store.claim_or_find("export", {"input": "a.mp4"}, "local", "key")
        assert other is None
        assert {store.get(j.id).status for j in (running, follower)} == {"failed"}
        assert store.get(running.id).error_message == ORPHANED
        assert store.get(third.id).status == "processing"
    finally:
        store.close()


def test_a_detached_row_of_this_process_is_still_followed(db):
    """``--detach`` rows carry this process's pid until their worker takes them: theirs to end, never failed here."""
    store = JobStore(db)
    try:
        detached = store.create("export", {"input": "a.mp4"}, "local", cache_key="key", detached=True)
        job, other = store.claim_or_find("export", {"input": "a.mp4"}, "local", "key")
        assert other is not None and other.id == detached.id and store.get(detached.id).status == "pending"
        store.release(job.id)
    finally:
        store.close()




def test_a_detached_local_job_refused_as_its_worker_starts_it_fails_with_its_own_error(db, tmp_path, monkeypatch):
    """The worker process had the same hole: its row ended "the worker stopped without finishing", not why."""
    from synapse_cli import api
    from synapse_cli.errors import UsageError

    monkeypatch.setenv("SYNAPSE_SHARDS_COUNT", "2")  # reaches the worker through its environment; sample does not shard
    job = api.submit("sample", str(tmp_path / "s.mp4"), seconds=0.5, size="64x64")
    with pytest.raises(UsageError, match="sample jobs do not shard") as waited:
        within(db, DEADLINE_S, job.wait)
    assert waited.value.exit_code == 2
    (row,) = rows(db)
    assert (row["id"], row["status"], row["error_code"], row["error_message"]) == (job.id, "failed", 2, "--shards: sample jobs do not shard")
