"""The job store: one SQLite row per job plus its events, so jobs outlive the terminal.

Every run is recorded, attached or detached. Several synapse processes write at
once (CI runs exports in parallel), so the database is in WAL mode, every write
is a short ``BEGIN IMMEDIATE`` transaction, and connections wait on a busy
lock rather than failing. A job whose worker died (SIGKILL, a lost machine) is
found by its process id or its stale heartbeat and marked ``failed`` the next
time anyone reads the table.

States: pending → processing → completed | failed | cancelled.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from synapse_cli.errors import UsageError

SCHEMA_VERSION = 1
STATES = ("pending", "processing", "completed", "failed", "cancelled")
ACTIVE = ("pending", "processing")
HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0

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
    return "j" + secrets.token_hex(6)


@dataclass
class Job:
    id: str
    kind: str
    status: str
    backend: str
    spec: dict[str, Any]
    cache_key: str | None = None
    detached: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    host: str | None = None
    pid: int | None = None
    done: float | None = None
    total: float | None = None
    phase: str | None = None
    result: dict[str, Any] | None = None
    error_code: int | None = None
    error_message: str | None = None
    remote: dict[str, Any] | None = None
    flags: dict[str, Any] | None = None
    gpu: str | None = None
    cost_usd: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    @property
    def exit_code(self) -> int | None:
        return {"completed": 0, "cancelled": 130}.get(self.status, self.error_code if self.status == "failed" else None)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out["wall_s"] = None if self.wall_s is None else round(self.wall_s, 3)
        out["progress"] = f"{self.done:g}/{self.total:g}" if self.done is not None and self.total else None
        return out


_JSON_COLUMNS = ("spec", "result", "remote", "flags")


def _row_to_job(row: sqlite3.Row) -> Job:
    data = dict(row)
    for col in _JSON_COLUMNS:
        data[col] = json.loads(data[col]) if data[col] else None
    data["detached"] = bool(data["detached"])
    return Job(**data)


class JobStore:
    """A handle on the SQLite job store. Cheap to open; one connection per process."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UsageError(
                    f"job store {self.path} has schema {version}, newer than this synapse understands ({SCHEMA_VERSION}): "
                    "upgrade synapse, or set [jobs] db / SYNAPSE_JOBS_DB to another file"
                )
            self._use_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            # WAL + NORMAL: no fsync per progress write (a crash can lose the last events, never corrupt the file)
            self.db.execute("PRAGMA synchronous = NORMAL")
            if version < SCHEMA_VERSION:
                with self.transaction() as db:  # executescript would commit on its own: one statement at a time
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: take the write lock up front, so check-then-write is atomic across processes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- writes -------------------------------------------------------------------

    def create(self, kind: str, spec: dict[str, Any], backend: str, cache_key: str | None = None, detached: bool = False,
               status: str = "pending", flags: dict[str, Any] | None = None) -> Job:
        job = Job(id=new_job_id(), kind=kind, status=status, backend=backend, spec=spec, cache_key=cache_key, detached=detached,
                  created_at=time.time(), flags=flags)
        with self.transaction() as db:
            self._insert(db, job)
        return job

    def _insert(self, db: sqlite3.Connection, job: Job) -> None:
        db.execute(
            "INSERT INTO jobs (id, kind, status, backend, spec, cache_key, detached, created_at, host, flags) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (job.id, job.kind, job.status, job.backend, json.dumps(job.spec), job.cache_key, int(job.detached), job.created_at,
             socket.gethostname(), json.dumps(job.flags) if job.flags is not None else None),
        )

    def claim_or_find(self, kind: str, spec: dict[str, Any], backend: str, cache_key: str | None) -> tuple[Job, Job | None]:
        """Atomically: the completed or running job with this cache key if there is one, else a new row of ours.

        Returns (our job, the job whose result we can reuse or follow, or None).
        """
        self.reap()
        with self.transaction() as db:
            other = None
            if cache_key:
                row = db.execute(
                    "SELECT * FROM jobs WHERE cache_key = ? AND status IN ('completed','processing','pending') "
                    "ORDER BY (status = 'completed') DESC, created_at DESC LIMIT 1",
                    (cache_key,),
                ).fetchone()
                other = _row_to_job(row) if row else None
            job = Job(id=new_job_id(), kind=kind, status="processing", backend=backend, spec=spec, cache_key=cache_key, created_at=time.time())
            self._insert(db, job)
            now = time.time()
            db.execute("UPDATE jobs SET started_at = ?, heartbeat_at = ?, pid = ? WHERE id = ?", (now, now, os.getpid(), job.id))
            job.started_at = job.heartbeat_at = now
            job.pid = os.getpid()
        return job, other

    def start(self, job_id: str, pid: int | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET status = 'processing', started_at = COALESCE(started_at, ?), heartbeat_at = ?, pid = ?, host = ? WHERE id = ?",
                (now, now, pid or os.getpid(), socket.gethostname(), job_id),
            )

    def append_events(self, job_id: str, events: list[dict[str, Any]], progress: dict[str, Any] | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
            db.executemany(
                "INSERT INTO events (job_id, seq, ts, event) VALUES (?,?,?,?)",
                [(job_id, seq + i + 1, now, json.dumps(e, default=str)) for i, e in enumerate(events)],
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

    def finish(self, job_id: str, status: str, result: dict[str, Any] | None = None, error_code: int | None = None,
               error_message: str | None = None, gpu: str | None = None, cost_usd: float | None = None) -> None:
        assert status in ("completed", "failed", "cancelled")
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, result = ?, error_code = ?, error_message = ?, "
                "gpu = COALESCE(?, gpu), cost_usd = COALESCE(?, cost_usd) WHERE id = ? AND status IN ('pending','processing')",
                (status, time.time(), json.dumps(result) if result is not None else None, error_code, error_message, gpu, cost_usd, job_id),
            )

    def set_remote(self, job_id: str, remote: dict[str, Any], gpu: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET remote = ?, gpu = COALESCE(?, gpu) WHERE id = ?", (json.dumps(remote), gpu, job_id))

    def set_pid(self, job_id: str, pid: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (pid, job_id))

    def prune(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        with self.transaction() as db:
            cur = db.execute("DELETE FROM jobs WHERE status NOT IN ('pending','processing') AND created_at < ?", (cutoff,))
            return cur.rowcount

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

    def list(self, status: str | None = None, limit: int = 200) -> list[Job]:
        self.reap()
        if status:
            rows = self.db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY created_at DESC LIMIT ?", (status, limit))
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_row_to_job(r) for r in rows.fetchall()]

    def events(self, job_id: str, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        rows = self.db.execute("SELECT seq, event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)).fetchall()
        return [(r["seq"], json.loads(r["event"])) for r in rows]

    def reap(self) -> list[str]:
        """Mark ``failed`` every local ``processing`` job whose worker is gone or silent."""
        now, host = time.time(), socket.gethostname()
        rows = self.db.execute("SELECT id, pid, host, heartbeat_at, remote FROM jobs WHERE status = 'processing'").fetchall()
        dead = []
        for r in rows:
            if r["remote"]:  # a Modal call: its worker is not ours to judge
                continue
            gone = r["host"] == host and r["pid"] is not None and not _alive(r["pid"])
            silent = (r["heartbeat_at"] or 0) < now - STALE_AFTER_S
            if gone or silent:
                dead.append(r["id"])
        for job_id in dead:
            self.finish(job_id, "failed", error_code=1, error_message="the worker stopped without finishing (killed or lost; stale heartbeat)")
        return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): look at its state where /proc exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
