"""The HTTP backend's errors: a refusal's status and body as our exceptions, and which failures are retried (and after how long)."""

from __future__ import annotations

import json
import time

import httpx

from synapse_cli.errors import BackendError, error_from_wire, one_line


MAX_RETRY_AFTER_S = 60.0


KEY_REJECTED = "endpoint rejected the API key"


class _Retryable(Exception):
    """A 429 or 5xx answer before the stream started."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _should_retry(exc: Exception) -> bool | float:
    """stamina's hook: True to retry with backoff, a float to wait exactly that long (Retry-After)."""
    if isinstance(exc, _Retryable):
        return exc.retry_after if exc.retry_after is not None else True
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


def _should_retry_events(exc: Exception) -> bool | float:
    # GET /events is idempotent: any transport failure (refused, reset, timed out) is worth another try
    if isinstance(exc, httpx.TransportError):
        return True
    return _should_retry(exc)


class _NoJob(Exception):
    """A 404 for a detached job."""


class _ArtifactGone(Exception):
    """A 404/410 for a finished job's output: it expired, so it can never be downloaded. Private, like
    ``_Retryable``: it reaches the user as the BackendError it maps to (``_DOWNLOAD_ERRORS``), never by its name."""


def _should_retry_download(exc: Exception) -> bool | float:
    # a download is idempotent: a connection that broke half-way can be tried again too
    if isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout)):
        return True
    return _should_retry(exc)


def _refusal(response: httpx.Response, url: str) -> Exception:
    """What a streamed request that did not get its 200 raises: a wrong key, a retryable 429/5xx, or the server's own error."""
    try:
        body = response.read()
    finally:
        response.close()
    if response.status_code in (401, 403):
        return BackendError(f"{KEY_REJECTED} (HTTP {response.status_code} from {url}; set SYNAPSE_API_KEY or --api-key)")
    if response.status_code == 429 or response.status_code >= 500:
        return _Retryable(response.status_code, _retry_after(response.headers.get("retry-after")))
    return _error_from_body(url, response.status_code, body)


def _error_from_body(url: str, status: int, body: bytes) -> Exception:
    """A 4xx: the server's JSON error (same shape as the stream's ``error`` line), else a BackendError."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("type") == "error" and isinstance(data.get("message"), str):
        return error_from_wire(data.get("error"), data.get("code"), data["message"])
    return BackendError(f"{url} answered HTTP {status}: {one_line(body.decode('utf-8', 'replace'), 200) or 'no body'}")
