"""The ASGI app: ``create_app(...)`` returns a FastAPI app exposing every job kind.

Routes (see docs/http.md):

- ``GET  /v1/health``                -> JSON: status, version, job kinds, upload limit, auth mode.
- ``POST /v1/jobs/{kind}``           -> the job's events as NDJSON (``application/x-ndjson``), as they happen.
- ``POST /v1/jobs/{kind}?detach=true`` -> 202 and the job's id; it runs in the server (``detached``).
- ``GET  /v1/jobs``, ``GET/DELETE /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` -> detached jobs' records and events.
- ``GET  /v1/artifacts/{id}``        -> an output file of a finished job (410 once expired, for a recorded job).
- ``GET  /v1/openapi.json``         -> the OpenAPI document of all of the above (behind the key; ``/openapi.json`` and ``/docs`` stay off).
- ``GET  /`` and ``POST /v1/session`` -> the jobs page and its cookie (server/session.py).

While the app runs (its lifespan: ``synapse serve`` and Modal run it), a timer sweeps expired outputs
and old detached jobs every ``min(60 s, artifact_ttl_s)``, idle or not (``_sweep_timer``).

Errors before the stream starts are JSON bodies shaped like the stream's last
line: ``{"type": "error", "code": 2, "message": "...", "error": "UsageError"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from synapse_cli import __version__
from synapse_cli.events import Failed
from synapse_cli.render.ndjson import encode
from synapse_cli.server import runner, session
from synapse_cli.server.detached import DetachedJobs, parse_index, parse_list_params
from synapse_cli.server.keyfile import is_loopback_host
from synapse_cli.server.uploads import BadUpload, read_body, remove_tree

log = logging.getLogger("synapse.server")

NDJSON = "application/x-ndjson"
_ARTIFACT_ID = re.compile(r"([A-Za-z0-9_-]{16,64})\.([0-9]{1,6})")
_SWEEP_EVERY_S = 60.0
_SWEEP_TIMER_MIN_S = 1.0  # artifact_ttl_s=0 (each submit sweeps) must not make the timer spin


@dataclass
class ServerOptions:
    """What the app needs; ``create_app`` builds it from settings and keyword arguments."""

    work_dir: Path
    api_key: str | None = None
    max_upload_mb: int = 2048
    allow_anonymous: bool = False  # only a loopback-only server without a key (tests, embedding)
    artifact_ttl_s: float = 3600.0
    models_dir: Path | None = None  # owner-installed models a client may name (besides the bundled default)
    max_concurrent_jobs: int = 0  # 0: one per core
    job_timeout_s: float = 4 * 3600.0  # 0: none
    min_free_mb: int = 1024
    stall_timeout_s: float = 60.0
    body_timeout_s: float = 60.0
    keepalive_s: float = 15.0
    max_key_failures: int = 10  # per address, per KEY_FAILURE_WINDOW_S
    max_queued_jobs: int = 100  # detached jobs waiting for a slot (uploads included); past it, 429
    keep_jobs_days: float = 30.0  # detached jobs that ended longer ago leave jobs.db (record, events, folder); 0: kept for ever
    on_job_end: Callable[[], None] | None = None  # e.g. Modal: commit the Volume
    storage: Any = None  # synapse_cli.storage.client.Storage, guarded: the URL fields of the jobs it runs
    live: dict[str, Path] = field(default_factory=dict)  # this process's jobs (uploading, queued or running) -> folder
    waiting: set[str] = field(default_factory=set)  # detached jobs in ``live`` that hold no slot (uploading or queued)
    slot_lock: threading.Lock = field(default_factory=threading.Lock)
    detached: "DetachedJobs | None" = None
    runs: dict[str, runner.JobRun] = field(default_factory=dict)
    key_failures: dict[str, deque] = field(default_factory=dict)
    last_sweep: float = 0.0
    sweeps_stop: threading.Event = field(default_factory=threading.Event)  # set when the app's lifespan ends: a sweep under way stops early
    heartbeat: threading.Thread | None = None
    idle: threading.Event = field(default_factory=threading.Event)  # set when the last live job ends
    closing: bool = False

    @property
    def jobs_dir(self) -> Path:
        return self.work_dir / "jobs"

    @property
    def max_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def job_slots(self) -> int:
        return self.max_concurrent_jobs or os.cpu_count() or 1

    def slots_used(self) -> int:
        """Jobs holding a slot: running (streamed or detached) and streamed uploads."""
        return len(self.live) - len(self.waiting)

    def cancel_all(self, reason: str = "the server is shutting down") -> None:
        """Stop every running job now: its stream ends with an error line, its processes are killed;
        detached jobs still waiting for a slot fail."""
        self.closing = True
        if self.detached is not None:
            self.detached.cancel_queued(reason)
        for run in list(self.runs.values()):
            run.cancel(reason, Failed(3, f"{reason}; the job was stopped (nothing was saved)", "BackendError"))

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """``cancel_all``, then wait until each job's thread and processes are gone. True when they are."""
        self.cancel_all()
        deadline = time.monotonic() + timeout_s
        for run in list(self.runs.values()):
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
            runner.kill_children(run.native_id)
        return not any(r.thread is not None and r.thread.is_alive() for r in self.runs.values())


