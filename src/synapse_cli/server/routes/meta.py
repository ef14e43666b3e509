"""``GET /v1/health`` (open: status, version, kinds, limits, auth mode) and ``GET /v1/openapi.json`` (behind the key)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from synapse_cli import __version__
from synapse_cli.server.auth import gate, keyed
from synapse_cli.server.responses import refuse
from synapse_cli.server.state import of

router = APIRouter()


@router.get("/v1/health")
async def health(request: Request) -> Any:
    from synapse_cli.jobs import JOBS

    opts = of(request)
    refused = gate(request, need_key=False)
    if refused is not None:
        return await refuse(request, refused, opts.body_timeout_s or None)
    return {"status": "ok", "version": __version__, "jobs": list(JOBS), "max_upload_mb": opts.max_upload_mb,
            "auth": "none" if opts.api_key is None else "bearer"}  # fmt: skip


@router.get("/v1/openapi.json", include_in_schema=False, dependencies=[Depends(keyed)])
async def openapi(request: Request) -> Any:
    """The whole API (``server/openapi.py``), built once per app; behind the key, like everything but /v1/health."""
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        from synapse_cli.server.openapi import build

        state.openapi = await anyio.to_thread.run_sync(build, request.app)
    return JSONResponse(state.openapi)
