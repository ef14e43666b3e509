"""The server's error bodies and how a refusal is sent before a request's body was read.

Errors before a stream starts are JSON bodies shaped like the stream's last line:
``{"type": "error", "code": 2, "message": "...", "error": "UsageError"}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

DRAIN_MAX_BYTES = 1024 * 1024  # a refused request's body up to this size is read and dropped, so the client sees the answer


def error(status: int, message: str, code: int = 2, error: str = "UsageError", close: bool = False, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": "error", "code": code, "message": message, "error": error}
    hdrs = dict(headers or {})
    if close:  # don't read (or drain) the rest of a body we refuse
        hdrs["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=hdrs)


def busy(status: int, message: str, retry_after_s: int) -> JSONResponse:
    """A refusal the client should retry (429, 503, 507): a BackendError with ``Retry-After``."""
    return error(status, message, code=3, error="BackendError", close=True, headers={"Retry-After": str(retry_after_s)})


class Refused(Exception):
    """Raised by a dependency (the key check): ``response`` is the refusal, ready to send."""

    def __init__(self, response: JSONResponse) -> None:
        self.response = response


async def refuse(request: Request, response: JSONResponse, body_timeout_s: float | None) -> JSONResponse:
    """A refusal before the body was read: a small body is read and dropped first (else the client,
    still sending, sees a reset instead of the answer); a large one is left unread, the connection closed."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= DRAIN_MAX_BYTES and await drain(request, body_timeout_s):
        if "connection" in response.headers:
            del response.headers["connection"]
    else:
        response.headers["connection"] = "close"
    return response


async def drain(request: Request, timeout_s: float | None) -> bool:
    """Read and drop the rest of the request body; False if the client stalls or goes away."""
    try:
        while True:
            message: Any = await asyncio.wait_for(request.receive(), timeout_s)
            if message.get("type") != "http.request" or not message.get("more_body"):
                return bool(message.get("type") == "http.request")
    except (asyncio.TimeoutError, ClientDisconnect, RuntimeError):
        return False
