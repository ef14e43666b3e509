"""A job store's rows as ``Job`` records, and whether the process behind a row is still alive.

``Job`` is what ``JobStore`` reads and writes (``_row_to_job``); settings the config registry marks
secret never reach a row (``without_secrets``). A row's process is told apart from a reused pid by its
start time (``pid_start_time``), on this host (``this_host``)."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any



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
    pid_start: int | None = None  # the pid's start time (/proc/<pid>/stat field 22): tells it from a reused pid
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
    data["flags"] = without_secrets(data["flags"])  # rows written before secrets were dropped on write
    return Job(**data)


def without_secrets(flags: dict[str, Any] | None) -> dict[str, Any] | None:
    """``flags`` less every setting the config registry marks secret (an API key is never stored)."""
    if not flags:
        return flags
    from synapse_cli.config import registry

    reg = registry()
    return {k: v for k, v in flags.items() if not (k in reg and reg[k].secret)}


def this_host() -> str:
    """This machine's name, as rows record it: a job's pid means something only on its own host."""
    return platform.node()


def pid_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # field 2 (the command) is in parentheses and may hold spaces: count from the last ')', which ends field 2
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None = None) -> bool:
    """Process ``pid`` runs (not a zombie) and, when ``start`` is known, is the same process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # a zombie child still answers kill(0): look at its state where /proc exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    if fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


def alive(job: Job) -> bool:
    """The job's recorded worker runs on this host (the same process: a reused pid is not it)."""
    return job.pid is not None and job.host == this_host() and _alive(job.pid, job.pid_start)
