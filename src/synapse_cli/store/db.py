"""The job store: one SQLite row per job plus its events, so jobs outlive the terminal.

Every run is recorded, attached or detached. Several synapse processes write at
once (CI runs exports in parallel), so the database is in WAL mode, every write
is a short ``BEGIN IMMEDIATE`` transaction, and connections wait on a busy
lock rather than failing. A job whose worker died (SIGKILL, a lost machine) is
found by its process id (checked with its start time, so a reused pid is not
taken for it) or, where that cannot be checked, by its stale heartbeat, and
marked ``failed`` the next time anyone reads the table. A live local worker is
never reaped. The file is private (0600): it holds paths and parameters, never
secrets (settings the config registry marks ``secret`` are dropped).

States: pending → processing → completed | failed | cancelled. Ended jobs are deleted, events and
all, by ``prune_ended`` (``synapse jobs prune``; ``synapse serve`` after ``[serve] keep_jobs_days``).
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Iterator

from synapse_cli.errors import UsageError
from synapse_cli.storage.urls import redact_text, redact_values
from synapse_cli.store.rows import Job, _alive, _row_to_job, pid_start_time, this_host, without_secrets

SCHEMA_VERSION = 2
STATES = ("pending", "processing", "completed", "failed", "cancelled")
ACTIVE = ("pending", "processing")
HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0
PENDING_GRACE_S = 120.0  # a pending row nobody can vouch for (no local pid) gets this long to start
BUSY_TIMEOUT_S = 30.0  # how long a write waits for the lock by default
WAL_LIMIT_BYTES = 16 * 1024 * 1024  # after a checkpoint, the -wal file is cut back to this
REAPED = "the worker stopped without finishing (killed or lost; stale heartbeat)"
NEVER_STARTED = "the worker never started (killed or lost before it began)"
ORPHANED = "its run in this process ended without recording its end"

# the attached runs (claim_or_find rows) this process is executing now: its own pid alone cannot tell
# a row whose run ended without its final write (a locked store) from one a thread is still running
_RUNNING_HERE: set[str] = set()

# the jobs that ended before a time: matches the partial index _ENDED_INDEX exactly (expression and condition)
ENDED_BEFORE = "SELECT id FROM jobs WHERE status NOT IN ('pending','processing') AND COALESCE(finished_at, created_at) < ?"

# what prune_ended looks for (ENDED_BEFORE): a partial index on the same expression, so it never scans the table
_ENDED_INDEX = "CREATE INDEX IF NOT EXISTS jobs_ended ON jobs(COALESCE(finished_at, created_at)) WHERE status NOT IN ('pending','processing')"

# webhook deliveries (synapse_cli.notify): one row per message, what became of it; added within schema 2
# (a table an older synapse never reads), created on open where missing
_DELIVERIES = """CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    http_status INTEGER,
    detail TEXT,
    PRIMARY KEY (job_id, seq)
)"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    backend TEXT NOT NULL,
    spec TEXT NOT NULL,
    cache_key TEXT,
    detached INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    host TEXT,
    pid INTEGER,
    pid_start INTEGER,
    done REAL,
    total REAL,
    phase TEXT,
    result TEXT,
    error_code INTEGER,
    error_message TEXT,
    remote TEXT,
    flags TEXT,
    gpu TEXT,
    cost_usd REAL
);
CREATE INDEX IF NOT EXISTS jobs_cache ON jobs(cache_key, status);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


def default_db_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("synapse", appauthor=False)) / "jobs.sqlite3"


def new_job_id() -> str:
    return "j" + os.urandom(6).hex()  # what secrets.token_hex(6) does, without importing secrets (7 ms)


def _private(path: Path) -> None:
    """Create ``path`` owner-only, or make it so: SQLite gives its -wal/-shm files the database's mode."""
    try:
        if not path.exists():
            # only a new file is opened here: closing any descriptor of a file drops every POSIX lock this
            # process holds on it, the locks of our other SQLite connections to it included
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        pass
    try:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
            if p.exists() and p.stat().st_mode & 0o077 and p.stat().st_uid == os.geteuid():
                os.chmod(p, 0o600)
    except OSError:  # not ours, or read-only: SQLite says what it can and cannot do
        pass