KEY_FAILURE_WINDOW_S = 60.0
MIN_KEY_CHARS = 16
_HEARTBEAT_S = 5.0
_HEARTBEAT_STALE_S = 60.0  # a folder whose .alive is older than this belongs to a process that died


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``127.0.0.1:80`` -> ``127.0.0.1``."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def check_key(api_key: str | None) -> None:
    if api_key is not None and len(api_key) < MIN_KEY_CHARS:
        raise ValueError(f"the API key is {len(api_key)} characters long; use at least {MIN_KEY_CHARS} (e.g. openssl rand -hex 24)")


def _error(status: int, message: str, code: int = 2, error: str = "UsageError", close: bool = False, headers: dict | None = None) -> JSONResponse:
    body = {"type": "error", "code": code, "message": message, "error": error}
    hdrs = dict(headers or {})
    if close:  # don't read (or drain) the rest of a body we refuse
        hdrs["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=hdrs)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


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
    settings = settings or {}
    work_dir = work_dir or settings.get("serve.work_dir")
    api_key = api_key if api_key is not None else settings.get("api_key")
    max_upload_mb = max_upload_mb if max_upload_mb is not None else settings.get("serve.max_upload_mb", 2048)
    artifact_ttl_s = artifact_ttl_s if artifact_ttl_s is not None else settings.get("serve.artifact_ttl_s", 3600.0)
    if not api_key and not allow_anonymous:
        raise ValueError("create_app needs an api_key (SYNAPSE_API_KEY), or allow_anonymous=True for a loopback-only server")
    check_key(api_key or None)
    known = {f for f in ServerOptions.__dataclass_fields__ if f not in ("work_dir", "api_key", "max_upload_mb", "allow_anonymous", "artifact_ttl_s", "models_dir")}
    if "storage" not in limits:  # URL fields: [storage] and [serve] allow_buckets / allow_hosts (defaults where not given)
        from synapse_cli.config import registry
        from synapse_cli.storage.client import Storage

        storage_keys = {k: v.default for k, v in registry().items() if k.startswith(("storage.", "serve.allow_"))}
        limits["storage"] = Storage.guarded({**storage_keys, **{k: settings[k] for k in storage_keys if k in settings}})
    unknown = sorted(set(limits) - known)
    if unknown:
        raise TypeError(f"create_app got unexpected keyword argument(s): {', '.join(unknown)}")
    for name in ("max_concurrent_jobs", "max_queued_jobs", "job_timeout_s", "min_free_mb", "stall_timeout_s", "body_timeout_s", "keep_jobs_days"):
        if name not in limits and f"serve.{name}" in settings:
            limits[name] = settings[f"serve.{name}"]
    models_dir = models_dir if models_dir is not None else settings.get("serve.models_dir")
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="synapse-serve-"))
    opts = ServerOptions(
        root.resolve(), api_key or None, int(max_upload_mb), allow_anonymous, artifact_ttl_s,
        Path(models_dir).expanduser().resolve() if models_dir else None, **limits,
    )  # fmt: skip
    opts.jobs_dir.mkdir(parents=True, exist_ok=True)
    opts.detached = DetachedJobs(opts)  # opens <work dir>/jobs.db; jobs a dead server left running are marked failed, old ones pruned

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """The sweep's timer runs while the app does; stopping it waits for a sweep under way (its
        thread is never left behind), which ends at its next folder."""
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_sweep_timer, opts)
                try:
                    yield
                finally:
                    opts.sweeps_stop.set()
                    tasks.cancel_scope.cancel()
        finally:
            opts.sweeps_stop.clear()  # the timer is gone: a later request's sweep runs in full

    app = FastAPI(title="synapse", version=__version__, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.synapse = opts

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "?"

    def throttled(address: str) -> float:
        """Seconds until ``address`` may try a key again (0: now)."""
        failures = opts.key_failures.get(address)
        if not failures:
            return 0.0
        now = time.monotonic()
        while failures and now - failures[0] > KEY_FAILURE_WINDOW_S:
            failures.popleft()
        if len(failures) < opts.max_key_failures:
            return 0.0
        return KEY_FAILURE_WINDOW_S - (now - failures[0])

    def gate(request: Request, need_key: bool = True) -> JSONResponse | None:
        """None when the request may go on, else the refusal.

        A request with the right key may do anything. Without it, a request from a web page
        (``Origin``) or for a non-loopback ``Host`` (DNS rebinding) is refused (403), and on a
        server with a key only ``/v1/health`` is open (401 elsewhere). Wrong keys are counted
        per address; past ``max_key_failures`` a minute, that address gets 429 for a while.
        """
        header = request.headers.get("authorization")
        if header is not None and opts.api_key is not None:
            scheme, _, token = header.partition(" ")
            refused = key_refusal(client_of(request), token.strip() if scheme.lower() == "bearer" else "")
            if refused is None or need_key or refused.status_code == 429:
                return refused
            # /v1/health answers a wrong key exactly as it answers no key
        elif header is None and opts.api_key is not None and session.COOKIE in request.cookies and session.uses_cookie(request.url.path):
            return cookie_refusal(request)
        if "origin" in request.headers or not is_loopback_host(_host_of(request.headers.get("host", ""))):
            return _error(403, "requests from a web page (Origin header) or for a non-loopback Host need the API key", code=3, error="BackendError", close=True)
        if need_key and opts.api_key is not None:
            return unauthorized()
        return None

    def unauthorized() -> JSONResponse:
        return _error(401, "missing or wrong API key", code=3, error="BackendError", close=True, headers={"WWW-Authenticate": "Bearer"})

    def key_refusal(address: str, key: str) -> JSONResponse | None:
        """None for the right key; else 401, counted against ``address`` (429 once it has too many)."""
        assert opts.api_key is not None
        wait = throttled(address)
        if wait > 0:
            return _error(429, "too many wrong API keys from this address; try again later", code=3, error="BackendError",
                          close=True, headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        if hmac.compare_digest(_digest(key), _digest(opts.api_key)):
            return None
        opts.key_failures.setdefault(address, deque()).append(time.monotonic())
        if len(opts.key_failures) > 10_000:  # bounded memory: forget the oldest addresses
            for old in list(opts.key_failures)[:5_000]:
                opts.key_failures.pop(old, None)
        return unauthorized()

    # -- the jobs page (server/session.py): GET / and its cookie, POST /v1/session ---------------
    sessions = app.state.sessions = session.Sessions()

    def cookie_refusal(request: Request) -> JSONResponse | None:
        """The page's cookie instead of the key: refused (403) from another origin's page, and 401 when
        the token is unknown or expired (not counted as a wrong key: a restarted server forgets its
        tokens, and the 256-bit token cannot be guessed)."""
        if session.foreign_origin(request.url.scheme, request.headers):
            return _error(403, "requests from another site's page are refused", code=3, error="BackendError", close=True)
        return None if sessions.valid(request.cookies.get(session.COOKIE)) else unauthorized()

    @app.get("/", response_class=HTMLResponse, openapi_extra={"security": []}, responses={200: {"description": "the jobs page (no data in it)"}})
    async def jobs_page() -> Response:
        html, headers = session.page()  # the page holds no data: no key needed
        return Response(html, media_type="text/html; charset=utf-8", headers=headers)

    @app.post("/v1/session", status_code=204, openapi_extra=session.OPENAPI, responses=session.OPENAPI_RESPONSES)
    async def new_session(request: Request) -> Response:
        """``{"key": KEY}`` -> 204 and the ``synapse_session`` cookie; a wrong key is 401, counted like any other."""
        if opts.api_key is None:
            return await _refuse(request, _error(404, "this server has no API key, so no sessions (the jobs page needs a key)"), opts)
        if session.foreign_origin(request.url.scheme, request.headers):
            return await _refuse(request, _error(403, "requests from another site's page are refused", code=3, error="BackendError", close=True), opts)
        import anyio

        body = b""
        try:
            with anyio.fail_after(opts.body_timeout_s or None):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > session.MAX_BODY_BYTES:
                        return _error(413, f"the body is larger than {session.MAX_BODY_BYTES} bytes", close=True)
        except (TimeoutError, ClientDisconnect):
            return _error(408, "the request body did not arrive in time", close=True)
        try:
            key = json.loads(body)["key"]
            key.encode("utf-8")  # a lone surrogate from JSON is a bad body, not a 500
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error(422, 'expected a JSON body {"key": "<the API key>"}')
        refused = key_refusal(client_of(request), key)
        if refused is not None:
            return refused
        cookie = session.cookie_header(sessions.issue(), sessions.ttl_s, secure=request.url.scheme == "https")
        return Response(status_code=204, headers={"Set-Cookie": cookie, "Cache-Control": "no-store"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, f"bad request: {exc.errors()[0].get('msg', 'invalid')}")

    async def keyed(request: Request) -> None:
        """Every route but the page, the session and /v1/health: ``gate`` first, before any body is read."""
        refused = gate(request)
        if refused is not None:
            raise _Refused(await _refuse(request, refused, opts))

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused) -> JSONResponse:
        return exc.response

    key = [Depends(keyed)]

    @app.get("/v1/health")
    async def health(request: Request) -> Any:
        from synapse_cli.jobs import JOBS

        refused = gate(request, need_key=False)
        if refused is not None:
            return await _refuse(request, refused, opts)
        return {
            "status": "ok",
            "version": __version__,
            "jobs": list(JOBS),
            "max_upload_mb": opts.max_upload_mb,
            "auth": "none" if opts.api_key is None else "bearer",
        }

    @app.post("/v1/jobs/{kind}", dependencies=key)
    async def run_job(kind: str, request: Request) -> Any:
        from synapse_cli.jobs import JOBS, spec_class

        if kind not in JOBS:
            return await _refuse(request, _error(404, f"unknown job kind {kind!r}; expected one of {', '.join(JOBS)}", close=True), opts)
        if opts.closing:
            return await _refuse(request, _error(503, "the server is shutting down", code=3, error="BackendError", close=True, headers={"Retry-After": "5"}), opts)
        shards, shards_error = _shards_param(request.query_params.get("shards"))
        if shards_error:
            return await _refuse(request, _error(422, shards_error, close=True), opts)
        detach = request.query_params.get("detach", "false").lower()
        if detach not in ("true", "false", "1", "0"):
            return await _refuse(request, _error(422, f"detach: expected true or false, got {detach[:20]!r}", close=True), opts)
        detach_ = detach in ("true", "1")
        if detach_ and len(opts.waiting) >= opts.max_queued_jobs:
            return await _refuse(request, _error(429, f"the server has {len(opts.waiting)} detached jobs waiting, its limit (serve.max_queued_jobs); try again shortly",
                          code=3, error="BackendError", close=True, headers={"Retry-After": "5"}), opts)
        if not detach_ and opts.slots_used() >= opts.job_slots:
            return await _refuse(request, _error(429, f"the server is running {opts.slots_used()} jobs, its limit (serve.max_concurrent_jobs); try again shortly",
                          code=3, error="BackendError", close=True, headers={"Retry-After": "5"}), opts)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > opts.max_bytes:
            return await _refuse(request, _error(413, f"the upload ({int(length) / 1048576:.1f} MB) is larger than the server's limit of {opts.max_upload_mb} MB", close=True), opts)
        needed = (int(length) if length.isdigit() else opts.max_bytes) + opts.min_free_mb * 1024 * 1024
        free = shutil.disk_usage(opts.jobs_dir).free
        if free < needed:
            return await _refuse(request, _error(507, f"the server has {free / 1048576:.0f} MB free in its work dir; this upload needs {needed / 1048576:.0f} MB (serve.min_free_mb)",
                          code=3, error="BackendError", close=True, headers={"Retry-After": "60"}), opts)
        try:
            cls = spec_class(kind)
            inputs: tuple[str, ...] | None = tuple(getattr(cls, "INPUTS", ()))
            installed: tuple[str, ...] = tuple(getattr(cls, "INSTALLED", ()))
        except ImportError:
            inputs, installed = None, ()  # prepare() explains
        await _sweep(opts)
        job_id = secrets.token_urlsafe(16)
        job_dir = opts.jobs_dir / job_id
        job_dir.mkdir()
        (job_dir / ".alive").touch()
        if detach_:
            opts.waiting.add(job_id)  # before ``live``: an upload of a detached job never holds a slot
        opts.live[job_id] = job_dir
        _start_heartbeat(opts)
        received_all = False

        async def body_stream() -> AsyncIterator[bytes]:
            nonlocal received_all
            while not received_all:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                received_all = not message.get("more_body", False)
                if message.get("body"):
                    yield message["body"]

        try:
            body = await read_body(request.headers.get("content-type", ""), body_stream(), job_dir / "in", opts.max_bytes,
                                   inputs=inputs, idle_timeout_s=opts.body_timeout_s or None, kind=kind, installed=installed)
            run = runner.prepare(kind, body, job_dir, job_id, opts.models_dir, opts.storage)
            run.shards = shards
        except BadUpload as exc:
            _forget(opts, job_id)
            remove_tree(job_dir)
            # refused before the body ended: a small rest is read and dropped, so the client (still
            # sending) gets the answer; a large one is not read at all, and the connection closes
            small = received_all or (length.isdigit() and int(length) <= _DRAIN_MAX_BYTES and exc.status != 408)
            if small and not received_all:
                small = await _drain(request, opts.body_timeout_s or None)
            return _error(exc.status, exc.message, close=not small)
        except ClientDisconnect:  # gone mid-upload: nothing to answer, nothing to keep
            _forget(opts, job_id)
            remove_tree(job_dir)
            return _error(400, "the client disconnected during the upload", close=True)
        except OSError as exc:  # a full disk, a name the file system refuses: the request fails, the server doesn't
            _forget(opts, job_id)
            remove_tree(job_dir)
            return _error(507 if exc.errno == 28 else 400, f"cannot store the upload: {exc.strerror or exc}", close=True)
        except BaseException:  # the client went away mid-upload, or a bug: leave nothing behind
            _forget(opts, job_id)
            remove_tree(job_dir)
            raise
        if detach_:
            assert opts.detached is not None
            try:
                answer = await anyio.to_thread.run_sync(opts.detached.submit, run, body.spec)
            except BaseException:
                _forget(opts, job_id)
                remove_tree(job_dir)
                raise
            return JSONResponse(answer, status_code=202, headers={"Location": answer["links"]["self"], "Cache-Control": "no-store"})
        return StreamingResponse(
            _stream(run, opts),
            media_type=NDJSON,
            headers={"X-Synapse-Job": job_id, "Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    jobs = opts.detached

    def not_found(job_id: str) -> JSONResponse:
        return _error(404, f"no job {job_id[:64]!r} on this server")

    @app.get("/v1/jobs", dependencies=key)
    async def list_jobs(request: Request) -> Any:
        status, limit, problem = parse_list_params(request.query_params.get("status"), request.query_params.get("limit"))
        if problem:
            return _error(422, problem)
        records = await anyio.to_thread.run_sync(jobs.list_records, status, limit)
        return JSONResponse({"jobs": records}, headers={"Cache-Control": "no-store"})

    @app.get("/v1/jobs/{job_id}", dependencies=key)
    async def get_job(job_id: str, request: Request) -> Any:
        record = await anyio.to_thread.run_sync(jobs.get_record, job_id)
        if record is None:
            return not_found(job_id)
        return JSONResponse(record, headers={"Cache-Control": "no-store"})

    @app.delete("/v1/jobs/{job_id}", dependencies=key)
    async def cancel_job(job_id: str, request: Request) -> Any:
        outcome = await anyio.to_thread.run_sync(jobs.cancel, job_id)
        if outcome == "unknown":
            return not_found(job_id)
        record = await anyio.to_thread.run_sync(jobs.get_record, job_id)
        if outcome == "finished":
            return _error(409, f"job {job_id} has already ended ({record['status'] if record else 'gone'}); nothing to cancel")
        if outcome == "elsewhere":
            return _error(409, f"job {job_id} runs in another server process sharing this work dir; cancel it there", code=3, error="BackendError")
        return JSONResponse(record, headers={"Cache-Control": "no-store"})

    @app.get("/v1/jobs/{job_id}/events", dependencies=key)
    async def job_events(job_id: str, request: Request) -> Any:
        after, problem = parse_index(request.query_params.get("after"), "after")
        if problem:
            return _error(422, problem)
        last_id, problem = parse_index(request.headers.get("last-event-id"), "Last-Event-ID")
        if problem:
            return _error(422, problem)
        if await anyio.to_thread.run_sync(jobs.find, job_id) is None:
            return not_found(job_id)
        sse = "text/event-stream" in request.headers.get("accept", "").lower()
        start = last_id + 1 if last_id is not None else (after or 0)  # an EventSource reconnecting keeps the URL: its header wins
        return StreamingResponse(
            jobs.follow(job_id, start, sse, opts.keepalive_s),
            media_type="text/event-stream" if sse else NDJSON,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    described: dict[str, Any] = {}

    @app.get("/v1/openapi.json", include_in_schema=False, dependencies=key)
    async def openapi(request: Request) -> Any:
        """The whole API (``server/openapi.py``); behind the key, like everything but /v1/health."""
        if "doc" not in described:
            from synapse_cli.server.openapi import build

            described["doc"] = await anyio.to_thread.run_sync(build, app)
        return JSONResponse(described["doc"])

    @app.get("/v1/artifacts/{artifact_id}", dependencies=key)
    async def artifact(artifact_id: str, request: Request) -> Any:
        match = _ARTIFACT_ID.fullmatch(artifact_id)
        path = runner.artifact_path(opts.jobs_dir, match[1], match[2]) if match else None
        if path is None:
            if match and await anyio.to_thread.run_sync(jobs.find, match[1]) is not None:
                return _error(410, f"artifact {artifact_id!r} has expired (outputs are kept {opts.artifact_ttl_s:g} s after their job ends)")
            return await _refuse(request, _error(404, f"no artifact {artifact_id!r} (expired, or never existed)"), opts)
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    return app


async def _stream(run: runner.JobRun, opts: ServerOptions) -> AsyncIterator[bytes]:
    """Start the job and stream its events. A client that goes away, the job's time limit and the
    server's shutdown all cancel the job at once (``JobRun.cancel``: its processes are killed).

    While the job is silent, a blank line goes out every ``keepalive_s``: NDJSON readers skip
    blank lines, and the client's read timeout does not cut off a healthy job."""
    import asyncio

    channel = runner.Channel(asyncio.get_running_loop(), stall_timeout_s=opts.stall_timeout_s or None)
    opts.runs[run.job_id] = run

    def on_end(r: runner.JobRun, ok: bool) -> None:
        try:
            runner.conclude(r, ok, opts.on_job_end)
        finally:
            if timer is not None:
                timer.cancel()
            _forget(opts, r.job_id)
            opts.runs.pop(r.job_id, None)

    timer: threading.Timer | None = None
    if opts.job_timeout_s:
        limit = opts.job_timeout_s
        timer = threading.Timer(limit, run.cancel, (
            "time limit", Failed(1, f"the job ran longer than this server's limit of {limit:g} s (serve.job_timeout_s) and was stopped", "JobError")))
        timer.daemon = True
    runner.run_in_thread(run, channel, on_end)
    if timer is not None:
        timer.start()
    if opts.closing:
        opts.cancel_all()
    done = False
    try:
        while True:
            try:
                batch = await asyncio.wait_for(channel.get_batch(), opts.keepalive_s)
            except asyncio.TimeoutError:
                yield b"\n"
                continue
            lines: list[str] = []
            for item in batch:
                if item is runner.DONE:
                    done = True
                    break
                lines.extend(encode(ev) + "\n" for ev in run.translate(item))
            if lines:
                yield "".join(lines).encode("utf-8")
            if done:
                return
    finally:
        if not done:  # the client went away: stop the job now, not at its next event
            run.cancel("the client went away")
        channel.close()


_DRAIN_MAX_BYTES = 1024 * 1024


class _Refused(Exception):
    """Raised by the ``keyed`` dependency: ``response`` is the refusal, ready to send."""

    def __init__(self, response: JSONResponse) -> None:
        self.response = response


async def _refuse(request: Request, response: JSONResponse, opts: ServerOptions) -> JSONResponse:
    """A refusal before the body was read: a small body is read and dropped first (else the client,
    still sending, sees a reset instead of the answer); a large one is left unread, the connection closed."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= _DRAIN_MAX_BYTES and await _drain(request, opts.body_timeout_s or None):
        if "connection" in response.headers:
            del response.headers["connection"]
    else:
        response.headers["connection"] = "close"
    return response


async def _drain(request: Request, timeout_s: float | None) -> bool:
    """Read and drop the rest of the request body; False if the client stalls or goes away."""
    import asyncio

    try:
        while True:
            message = await asyncio.wait_for(request.receive(), timeout_s)
            if message.get("type") != "http.request" or not message.get("more_body"):
                return message.get("type") == "http.request"
    except (asyncio.TimeoutError, ClientDisconnect, RuntimeError):
        return False


def _forget(opts: ServerOptions, job_id: str) -> None:
    """The job no longer needs its folder kept alive nor its slot: a queued detached job may start."""
    opts.live.pop(job_id, None)
    opts.waiting.discard(job_id)
    if not opts.live:
        opts.idle.set()  # the heartbeat thread ends now, not in _HEARTBEAT_S
    if opts.detached is not None:
        opts.detached.dispatch()


def _start_heartbeat(opts: ServerOptions) -> None:
    """One thread per app touches ``.alive`` in each of this process's job folders, so that another
    process sharing the work dir (or this one's sweep) can tell a live job from a dead one."""
    if opts.heartbeat is not None and opts.heartbeat.is_alive() and not opts.idle.is_set():
        return

    opts.idle.clear()

    def beat() -> None:
        while opts.live:  # ends with the last job; the next job starts another
            if opts.idle.wait(_HEARTBEAT_S):
                return
            for job_dir in list(opts.live.values()):
                try:
                    os.utime(job_dir / ".alive")
                except OSError:
                    pass

    opts.heartbeat = threading.Thread(target=beat, name="synapse-heartbeat", daemon=True)
    opts.heartbeat.start()


def _shards_param(value: str | None) -> tuple[int, str | None]:
    """``?shards=N``: how many worker processes of this server the job is split across (at most one per core)."""
    if value is None or value in ("", "auto", "1"):
        return 1, None
    most = os.cpu_count() or 1
    if not value.isdigit() or not 1 <= int(value) <= most:
        return 1, f"shards: expected 1..{most} (this server's cores) or auto, got {value!r}"
    return int(value), None


async def _sweep(opts: ServerOptions) -> None:
    """Remove job folders whose artifacts expired, and those of jobs whose process died; and the
    detached jobs that ended more than ``keep_jobs_days`` ago (``DetachedJobs.prune``).

    A finished job's age is its ``.done``; a job still uploading or running (here or in another
    process sharing the work dir) keeps a fresh ``.alive`` and is never removed, however long it runs."""
    now = time.time()
    if now - opts.last_sweep < min(_SWEEP_EVERY_S, opts.artifact_ttl_s):
        return
    opts.last_sweep = now

    def sweep() -> None:
        if opts.detached is not None:
            opts.detached.prune()
        for job_dir in opts.jobs_dir.iterdir():
            if opts.sweeps_stop.is_set():  # the server is stopping: the rest waits for the next sweep
                return
            if job_dir.name in opts.live:
                continue
            try:
                done = job_dir / ".done"
                if done.exists():
                    expired = now - done.stat().st_mtime > opts.artifact_ttl_s
                elif (job_dir / ".alive").exists():
                    expired = now - (job_dir / ".alive").stat().st_mtime > _HEARTBEAT_STALE_S
                else:  # neither: an older server's folder
                    expired = now - job_dir.stat().st_mtime > max(opts.artifact_ttl_s, _HEARTBEAT_STALE_S)
            except OSError:
                continue
            if expired:
                remove_tree(job_dir)

    await anyio.to_thread.run_sync(sweep)


async def _sweep_timer(opts: ServerOptions) -> None:
    """``_sweep`` every ``min(60 s, artifact_ttl_s)`` while the app runs, idle or not, from its start:
    outputs expire and old jobs are pruned without waiting for the next job. A sweep a request ran
    meanwhile counts (``last_sweep``); a sweep that fails is one warning line, and the next one is due
    as usual. Runs in the app's lifespan, which cancels it."""
    every = max(min(_SWEEP_EVERY_S, opts.artifact_ttl_s), _SWEEP_TIMER_MIN_S)
    while not opts.sweeps_stop.is_set():
        try:
            await _sweep(opts)
        except Exception as exc:  # noqa: BLE001 - e.g. the jobs folder gone, a locked store: try again later
            log.warning("synapse serve: the sweep of %s failed (%s: %s); the next is in %g s", opts.jobs_dir, type(exc).__name__, exc, every)
        # sleep until the next sweep is due; at least a little, should the clock say it is already
        await anyio.sleep(max(opts.last_sweep + every - time.time(), 0.05))
