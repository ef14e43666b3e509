"""Whether a new job may start: a known kind, a server not shutting down, well-formed ``?shards=``
and ``?detach=``, a free slot (or room in the queue), an upload within the size limit and the disk."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from synapse_cli.server.responses import busy, error
from synapse_cli.server.state import ServerOptions


@dataclass(frozen=True)
class Admission:
    """A job the server takes: how many shards, whether it is detached, the declared body length (-1: unknown)."""

    shards: int
    detach: bool
    length: int
    report_webhooks: bool = False  # the stream ends with what became of the job's webhooks (``?report_webhooks=true``)


def flag_param(value: str | None, name: str) -> tuple[bool, str | None]:
    """A boolean query parameter (true/false/1/0, absent: false): (value, error message or None)."""
    text = (value if value is not None else "false").lower()
    if text not in ("true", "false", "1", "0"):
        return False, f"{name}: expected true or false, got {text[:20]!r}"
    return text in ("true", "1"), None


def shards_param(value: str | None) -> tuple[int, str | None]:
    """``?shards=N``: how many worker processes of this server the job is split across (at most one per core)."""
    if value is None or value in ("", "auto", "1"):
        return 1, None
    most = os.cpu_count() or 1
    if not value.isdigit() or not 1 <= int(value) <= most:
        return 1, f"shards: expected 1..{most} (this server's cores) or auto, got {value!r}"
    return int(value), None


def admit(opts: ServerOptions, request: Request, kind: str) -> Admission | JSONResponse:
    """The job's ``Admission``, or the refusal to send (404, 422, 429, 413, 503, 507)."""
    from synapse_cli.jobs import JOBS

    if kind not in JOBS:
        return error(404, f"unknown job kind {kind!r}; expected one of {', '.join(JOBS)}", close=True)
    if opts.closing:
        return busy(503, "the server is shutting down", 5)
    shards, shards_error = shards_param(request.query_params.get("shards"))
    if shards_error:
        return error(422, shards_error, close=True)
    detached, problem = flag_param(request.query_params.get("detach"), "detach")
    report, report_problem = flag_param(request.query_params.get("report_webhooks"), "report_webhooks")
    if problem or report_problem:
        return error(422, problem or report_problem or "", close=True)
    if detached and len(opts.waiting) >= opts.max_queued_jobs:
        return busy(429, f"the server has {len(opts.waiting)} detached jobs waiting, its limit (serve.max_queued_jobs); try again shortly", 5)
    if not detached and opts.slots_used() >= opts.job_slots:
        return busy(429, f"the server is running {opts.slots_used()} jobs, its limit (serve.max_concurrent_jobs); try again shortly", 5)
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else -1
    if length > opts.max_bytes:
        return error(413, f"the upload ({length / 1048576:.1f} MB) is larger than the server's limit of {opts.max_upload_mb} MB", close=True)
    needed = (length if length >= 0 else opts.max_bytes) + opts.min_free_mb * 1024 * 1024
    try:
        free = shutil.disk_usage(opts.jobs_dir).free
    except OSError as exc:  # the work dir is gone or unreadable (removed under a running server): not this request's fault
        return busy(503, f"the server's work dir is unavailable ({exc.strerror or exc})", 60)
    if free < needed:
        return busy(507, f"the server has {free / 1048576:.0f} MB free in its work dir; this upload needs {needed / 1048576:.0f} MB (serve.min_free_mb)", 60)
    return Admission(shards, detached, length, report)
