"""The jobs page (``GET /``, which holds no data, so no key) and its cookie (``POST /v1/session``); see ``server/session.py``."""

from __future__ import annotations

import json

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.requests import ClientDisconnect

from synapse_cli.server import session
from synapse_cli.server.auth import client_of, key_refusal
from synapse_cli.server.responses import error, refuse
from synapse_cli.server.state import of

router = APIRouter()


@router.get("/", response_class=HTMLResponse, openapi_extra={"security": []}, responses={200: {"description": "the jobs page (no data in it)"}})
async def jobs_page() -> Response:
    html, headers = session.page()  # the page holds no data: no key needed
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


async def _read_small_body(request: Request, timeout_s: float | None) -> bytes | Response:
    body = b""
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > session.MAX_BODY_BYTES:
                    return error(413, f"the body is larger than {session.MAX_BODY_BYTES} bytes", close=True)
    except (TimeoutError, ClientDisconnect):
        return error(408, "the request body did not arrive in time", close=True)
    return body


@router.post("/v1/session", status_code=204, openapi_extra=session.OPENAPI, responses=session.OPENAPI_RESPONSES)
async def new_session(request: Request) -> Response:
    """``{"key": KEY}`` -> 204 and the ``synapse_session`` cookie; a wrong key is 401, counted like any other."""
    opts = of(request)
    if opts.api_key is None:
        return await refuse(request, error(404, "this server has no API key, so no sessions (the jobs page needs a key)"), opts.body_timeout_s or None)
    if session.foreign_origin(request.url.scheme, request.headers):
        refusal = error(403, "requests from another site's page are refused", code=3, error="BackendError", close=True)
        return await refuse(request, refusal, opts.body_timeout_s or None)
    body = await _read_small_body(request, opts.body_timeout_s or None)
    if isinstance(body, Response):
        return body
    try:
        key = json.loads(body)["key"]
        key.encode("utf-8")  # a lone surrogate from JSON is a bad body, not a 500
    except (ValueError, KeyError, TypeError, AttributeError):
        return error(422, 'expected a JSON body {"key": "<the API key>"}')
    refused = key_refusal(opts, client_of(request), key)
    if refused is not None:
        return refused
    sessions: session.Sessions = request.app.state.sessions
    cookie = session.cookie_header(sessions.issue(), sessions.ttl_s, secure=request.url.scheme == "https")
    return Response(status_code=204, headers={"Set-Cookie": cookie, "Cache-Control": "no-store"})
