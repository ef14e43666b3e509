"""The ASGI app: ``create_app(...)`` assembles the server from its parts and returns a FastAPI app.

Routes (see docs/http.md and ``server/routes/``):

- ``GET  /v1/health``                -> JSON: status, version, job kinds, upload limit, auth mode.
- ``POST /v1/jobs/{kind}``           -> the job's events as NDJSON (``application/x-ndjson``), as they happen.
- ``POST /v1/jobs/{kind}?detach=true`` -> 202 and the job's id; it runs in the server (``detached``).
- ``GET  /v1/jobs``, ``GET/DELETE /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` -> detached jobs' records and events.
- ``GET  /v1/artifacts/{id}``        -> an output file of a finished job (410 once expired, for a recorded job).
- ``GET  /v1/openapi.json``         -> the OpenAPI document of all of the above (behind the key; ``/openapi.json`` and ``/docs`` stay off).
- ``GET  /`` and ``POST /v1/session`` -> the jobs page and its cookie (server/session.py).

The parts: ``state`` (limits and live jobs), ``auth`` (the key, the cookie, the Host/Origin rule),
``admission`` (whether a job may start), ``sweep`` (expiry on a timer in the app's lifespan),
``responses`` (error bodies), ``detached`` (the server's job store and queue), ``runner``, ``uploads``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from synapse_cli import __version__
from synapse_cli.server import session
from synapse_cli.server.detached import DetachedJobs
from synapse_cli.server.responses import Refused, error
from synapse_cli.server.routes import artifacts, jobs, meta, page, records
from synapse_cli.server.state import MIN_KEY_CHARS, ServerOptions, check_key, from_settings
from synapse_cli.server.sweep import sweep_timer

__all__ = ["MIN_KEY_CHARS", "ServerOptions", "check_key", "create_app"]

ROUTES = (page, meta, jobs, records, artifacts)  # the modules of routes/, each with its ``router``


def create_app(
    settings: Mapping[str, Any] | None = None,
    *,
    work_dir: str | Path | None = None,
    api_key: str | None = None,
    max_upload_mb: int | None = None,
    allow_anonymous: bool = False,
    artifact_ttl_s: float | None = None,
    models_dir: str | Path | None = None,
    **limits: Any,
) -> FastAPI:
    """The synapse HTTP app.

    ``settings`` (a resolved ``Settings``) supplies ``serve.work_dir``, ``api_key``,
    ``serve.max_upload_mb``, ``serve.artifact_ttl_s`` and the other ``serve.*`` limits; keyword
    arguments override them (``models_dir``: owner-installed models a client may name, default
    ``serve.models_dir``; ``limits``: any ``ServerOptions`` field, e.g. ``job_timeout_s=60``). Without an API key the
    app refuses to be built unless ``allow_anonymous=True``; such a server still refuses requests
    that carry an ``Origin`` header or name a non-loopback ``Host`` (web pages, DNS rebinding).
    A key shorter than 16 characters is refused. Without a work dir, a fresh temporary folder is used.
    """
    arguments = {"work_dir": work_dir, "api_key": api_key, "max_upload_mb": max_upload_mb, "allow_anonymous": allow_anonymous,
                 "artifact_ttl_s": artifact_ttl_s, "models_dir": models_dir}  # fmt: skip
    opts = from_settings(settings or {}, arguments, limits)
    opts.jobs_dir.mkdir(parents=True, exist_ok=True)
    opts.detached = DetachedJobs(opts)  # opens <work dir>/jobs.db; jobs a dead server left running are marked failed, old ones pruned
    opts.detached.dispatch()  # and those it left queued, queued here again, start

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """The sweep's timer runs while the app does; stopping it waits for a sweep under way (its
        thread is never left behind), which ends at its next folder."""
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(sweep_timer, opts)
                try:
                    yield
                finally:
                    opts.sweeps_stop.set()
                    tasks.cancel_scope.cancel()
        finally:
            opts.sweeps_stop.clear()  # the timer is gone: a later request's sweep runs in full

    app = FastAPI(title="synapse", version=__version__, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.synapse = opts
    app.state.sessions = session.Sessions()
    app.state.openapi = None
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Refused, _refused)  # type: ignore[arg-type]
    for routes in ROUTES:
        app.include_router(routes.router)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # Starlette names the methods of the first route whose path matched; say all of them
        headers["Allow"] = ", ".join(_allowed_methods(request.url.path)) or headers.get("Allow", "")
    return error(exc.status_code, str(exc.detail), headers=headers)


def _allowed_methods(path: str) -> list[str]:
    """The methods the OpenAPI document gives ``path``, for a 405's ``Allow``. Starlette names those of the
    first route whose path matched, but ``/v1/jobs/{kind}`` (POST) and ``/v1/jobs/{job_id}`` (GET, DELETE)
    share a shape: ``/v1/jobs/<a kind>`` is the kind's POST, any other ``/v1/jobs/<x>`` a job's GET and DELETE."""
    from synapse_cli.jobs import JOBS

    methods: set[str] = set()
    for route in (route for routes in ROUTES for route in routes.router.routes):
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        match = regex.match(path) if regex is not None and route_methods else None
        if match is None:
            continue
        params = match.groupdict()
        if ("kind" in params and params["kind"] not in JOBS) or ("job_id" in params and params["job_id"] in JOBS and path.count("/") == 3):
            continue
        methods.update(route_methods or ())
    return sorted(methods)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, f"bad request: {exc.errors()[0].get('msg', 'invalid')}")


async def _refused(request: Request, exc: Refused) -> JSONResponse:
    return exc.response
