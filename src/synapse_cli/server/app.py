"""The ASGI app: ``create_app(...)`` returns a FastAPI app exposing every job kind.

Routes (see docs/http.md):

- ``GET  /v1/health``                -> JSON: status, version, job kinds, upload limit, auth mode.
- ``POST /v1/jobs/{kind}``           -> the job's events as NDJSON (``application/x-ndjson``), as they happen.
- ``GET  /v1/artifacts/{id}``        -> an output file of a finished job.

Errors before the stream starts are JSON bodies shaped like the stream's last
line: ``{"type": "error", "code": 2, "message": "...", "error": "UsageError"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from synapse_cli import __version__
from synapse_cli.render.ndjson import encode
from synapse_cli.server import runner
from synapse_cli.server.uploads import BadUpload, read_body, remove_tree

log = logging.getLogger("synapse.server")

NDJSON = "application/x-ndjson"
_ARTIFACT_ID = re.compile(r"([A-Za-z0-9_-]{16,64})\.([0-9]{1,6})")
_SWEEP_EVERY_S = 60.0


@dataclass
class ServerOptions:
    """What the app needs; ``create_app`` builds it from settings and keyword arguments."""

    work_dir: Path
    api_key: str | None = None
    max_upload_mb: int = 2048
    allow_anonymous: bool = False  # only `synapse serve` on a loopback address sets this
    artifact_ttl_s: float = 3600.0
    models_dir: Path | None = None  # owner-installed models a client may name (besides the bundled default)
    running: set[str] = field(default_factory=set)
    last_sweep: float = 0.0

    @property
    def jobs_dir(self) -> Path:
        return self.work_dir / "jobs"

    @property
    def max_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024


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
    artifact_ttl_s: float = 3600.0,
    models_dir: str | Path | None = None,
) -> FastAPI:
    """The synapse HTTP app.

    ``settings`` (a resolved ``Settings``) supplies ``serve.work_dir``, ``api_key`` and
    ``serve.max_upload_mb`` and ``serve.models_dir``; keyword arguments override them. Without an API key the app
    refuses to be built unless ``allow_anonymous=True`` (what ``synapse serve`` passes on a
    loopback address). Without a work dir, a fresh temporary folder is used.
    """
    settings = settings or {}
    work_dir = work_dir or settings.get("serve.work_dir")
    api_key = api_key if api_key is not None else settings.get("api_key")
    max_upload_mb = max_upload_mb if max_upload_mb is not None else settings.get("serve.max_upload_mb", 2048)
    if not api_key and not allow_anonymous:
        raise ValueError("create_app needs an api_key (SYNAPSE_API_KEY), or allow_anonymous=True for a loopback-only server")
    models_dir = models_dir if models_dir is not None else settings.get("serve.models_dir")
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="synapse-serve-"))
    opts = ServerOptions(
        root.resolve(), api_key or None, int(max_upload_mb), allow_anonymous, artifact_ttl_s,
        Path(models_dir).expanduser().resolve() if models_dir else None,
    )  # fmt: skip
    opts.jobs_dir.mkdir(parents=True, exist_ok=True)

    app = FastAPI(title="synapse", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.synapse = opts

    def key_status(request: Request) -> bool | None:
        """True: the right key; False: missing or wrong; None: the server needs none."""
        if opts.api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        return hmac.compare_digest(_digest(token.strip()), _digest(opts.api_key))

    def unauthorized() -> JSONResponse:
        return _error(401, "missing or wrong API key", code=3, error="BackendError", close=True, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, f"bad request: {exc.errors()[0].get('msg', 'invalid')}")

    @app.get("/v1/health")
    async def health(request: Request) -> dict[str, Any]:
        from synapse_cli.jobs import JOBS

        return {
            "status": "ok",
            "version": __version__,
            "jobs": list(JOBS),
            "max_upload_mb": opts.max_upload_mb,
            "auth": "none" if opts.api_key is None else "bearer",
            "key_accepted": key_status(request),
        }

    @app.post("/v1/jobs/{kind}")
    async def run_job(kind: str, request: Request) -> Any:
        from synapse_cli.jobs import JOBS

        if key_status(request) is False:
            return unauthorized()
        if kind not in JOBS:
            return _error(404, f"unknown job kind {kind!r}; expected one of {', '.join(JOBS)}", close=True)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > opts.max_bytes:
            return _error(413, f"the upload ({int(length) / 1048576:.1f} MB) is larger than the server's limit of {opts.max_upload_mb} MB", close=True)
        await _sweep(opts)
        job_id = secrets.token_urlsafe(16)
        job_dir = opts.jobs_dir / job_id
        job_dir.mkdir()
        try:
            body = await read_body(request.headers.get("content-type", ""), request.stream(), job_dir / "in", opts.max_bytes)
            run = runner.prepare(kind, body, job_dir, job_id, opts.models_dir)
        except BadUpload as exc:
            remove_tree(job_dir)
            return _error(exc.status, exc.message, close=exc.status == 413)
        except ClientDisconnect:  # gone mid-upload: nothing to answer, nothing to keep
            remove_tree(job_dir)
            return _error(400, "the client disconnected during the upload", close=True)
        except BaseException:  # the client went away mid-upload, or a bug: leave nothing behind
            remove_tree(job_dir)
            raise
        return StreamingResponse(
            _stream(run, opts),
            media_type=NDJSON,
            headers={"X-Synapse-Job": job_id, "Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/artifacts/{artifact_id}")
    async def artifact(artifact_id: str, request: Request) -> Any:
        if key_status(request) is False:
            return unauthorized()
        match = _ARTIFACT_ID.fullmatch(artifact_id)
        path = runner.artifact_path(opts.jobs_dir, match[1], match[2]) if match else None
        if path is None:
            return _error(404, f"no artifact {artifact_id!r} (expired, or never existed)")
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    return app


async def _stream(run: runner.JobRun, opts: ServerOptions) -> AsyncIterator[bytes]:
    """Start the job and stream its events; the generator's close (client gone) cancels the job."""
    import asyncio

    channel = runner.Channel(asyncio.get_running_loop())
    opts.running.add(run.job_id)

    def on_end(r: runner.JobRun, ok: bool) -> None:
        try:
            runner.finish(r, ok)
        finally:
            opts.running.discard(r.job_id)

    runner.run_in_thread(run, channel, on_end)
    try:
        while True:
            batch = await channel.get_batch()
            lines: list[str] = []
            done = False
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
        channel.close()  # wakes the worker: it stops at the job's next event and closes the generator


async def _sweep(opts: ServerOptions) -> None:
    """Remove job folders whose artifacts expired (and leftovers of an earlier process)."""
    now = time.time()
    if now - opts.last_sweep < min(_SWEEP_EVERY_S, opts.artifact_ttl_s):
        return
    opts.last_sweep = now

    def sweep() -> None:
        for job_dir in opts.jobs_dir.iterdir():
            if job_dir.name in opts.running:
                continue
            marker = job_dir / ".done"
            try:
                stamp = marker.stat().st_mtime if marker.exists() else job_dir.stat().st_mtime
            except OSError:
                continue
            if now - stamp > opts.artifact_ttl_s:
                remove_tree(job_dir)

    import anyio

    await anyio.to_thread.run_sync(sweep)
