"""A detached job's record as the API shows it (``GET /v1/jobs/{id}``), and the list's query parameters."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from synapse_cli.server import runner
from synapse_cli.store import STATES

if TYPE_CHECKING:
    from synapse_cli.server.detached import DetachedJobs
    from synapse_cli.store import Job

MAX_LIST = 500
DEFAULT_LIST = 50
_ERROR_NAMES = {1: "JobError", 2: "UsageError", 3: "BackendError", 130: "Interrupted"}


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhooks_wire(deliveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored webhook deliveries as the API lists them (a record's ``webhooks``, a stream's ``Deliveries`` report)."""
    return [{**d, "at": iso(d["at"]) if isinstance(d.get("at"), (int, float)) else d.get("at")} for d in deliveries]


def client_path(spec: dict[str, Any], url: str) -> str | None:
    """Where the client saves the artifact at ``url``: its output field's path in the spec as sent,
    joined with ``name`` for a file inside a directory output (the streaming client's rule)."""
    query = parse_qs(urlsplit(url).query)
    name = query.get("name", [None])[0]
    field = query.get("output", [None])[0]
    if field is None:
        return name
    value = spec.get(field)
    index = query.get("index", [None])[0]
    if index is not None:
        try:
            value = value[int(index)] if isinstance(value, list) else None
        except (ValueError, IndexError):
            value = None
    if not isinstance(value, str):
        return name
    return f"{value.rstrip('/')}/{name}" if name else value


def job_record(jobs: "DetachedJobs", job: "Job") -> dict[str, Any]:
    """The JSON record of ``GET /v1/jobs/{id}``."""
    with jobs.lock:
        arts = jobs.store.events(job.id, type="artifact")
        last = jobs.store.last_event(job.id) if job.status in ("failed", "cancelled") else None
        deliveries = jobs.store.deliveries(job.id)
    artifacts = []
    for _, ev in arts:
        url = str(ev.get("path", ""))
        number = url.split("?", 1)[0].rpartition(".")[2]
        if runner.artifact_path(jobs.opts.jobs_dir, job.id, number) is None:
            continue  # expired (swept after artifact_ttl_s), or the job's folder is gone
        artifacts.append({"path": client_path(job.spec, url), "bytes": ev.get("bytes"), "url": url})
    error = None
    if job.status in ("failed", "cancelled"):
        name = last[1].get("error") if last and last[1].get("type") == "error" else None
        code = job.error_code if job.error_code is not None else 1
        error = {"code": code, "message": job.error_message or "", "error": name or _ERROR_NAMES.get(code, "JobError")}
    webhooks = {"webhooks": webhooks_wire(deliveries)} if deliveries else {}
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "progress": {"done": job.done, "total": job.total},
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "result": job.result,  # a failed job has one if it failed after finishing (inputs that failed)
        "error": error,
        "artifacts": artifacts,
        **webhooks,
    }


def parse_list_params(status: str | None, limit: str | None) -> tuple[str | None, int, str | None]:
    """``?status=&limit=`` of ``GET /v1/jobs``: (status, limit, error message or None)."""
    if status in (None, ""):
        status = None
    elif status not in STATES:
        return None, 0, f"status: expected one of {', '.join(STATES)}, got {status!r}"
    if limit in (None, ""):
        return status, DEFAULT_LIST, None
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST:
        return None, 0, f"limit: expected 1..{MAX_LIST}, got {limit!r}"
    return status, int(limit), None


def parse_index(value: str | None, what: str) -> tuple[int | None, str | None]:
    if value is None or value == "":
        return None, None
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        return None, f"{what}: expected an event index (0, 1, 2, ...), got {value[:40]!r}"
    return int(value), None
