"""The jobs page's side of the server: its cookie sessions, and the page itself.

The page (``jobs.html``, one file with inline CSS and JS) asks for the API key once and posts it to
``POST /v1/session``; the answer sets ``synapse_session``, an opaque random token (never the key)
that this process maps to "authenticated" until it expires. The cookie is ``HttpOnly`` (page scripts
cannot read it) and ``SameSite=Strict`` (other sites' pages never send it); on top of that a request
that carries it and an ``Origin`` header is accepted only when that Origin is the server's own.

Tokens live in memory: a restarted server forgets them, and the page asks for the key again.
Imports nothing heavy.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from importlib import resources
from typing import Any, Callable, Mapping

COOKIE = "synapse_session"
TTL_S = 12 * 3600.0
MAX_SESSIONS = 1000  # beyond this, the oldest token is forgotten
MAX_BODY_BYTES = 4096  # POST /v1/session: {"key": ...} and nothing large
# the routes a session cookie may drive (the page's fetch() calls, its EventSource, artifact links)
COOKIE_PATHS = ("/v1/jobs", "/v1/artifacts/")

# POST /v1/session in the OpenAPI document (the route reads its body by hand, with a size limit)
OPENAPI = {"security": [], "requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["key"], "additionalProperties": True, "properties": {"key": {"type": "string", "description": "the server's API key"}}}}}}}
_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {
    "type": {"const": "error"}, "code": {"type": "integer"}, "message": {"type": "string"}, "error": {"type": "string"}}}}}}
OPENAPI_RESPONSES: dict[int | str, dict[str, Any]] = {
    204: {"description": f"the key is right: `Set-Cookie: {COOKIE}=<opaque token>; HttpOnly; SameSite=Strict; Path=/`"},
    401: {"description": "wrong key (counted like any wrong key)", **_ERROR},
    403: {"description": "an Origin header other than this server's own", **_ERROR},
    404: {"description": "the server has no API key", **_ERROR},
    413: {"description": "a body over 4096 bytes", **_ERROR},
    422: {"description": 'not a JSON object {"key": "<string>"}', **_ERROR},
    429: {"description": "too many wrong keys from this address (Retry-After)", **_ERROR},
}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Sessions:
    """Opaque tokens -> expiry. Only each token's SHA-256 is kept, so the table's keys say nothing usable.

    ``clock`` is a seam for tests (defaults to ``time.monotonic``)."""

    def __init__(self, ttl_s: float = TTL_S, max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def issue(self) -> str:
        """A new token, valid for ``ttl_s``."""
        now = self._clock()
        for digest, expiry in list(self._expiry.items()):  # oldest first: drop the expired ones
            if expiry > now:
                break
            del self._expiry[digest]
        while len(self._expiry) >= self.max_sessions:
            self._expiry.popitem(last=False)
        token = secrets.token_urlsafe(32)
        self._expiry[_digest(token)] = now + self.ttl_s
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        digest = _digest(token)
        expiry = self._expiry.get(digest)
        if expiry is None:
            return False
        if expiry <= self._clock():
            self._expiry.pop(digest, None)
            return False
        return True

    def __len__(self) -> int:
        return len(self._expiry)


def cookie_header(token: str, ttl_s: float, secure: bool) -> str:
    """The ``Set-Cookie`` value (written by hand: Starlette spells ``SameSite=strict``)."""
    header = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={int(ttl_s)}"
    return header + "; Secure" if secure else header


def own_origin(scheme: str, headers: Mapping[str, str]) -> str:
    """The origin a page served by this request's ``Host`` has, e.g. ``http://127.0.0.1:8000``."""
    return f"{scheme}://{headers.get('host', '')}".lower()


def foreign_origin(scheme: str, headers: Mapping[str, str]) -> bool:
    """True when the request carries an ``Origin`` header other than the server's own origin."""
    origin = headers.get("origin")
    return origin is not None and origin.strip().lower() != own_origin(scheme, headers)


def uses_cookie(path: str) -> bool:
    return path.startswith(COOKIE_PATHS)


# -- the page ------------------------------------------------------------------------------

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
_STYLE = re.compile(r"<style>(.*?)</style>", re.S)
_page: tuple[bytes, dict[str, str]] | None = None


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def page() -> tuple[bytes, dict[str, str]]:
    """``jobs.html`` and its headers: a Content-Security-Policy that allows exactly its own inline
    script and style (by hash), requests to this origin only, and no framing (the page has buttons)."""
    global _page
    if _page is None:
        html = resources.files("synapse_cli.server").joinpath("jobs.html").read_text(encoding="utf-8")
        scripts = " ".join(_hash(s) for s in _SCRIPT.findall(html))
        styles = " ".join(_hash(s) for s in _STYLE.findall(html))
        csp = (f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src 'self' data:; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        headers = {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                   "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        _page = (html.encode("utf-8"), headers)
    return _page
