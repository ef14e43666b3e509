"""HttpBackend: run a job on a synapse HTTP endpoint (``synapse serve``, or the same app on Modal).

One job is one ``POST /v1/jobs/{kind}``: the spec as JSON plus the INPUTS files as a
multipart upload. The response is the job's NDJSON event stream, decoded line by line
as it arrives. Outputs come back as ``artifact`` events naming ``/v1/artifacts/{id}``
downloads; after ``finished`` each is downloaded to a temporary file beside its local
output and all are renamed into place (``_remote.collect_outputs``), so a broken stream
or download leaves no partial output.

Retries (``stamina``: exponential backoff with jitter) cover connect errors, 429 (its
``Retry-After`` is honoured) and 5xx *before* the stream starts. A 4xx is never retried,
and a job whose stream started is never replayed. httpx is imported here only, so
``synapse --help`` never pays for it.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx

from synapse_cli import __version__
from synapse_cli.backends._remote import ErrorMap, Outputs, collect_outputs, map_errors, one_line, path_fields, retry_until_first_event
from synapse_cli.backends.base import Backend
from synapse_cli.errors import BackendError, UsageError, error_from_wire
from synapse_cli.events import Artifact, Event, Finished, Log, from_dict
from synapse_cli.jobs import spec_to_dict

MAX_RETRY_AFTER_S = 60.0
DIR_TAR = "application/x-synapse-dir+tar"  # how a directory input travels (synapse_cli.server.uploads)
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


def _should_retry_download(exc: Exception) -> bool | float:
    # a download is idempotent: a connection that broke half-way can be tried again too
    if isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout)):
        return True
    return _should_retry(exc)


# Foreign exceptions -> ours, per phase of a job; ``{url}``, ``{attempts}`` and ``{timeout}`` come from the call.
_START_ERRORS: ErrorMap = {
    _Retryable: (BackendError, "{url} answered {detail} ({attempts})"),
    httpx.ConnectTimeout: (BackendError, "cannot reach {url}: timed out connecting ({attempts})"),
    httpx.ConnectError: (BackendError, "cannot reach {url}: {detail} ({attempts})"),
    httpx.TimeoutException: (BackendError, "no answer from {url} within {timeout:g} s (http.timeout_s)"),
}
_STREAM_ERRORS: ErrorMap = {
    httpx.TimeoutException: (BackendError, "no event from {url} for {timeout:g} s (http.timeout_s); nothing was saved"),
    httpx.TransportError: (BackendError, "the stream from {url} broke before the job finished ({detail}); nothing was saved"),
    httpx.StreamError: (BackendError, "the stream from {url} broke before the job finished ({detail}); nothing was saved"),
    httpx.DecodingError: (BackendError, "the stream from {url} broke before the job finished ({detail}); nothing was saved"),
}
_DOWNLOAD_ERRORS: ErrorMap = {
    _Retryable: (BackendError, "downloading {url}: {detail}"),
    httpx.HTTPError: (BackendError, "downloading {url} failed: {detail}"),
    OSError: (UsageError, "cannot write {folder}: {detail}"),
}


class HttpBackend(Backend):
    """Runs jobs on a synapse endpoint. ``client`` is the seam for tests (``httpx.MockTransport``)."""

    name = "http"
    run_shard = None  # type: ignore[assignment]  # the server shards a job itself: see run_sharded

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        client: httpx.Client | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        initial_backoff_ms: int = 500,
    ) -> None:
        parts = urlsplit(endpoint or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"bad endpoint URL {endpoint!r}: expected http(s)://host[:port][/prefix]")
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = initial_backoff_ms / 1000.0
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(timeout_s), follow_redirects=False, headers={"User-Agent": f"synapse/{__version__}"}
        )

    @classmethod
    def from_settings(cls, settings: Any) -> "HttpBackend":
        endpoint, key = settings["http.endpoint"], settings["api_key"]
        parts = urlsplit(endpoint or "")
        if not key and parts.scheme == "http" and parts.hostname:
            # a local `synapse serve` without SYNAPSE_API_KEY generated one and left it for us
            from synapse_cli.server.keyfile import is_loopback_host, read_key

            if is_loopback_host(parts.hostname):
                key = read_key(parts.port or 80)
        return cls(
            endpoint,
            key,
            timeout_s=settings["http.timeout_s"],
            max_retries=settings["http.max_retries"],
            initial_backoff_ms=settings["http.initial_backoff_ms"],
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- the job ------------------------------------------------------------------

    def run_sharded(self, kind: str, spec: Any, shards: int) -> Iterator[Event]:
        """The job split by the server across ``shards`` of its worker processes (``?shards=N``)."""
        return self.run(kind, spec, shards=shards)

    def run(self, kind: str, spec: Any, shards: int = 1) -> Iterator[Event]:
        """Upload, stream the events as they arrive, then download the outputs and rename them into place."""
        data = spec_to_dict(spec)
        paths = path_fields(kind, data)
        uploads = [(p.field, Path(p.value)) for p in paths if not p.output]
        targets = {(p.field, p.index): p.value for p in paths if p.output}
        overwrite = bool(data.get("overwrite", False))
        _check_inputs(uploads)
        _check_targets(targets, overwrite)
        url = f"{self.endpoint}/v1/jobs/{kind}" + (f"?shards={int(shards)}" if shards > 1 else "")
        response = yield from self._open(url, data, uploads)
        try:
            yield from collect_outputs(self._events(url, response), lambda e, out: self._fetch(e, targets, out), overwrite, url, defer=True)
        finally:
            response.close()  # on an early close this cancels the job on the server

    def _events(self, url: str, response: httpx.Response) -> Iterator[Event]:
        """The response's NDJSON lines as events, up to ``finished``."""
        with map_errors(_STREAM_ERRORS, url=url, timeout=self.timeout_s):
            for line in response.iter_lines():
                if not line.strip():
                    continue  # a keep-alive line
                event = _decode(line, url)
                yield event
                if isinstance(event, Finished):
                    return

    def _open(self, url: str, data: dict[str, Any], uploads: list[tuple[str, Path]]) -> Iterator[Event]:
        """POST the job, retrying what is safe to retry; returns the open streaming response (yields retry logs)."""
        attempts = self.max_retries + 1
        with map_errors(_START_ERRORS, url=url, timeout=self.timeout_s, attempts=f"{attempts} attempt{'s' * (attempts > 1)}"):
            try:
                return (yield from retry_until_first_event(lambda: self._post(url, data, uploads), _should_retry, self.max_retries, self.backoff_s, url))
            except (httpx.ConnectError, httpx.TimeoutException):
                raise
            except httpx.TransportError as exc:
                raise self._diagnose(url, uploads, exc) from exc

    def _post(self, url: str, data: dict[str, Any], uploads: list[tuple[str, Path]]) -> httpx.Response:
        with ExitStack() as files:
            if uploads:
                parts = [(name, _part(path, files)) for name, path in uploads]
                request = self._client.build_request("POST", url, data={"spec": json.dumps(data)}, files=parts, headers=self._headers)
            else:
                request = self._client.build_request("POST", url, json=data, headers=self._headers)
            response = self._client.send(request, stream=True)
        if response.status_code == 200:
            ctype = response.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "application/x-ndjson":
                response.close()
                raise BackendError(f"{url} is not a synapse endpoint (answered {ctype or 'no content type'} instead of an NDJSON stream)")
            return response
        try:
            body = response.read()
        finally:
            response.close()
        if response.status_code in (401, 403):
            raise BackendError(f"{KEY_REJECTED} (HTTP {response.status_code} from {url}; set SYNAPSE_API_KEY or --api-key)")
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(response.status_code, _retry_after(response.headers.get("retry-after")))
        raise _error_from_body(url, response.status_code, body)

    def _diagnose(self, url: str, uploads: list[tuple[str, Path]], exc: Exception) -> Exception:
        """The connection broke during the upload: ask /v1/health why (a wrong key, or a file over the limit)."""
        try:
            health = self._client.get(f"{self.endpoint}/v1/health", headers=self._headers, timeout=min(self.timeout_s, 10.0)).json()
        except Exception:  # noqa: BLE001 - the diagnosis is best effort
            health = {}
        if isinstance(health, dict):
            if health.get("key_accepted") is False:
                return BackendError(f"{KEY_REJECTED} (from {url}; set SYNAPSE_API_KEY or --api-key)")
            limit = health.get("max_upload_mb")
            total = sum(f.stat().st_size for _, path in uploads for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
            if isinstance(limit, (int, float)) and total > limit * 1024 * 1024:
                return UsageError(f"the upload ({total / 1048576:.1f} MB) is larger than the endpoint's limit of {limit:g} MB (serve.max_upload_mb)")
        return BackendError(f"the connection to {url} broke before the job started ({one_line(str(exc)) or type(exc).__name__})")

    # -- outputs ------------------------------------------------------------------

    def _fetch(self, event: Artifact, targets: dict[tuple[str, int | None], str], outputs: Outputs) -> Event:
        """``collect_outputs``'s callback: download one artifact into a temporary sibling of its output."""
        url, dest, _ = self._place(event, targets)
        if dest is None:
            return Log(f"artifact {event.path} matches no output of the spec and was not downloaded", level="warning")
        outputs.receive(dest, lambda tmp: self._download(url, tmp, event.bytes))
        return Artifact(path=str(dest), bytes=event.bytes)

    def _place(self, event: Artifact, targets: dict[tuple[str, int | None], str]) -> tuple[str, Path | None, Path | None]:
        """The download URL, the local destination, and (for a file of a directory output) that directory."""
        parts = urlsplit(event.path)
        if parts.scheme or parts.netloc or not parts.path.startswith("/v1/artifacts/"):
            raise BackendError(f"the endpoint sent an artifact that is not a /v1/artifacts/ path: {event.path!r:.100}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        url = self.endpoint + parts.path
        index = int(query["index"]) if query.get("index", "").isdigit() else None
        target = targets.get((query.get("output", ""), index))
        if target is None:
            return url, None, None
        base = Path(target)
        name = query.get("name")
        if not name:
            return url, base, None
        rel = PurePosixPath(name)
        if rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts) or "\\" in name:
            raise BackendError(f"the endpoint sent an unsafe artifact name {name!r}")
        return url, base.joinpath(*rel.parts), base

    def _download(self, url: str, tmp: Path, expected: int) -> None:
        def get() -> None:
            with self._client.stream("GET", url, headers=self._headers) as response:
                if response.status_code in (401, 403):
                    raise BackendError(f"{KEY_REJECTED} (HTTP {response.status_code} from {url})")
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Retryable(response.status_code, _retry_after(response.headers.get("retry-after")))
                if response.status_code != 200:
                    raise BackendError(f"downloading {url}: HTTP {response.status_code}")
                written = 0
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        written += f.write(chunk)
                if written != expected:
                    raise BackendError(f"downloading {url}: got {written} of {expected} bytes")

        with map_errors(_DOWNLOAD_ERRORS, url=url, folder=tmp.parent):
            for _ in retry_until_first_event(get, _should_retry_download, self.max_retries, self.backoff_s, url):
                pass  # a download's retries are not reported: the job already finished


# -- spec helpers --------------------------------------------------------------------


def _check_inputs(uploads: list[tuple[str, Path]]) -> None:
    for _, path in uploads:
        if not path.exists():
            raise UsageError(f"input not found: {path}")


def _part(path: Path, files: ExitStack) -> tuple[str, Any, str]:
    """A multipart file: the file itself, or a directory input as an uncompressed tar of its files."""
    if not path.is_dir():
        return (path.name, files.enter_context(open(path, "rb")), "application/octet-stream")
    import tarfile
    import tempfile

    archive = files.enter_context(tempfile.TemporaryFile())
    with tarfile.open(fileobj=archive, mode="w", dereference=True) as tar:
        for f in sorted(path.rglob("*")):
            if f.is_file():  # folders come with their files; links are followed
                tar.add(f, arcname=f.relative_to(path).as_posix(), recursive=False)
    archive.seek(0)
    return (path.resolve().name or "input", archive, DIR_TAR)


def _check_targets(targets: dict[tuple[str, int | None], str], overwrite: bool) -> None:
    """Refuse before uploading anything what could not be saved afterwards."""
    for value in targets.values():
        path = Path(value)
        if path.is_dir():  # a directory output: files are merged into it
            continue
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists (use --overwrite to replace it)")
        if not path.parent.is_dir():
            raise UsageError(f"output directory {path.parent} does not exist")


def _decode(line: str, url: str) -> Event:
    try:
        return from_dict(json.loads(line))
    except (ValueError, TypeError):
        raise BackendError(f"{url} sent a line that is not a synapse event: {line!r:.120}") from None


def _error_from_body(url: str, status: int, body: bytes) -> Exception:
    """A 4xx: the server's JSON error (same shape as the stream's ``error`` line), else a BackendError."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("type") == "error" and isinstance(data.get("message"), str):
        return error_from_wire(data.get("error"), data.get("code"), data["message"])
    return BackendError(f"{url} answered HTTP {status}: {one_line(body.decode('utf-8', 'replace')) or 'no body'}")
