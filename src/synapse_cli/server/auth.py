"""Who may use the server: the API key (counted per address, 429 past ``max_key_failures`` a minute),
the jobs page's cookie, and the refusal of web pages and foreign ``Host`` names for a keyless server.

``keyed`` is the dependency of every route but the page, the session and ``/v1/health``: it runs
``gate`` before any body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque

from fastapi import Request
from fastapi.responses import JSONResponse

from synapse_cli.protocol import is_loopback_host
from synapse_cli.server import session
from synapse_cli.server.responses import Refused, error, refuse
from synapse_cli.server.state import ServerOptions, of

KEY_FAILURE_WINDOW_S = 60.0


def host_of(header: str) -> str:
    """The host part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``127.0.0.1:80`` -> ``127.0.0.1``."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def unauthorized() -> JSONResponse:
    return error(401, "missing or wrong API key", code=3, error="BackendError", close=True, headers={"WWW-Authenticate": "Bearer"})


def throttled(opts: ServerOptions, address: str) -> float:
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


def key_refusal(opts: ServerOptions, address: str, key: str) -> JSONResponse | None:
    """None for the right key; else 401, counted against ``address`` (429 once it has too many)."""
    assert opts.api_key is not None
    wait = throttled(opts, address)
    if wait > 0:
        return error(429, "too many wrong API keys from this address; try again later", code=3, error="BackendError",
                     close=True, headers={"Retry-After": str(max(1, int(wait + 0.999)))})  # fmt: skip
    if hmac.compare_digest(_digest(key), _digest(opts.api_key)):
        return None
    opts.key_failures.setdefault(address, deque()).append(time.monotonic())
    if len(opts.key_failures) > 10_000:  # bounded memory: forget the oldest addresses
        for old in list(opts.key_failures)[:5_000]:
            opts.key_failures.pop(old, None)
    return unauthorized()


def cookie_refusal(request: Request) -> JSONResponse | None:
    """The page's cookie instead of the key: refused (403) from another origin's page, and 401 when
    the token is unknown or expired (not counted as a wrong key: a restarted server forgets its
    tokens, and the 256-bit token cannot be guessed)."""
    if session.foreign_origin(request.url.scheme, request.headers):
        return error(403, "requests from another site's page are refused", code=3, error="BackendError", close=True)
    sessions: session.Sessions = request.app.state.sessions
    return None if sessions.valid(request.cookies.get(session.COOKIE)) else unauthorized()


def gate(request: Request, need_key: bool = True) -> JSONResponse | None:
    """None when the request may go on, else the refusal.

    A request with the right key may do anything. Without it, a request from a web page
    (``Origin``) or for a non-loopback ``Host`` (DNS rebinding) is refused (403), and on a
    server with a key only ``/v1/health`` is open (401 elsewhere). Wrong keys are counted
    per address; past ``max_key_failures`` a minute, that address gets 429 for a while.
    """
    opts = of(request)
    header = request.headers.get("authorization")
    if header is not None and opts.api_key is not None:
        scheme, _, token = header.partition(" ")
        refused = key_refusal(opts, client_of(request), token.strip() if scheme.lower() == "bearer" else "")
        if refused is None or need_key or refused.status_code == 429:
            return refused
        # /v1/health answers a wrong key exactly as it answers no key
    elif header is None and opts.api_key is not None and session.COOKIE in request.cookies and session.uses_cookie(request.url.path):
        return cookie_refusal(request)
    if "origin" in request.headers or not is_loopback_host(host_of(request.headers.get("host", ""))):
        return error(403, "requests from a web page (Origin header) or for a non-loopback Host need the API key", code=3, error="BackendError", close=True)
    if need_key and opts.api_key is not None:
        return unauthorized()
    return None


async def keyed(request: Request) -> None:
    """The dependency of every keyed route: ``gate`` first, before any body is read."""
    refused = gate(request)
    if refused is not None:
        raise Refused(await refuse(request, refused, of(request).body_timeout_s or None))