class JobStore:
    """A handle on the SQLite job store. Cheap to open; one connection per process."""

    def __init__(self, path: Path | str, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _private(self.path)
            self.db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.busy_timeout_s = busy_timeout_s
            self.set_busy_timeout(busy_timeout_s)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UsageError(
                    f"job store {self.path} has schema {version}, newer than this synapse understands ({SCHEMA_VERSION}): "
                    "upgrade synapse, or set [jobs] db / SYNAPSE_JOBS_DB to another file"
                )
            if version == 0:
                # a new file: freed pages can go back to the file system (prune_ended). Only possible before the
                # first table, and before WAL (switching to WAL writes the header, and the setting is ignored after)
                self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._use_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            # WAL + NORMAL: no fsync per progress write (a crash can lose the last events, never corrupt the file)
            self.db.execute("PRAGMA synchronous = NORMAL")
            # the WAL file keeps the size of its largest burst (a prune deleting a million events) unless told otherwise
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
            if version < SCHEMA_VERSION:
                with self.transaction() as db:  # executescript would commit on its own: one statement at a time
                    version = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have just done it
                    if version == 1:
                        db.execute("ALTER TABLE jobs ADD COLUMN pid_start INTEGER")
                        for row in db.execute("SELECT id, flags FROM jobs WHERE flags IS NOT NULL").fetchall():  # an older synapse kept --api-key
                            kept = without_secrets(json.loads(row["flags"]))
                            if kept != json.loads(row["flags"]):
                                db.execute("UPDATE jobs SET flags = ? WHERE id = ?", (json.dumps(kept), row["id"]))
                    if version < SCHEMA_VERSION:
                        for statement in filter(str.strip, _SCHEMA.split(";")):
                            db.execute(statement)
                        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'jobs_ended'").fetchone() is None:
                # added within schema 2 (an index changes nothing an older synapse reads): a store made before it gains it here
                with self.transaction() as db:
                    db.execute(_ENDED_INDEX)
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'deliveries'").fetchone() is None:
                with self.transaction() as db:
                    db.execute(_DELIVERIES)
        except sqlite3.DatabaseError as exc:
            raise UsageError(
                f"job store {self.path} cannot be used ({exc}): move it aside, or set [jobs] db / SYNAPSE_JOBS_DB to another file"
            ) from None

    def _use_wal(self) -> None:
        """Switch a new database to WAL. The switch needs the file to itself: when several processes
        create the store at once, the ones that find it busy wait their turn (or see it done)."""
        for _ in range(100):
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    return
                self.db.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            time.sleep(0.05)

    @classmethod
    def from_settings(cls, settings: Any) -> "JobStore":
        return cls(settings["jobs.db"] or default_db_path())

    def close(self) -> None:
        self.db.close()

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another process's lock before it fails with "database is locked"."""
        self.db.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: take the write lock up front, so check-then-write is atomic across processes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a failed COMMIT too: never leave the connection inside a transaction
                self.db.execute("ROLLBACK")
            raise

    # -- writes -------------------------------------------------------------------

    def create(self, kind: str, spec: dict[str, Any], backend: str, cache_key: str | None = None, detached: bool = False,
               status: str = "pending", flags: dict[str, Any] | None = None, job_id: str | None = None) -> Job:
        """A new row. Until a worker takes it (``set_pid``/``start``), this process answers for it:
        while it lives the row is never reaped; once it is gone, a ``pending`` row is.

        ``job_id``: the id to use (``synapse serve`` names a row after the job's folder), else a new one."""
        job = Job(id=job_id or new_job_id(), kind=kind, status=status, backend=backend, spec=spec, cache_key=cache_key, detached=detached,
                  created_at=time.time(), flags=without_secrets(flags), pid=os.getpid(), pid_start=pid_start_time(os.getpid()))
        with self.transaction() as db:
            self._insert(db, job)
        return job

    def _insert(self, db: sqlite3.Connection, job: Job) -> None:
        db.execute(
            "INSERT INTO jobs (id, kind, status, backend, spec, cache_key, detached, created_at, host, flags, pid, pid_start) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (job.id, job.kind, job.status, job.backend, json.dumps(redact_values(job.spec)), job.cache_key, int(job.detached), job.created_at,
             this_host(), json.dumps(without_secrets(job.flags)) if job.flags is not None else None, job.pid, job.pid_start),
        )

    def claim_or_find(self, kind: str, spec: dict[str, Any], backend: str, cache_key: str | None) -> tuple[Job, Job | None]:
        """Atomically: the completed or running job with this cache key if there is one, else a new row of ours.

        Returns (our job, the job whose result we can reuse or follow, or None). Our job counts as
        running in this process until ``release``; an attached job of this process that no longer
        does is never returned to follow (nobody would end it while we waited): it is failed here.
        """
        self.reap()
        me, me_start, host = os.getpid(), pid_start_time(os.getpid()), this_host()
        with self.transaction() as db:
            other, orphans = None, []
            if cache_key:
                rows = db.execute(
                    "SELECT * FROM jobs WHERE cache_key = ? AND status IN ('completed','processing','pending') "
                    "ORDER BY (status = 'completed') DESC, created_at DESC",
                    (cache_key,),
                )
                for row in rows:  # read one at a time: the first is nearly always the one
                    candidate = _row_to_job(row)
                    if (candidate.status in ACTIVE and not candidate.detached and candidate.remote is None and candidate.host == host
                            and candidate.pid == me and candidate.pid_start == me_start and candidate.id not in _RUNNING_HERE):
                        orphans.append(candidate.id)
                        continue
                    other = candidate
                    break
                rows.close()
            db.executemany("UPDATE jobs SET status = 'failed', finished_at = ?, error_code = 1, error_message = ? WHERE id = ?",
                           [(time.time(), ORPHANED, i) for i in orphans])
            job = Job(id=new_job_id(), kind=kind, status="processing", backend=backend, spec=spec, cache_key=cache_key, created_at=time.time(),
                      pid=me, pid_start=me_start)
            self._insert(db, job)
            now = time.time()
            db.execute("UPDATE jobs SET started_at = ?, heartbeat_at = ? WHERE id = ?", (now, now, job.id))
            job.started_at = job.heartbeat_at = now
            _RUNNING_HERE.add(job.id)  # before the commit: another thread's claim cannot see the row without it
        return job, other

    def release(self, job_id: str) -> None:
        """The run of ``job_id`` (a ``claim_or_find`` row) in this process is over, its final state written or not."""
        _RUNNING_HERE.discard(job_id)

    def start(self, job_id: str, pid: int | None = None) -> bool:
        """The worker takes a ``pending`` job: ``processing``, with its pid and the pid's start time.

        False when the job is no longer pending (cancelled or reaped first): the worker must not run it."""
        now = time.time()
        pid = pid or os.getpid()
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'processing', started_at = COALESCE(started_at, ?), heartbeat_at = ?, pid = ?, pid_start = ?, "
                "host = ? WHERE id = ? AND status IN ('pending', 'processing')",
                (now, now, pid, pid_start_time(pid), this_host(), job_id),
            )
            return cur.rowcount == 1

    def adopt(self, job_id: str, from_pid: int | None) -> bool:
        """This process takes over a ``pending`` row of a process that died (``from_pid``), to run it itself.
        False when the row is no longer that process's pending row (another process took it, or it ended)."""
        with self.transaction() as db:
            cur = db.execute("UPDATE jobs SET pid = ?, pid_start = ?, host = ? WHERE id = ? AND status = 'pending' AND pid IS ?",
                             (os.getpid(), pid_start_time(os.getpid()), this_host(), job_id, from_pid))
            return cur.rowcount == 1

    def append_events(self, job_id: str, events: list[dict[str, Any]], progress: dict[str, Any] | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
            db.executemany(
                "INSERT INTO events (job_id, seq, ts, event) VALUES (?,?,?,?)",
                [(job_id, seq + i + 1, now, json.dumps(redact_values(e), default=str)) for i, e in enumerate(events)],
            )
            if progress:
                db.execute(
                    "UPDATE jobs SET done = ?, total = ?, phase = ?, heartbeat_at = ? WHERE id = ?",
                    (progress.get("done"), progress.get("total"), progress.get("phase"), now, job_id),
                )
            else:
                db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (now, job_id))

    def heartbeat(self, job_id: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND status = 'processing'", (time.time(), job_id))

    def fail_dead(self, job_id: str, pid: int | None, code: int, message: str) -> bool:
        """Mark job ``job_id`` failed if it is still the active row of process ``pid`` (a conditional
        update: a row another process took over meanwhile is left alone). True when it was marked."""
        with self.transaction() as db:
            cur = db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error_code = ?, error_message = ? "
                             "WHERE id = ? AND status IN ('pending','processing') AND pid IS ?", (time.time(), code, message, job_id, pid))
        return cur.rowcount > 0

    def finish(self, job_id: str, status: str, result: dict[str, Any] | None = None, error_code: int | None = None,
               error_message: str | None = None, gpu: str | None = None, cost_usd: float | None = None) -> None:
        assert status in ("completed", "failed", "cancelled")
        with self.transaction() as db:
            # a job reaped by mistake (its host silent past STALE_AFTER_S) that completes after all keeps its result
            db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, result = ?, error_code = ?, error_message = ?, "
                "gpu = COALESCE(?, gpu), cost_usd = COALESCE(?, cost_usd) WHERE id = ? AND "
                "(status IN ('pending','processing') OR (? = 'completed' AND status = 'failed' AND error_message = ?))",
                (status, time.time(), json.dumps(redact_values(result)) if result is not None else None, error_code,
                 redact_text(error_message) if error_message else error_message, gpu, cost_usd, job_id,
                 status, REAPED),
            )

    def add_delivery(self, job_id: str, delivery: dict[str, Any], target: str | None = None) -> None:
        """What became of one webhook message of the job (``notify.Delivery.to_dict()``); ``target`` is
        the URL with its user info and query left out (``netguard.redact``)."""
        with self.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM deliveries WHERE job_id = ?", (job_id,)).fetchone()[0]
            db.execute(
                "INSERT INTO deliveries (job_id, seq, at, event, webhook_id, target, outcome, attempts, http_status, detail) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, seq + 1, delivery.get("at") or time.time(), delivery["event"], delivery["webhook_id"], target, delivery["outcome"],
                 delivery["attempts"], delivery.get("http_status"), delivery.get("detail")),
            )

    def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        """The job's webhook deliveries, oldest first."""
        rows = self.db.execute(
            "SELECT event, webhook_id, target, outcome, attempts, http_status, detail, at FROM deliveries WHERE job_id = ? ORDER BY seq",
            (job_id,),
        ).fetchall()
        return [dict(r) for r in rows]

    def set_remote(self, job_id: str, remote: dict[str, Any], gpu: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET remote = ?, gpu = COALESCE(?, gpu) WHERE id = ?", (json.dumps(remote), gpu, job_id))

    def set_pid(self, job_id: str, pid: int) -> None:
        """The worker process of a ``pending`` job, with its start time (so a later reuse of the pid is told apart)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET pid = ?, pid_start = ?, host = ? WHERE id = ?", (pid, pid_start_time(pid), this_host(), job_id))

    def prune(self, older_than_s: float) -> int:
        """``prune_ended``, counted (``synapse jobs prune``)."""
        return len(self.prune_ended(older_than_s))

    def prune_ended(self, older_than_s: float, keep: Collection[str] = ()) -> list[str]:
        """Delete the jobs that ended (completed, failed, cancelled) more than ``older_than_s`` ago,
        their events with them, in one transaction; return their ids. A pending or processing job is
        never deleted, however old, nor one whose id is in ``keep`` (a job its server still winds up).

        The freed pages go back to the file system (``incremental_vacuum``; a store created before
        ``auto_vacuum`` was set keeps them on its free list, where new rows reuse them), so a store
        pruned regularly stops growing."""
        cutoff = time.time() - older_than_s
        with self.transaction() as db:
            rows = db.execute(ENDED_BEFORE, (cutoff,)).fetchall()
            ids = [r["id"] for r in rows if r["id"] not in keep]
            # events explicitly, not by ON DELETE CASCADE alone: that needs foreign_keys on in the connection that deletes
            db.executemany("DELETE FROM events WHERE job_id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM deliveries WHERE job_id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        if ids:
            # executescript steps the pragma to its end: execute() frees a single page per call
            self.db.executescript("PRAGMA incremental_vacuum")
        return ids

    # -- reads --------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        self.reap()
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            rows = self.db.execute("SELECT * FROM jobs WHERE id LIKE ? LIMIT 2", (job_id + "%",)).fetchall()
            if len(rows) != 1:
                raise UsageError(f"no job {job_id!r} in {self.path}" if not rows else f"job id {job_id!r} is ambiguous")
            row = rows[0]
        return _row_to_job(row)

    def find(self, job_id: str) -> Job | None:
        """The job with exactly this id, or None (no prefix matching, no reaping: the server's lookups)."""
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def list(self, status: str | None = None, limit: int = 200, reap: bool = True) -> list[Job]:
        if reap:
            self.reap()
        if status:
            rows = self.db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY created_at DESC LIMIT ?", (status, limit))
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_row_to_job(r) for r in rows.fetchall()]

    def events(self, job_id: str, after: int = 0, limit: int | None = None, type: str | None = None) -> builtins.list[tuple[int, dict[str, Any]]]:
        """The job's events with ``seq > after`` (seq counts from 1), oldest first; at most ``limit``;
        only those whose ``type`` is ``type`` when given."""
        sql, args = "SELECT seq, event FROM events WHERE job_id = ? AND seq > ?", [job_id, after]
        if type is not None:
            sql += " AND json_extract(event, '$.type') = ?"
            args.append(type)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self.db.execute(sql, args).fetchall()
        return [(r["seq"], json.loads(r["event"])) for r in rows]

    def last_event(self, job_id: str) -> tuple[int, dict[str, Any]] | None:
        row = self.db.execute("SELECT seq, event FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT 1", (job_id,)).fetchone()
        return (row["seq"], json.loads(row["event"])) if row else None

    def reap(self) -> builtins.list[str]:
        """Mark ``failed`` every job whose worker is gone; return their ids.

        - A worker on this host (its pid recorded) is judged by its pid alone: alive (same pid, same
          start time) means never reaped, however stale its heartbeat (a long lock, a suspended laptop);
          gone means reaped at once.
        - Otherwise (another host, no pid yet): a ``processing`` job whose heartbeat is older than
          ``STALE_AFTER_S``, a ``pending`` one older than ``PENDING_GRACE_S``.
        - A Modal call (``remote``) is its backend's to judge, never ours.

        Each reap is one conditional ``UPDATE``: a heartbeat or a start that lands meanwhile wins.
        """
        now, host = time.time(), this_host()
        rows = self.db.execute(
            "SELECT id, status, pid, pid_start, host FROM jobs WHERE status IN ('pending','processing') AND remote IS NULL"
        ).fetchall()
        reaped = []
        for r in rows:
            args: tuple[Any, ...]
            if r["host"] == host and r["pid"] is not None:
                if _alive(r["pid"], r["pid_start"]):
                    continue  # a live worker of ours
                # its pid is gone: the row is reaped unless a worker (another pid) has taken it meanwhile
                where, args = "status = ? AND pid = ? AND host = ?", (r["status"], r["pid"], host)
            elif r["status"] == "processing":
                where, args = "status = 'processing' AND COALESCE(heartbeat_at, started_at, created_at) < ?", (now - STALE_AFTER_S,)
            else:
                where, args = "status = 'pending' AND pid IS NULL AND remote IS NULL AND created_at < ?", (now - PENDING_GRACE_S,)
                if r["pid"] is not None:  # another host's worker that never started
                    where = where.replace("pid IS NULL", "pid = ?")
                    args = (r["pid"], *args)
            message = REAPED if r["status"] == "processing" else NEVER_STARTED
            with self.transaction() as db:
                cur = db.execute(
                    f"UPDATE jobs SET status = 'failed', finished_at = ?, error_code = 1, error_message = ? WHERE id = ? AND {where}",
                    (now, message, r["id"], *args),
                )
            if cur.rowcount:
                reaped.append(r["id"])
        return reaped


