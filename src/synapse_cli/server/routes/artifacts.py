"""``GET /v1/artifacts/{id}``: an output file of a finished job (410 once expired, for a job still on record)."""

from __future__ import annotations

import re
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from synapse_cli.server import runner
from synapse_cli.server.auth import keyed
from synapse_cli.server.responses import error, refuse
from synapse_cli.server.state import of

router = APIRouter(dependencies=[Depends(keyed)])
ARTIFACT_ID = re.compile(r"([A-Za-z0-9_-]{16,64})\.([0-9]{1,6})")


@router.get("/v1/artifacts/{artifact_id}")
async def artifact(artifact_id: str, request: Request) -> Any:
    opts = of(request)
    match = ARTIFACT_ID.fullmatch(artifact_id)
    path = runner.artifact_path(opts.jobs_dir, match[1], match[2]) if match else None
    if path is None:
        if match and opts.detached is not None and await anyio.to_thread.run_sync(opts.detached.find, match[1]) is not None:
            return error(410, f"artifact {artifact_id!r} has expired (outputs are kept {opts.artifact_ttl_s:g} s after their job ends)")
        return await refuse(request, error(404, f"no artifact {artifact_id!r} (expired, or never existed)"), opts.body_timeout_s or None)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)
