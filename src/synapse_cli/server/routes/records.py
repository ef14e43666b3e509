"""Detached jobs' records: ``GET /v1/jobs``, ``GET/DELETE /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (NDJSON or SSE)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from synapse_cli.protocol import NDJSON, SSE
from synapse_cli.server.auth import keyed
from synapse_cli.server.admission import flag_param
from synapse_cli.server.detached import DetachedJobs
from synapse_cli.server.job_records import parse_index, parse_list_params
from synapse_cli.server.responses import error
from synapse_cli.server.state import of

router = APIRouter(dependencies=[Depends(keyed)])
NO_STORE = {"Cache-Control": "no-store"}


def _jobs(request: Request) -> DetachedJobs:
    jobs = of(request).detached
    assert jobs is not None  # create_app opens the store before serving
    return jobs


def not_found(job_id: str) -> JSONResponse:
    return error(404, f"no job {job_id[:64]!r} on this server")


@router.get("/v1/jobs")
async def list_jobs(request: Request) -> Any:
    status, limit, problem = parse_list_params(request.query_params.get("status"), request.query_params.get("limit"))
    if problem:
        return error(422, problem)
    records = await anyio.to_thread.run_sync(_jobs(request).list_records, status, limit)
    return JSONResponse({"jobs": records}, headers=NO_STORE)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Any:
    record = await anyio.to_thread.run_sync(_jobs(request).get_record, job_id)
    if record is None:
        return not_found(job_id)
    return JSONResponse(record, headers=NO_STORE)


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> Any:
    jobs = _jobs(request)
    outcome = await anyio.to_thread.run_sync(jobs.cancel, job_id)
    if outcome == "unknown":
        return not_found(job_id)
    record = await anyio.to_thread.run_sync(jobs.get_record, job_id)
    if outcome == "finished":
        return error(409, f"job {job_id} has already ended ({record['status'] if record else 'gone'}); nothing to cancel")
    if outcome == "elsewhere":
        return error(409, f"job {job_id} runs in another server process sharing this work dir; cancel it there", code=3, error="BackendError")
    return JSONResponse(record, headers=NO_STORE)


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> Any:
    after, problem = parse_index(request.query_params.get("after"), "after")
    if problem:
        return error(422, problem)
    last_id, problem = parse_index(request.headers.get("last-event-id"), "Last-Event-ID")
    if problem:
        return error(422, problem)
    report, problem = flag_param(request.query_params.get("report_webhooks"), "report_webhooks")
    if problem:
        return error(422, problem)
    jobs = _jobs(request)
    if await anyio.to_thread.run_sync(jobs.find, job_id) is None:
        return not_found(job_id)
    sse = SSE in request.headers.get("accept", "").lower()
    start = last_id + 1 if last_id is not None else (after or 0)  # an EventSource reconnecting keeps the URL: its header wins
    return StreamingResponse(jobs.follow(job_id, start, sse, of(request).keepalive_s, report), media_type=SSE if sse else NDJSON,
                             headers={**NO_STORE, "X-Accel-Buffering": "no"})  # fmt: skip
