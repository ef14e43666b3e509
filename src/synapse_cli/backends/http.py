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

Detached jobs (``--detach``, issue #15): the same upload with ``?detach=true``, answered 202 with
the server's job id, which the job store keeps with the endpoint (never the key). ``follow``
reads ``GET /v1/jobs/{id}/events?after=N`` and copies each event into the store (``_Mirror``),
so a dropped connection or an interrupted ``jobs wait`` resumes at the next index; ``cancel``
is ``DELETE /v1/jobs/{id}``; ``refresh`` is ``GET /v1/jobs/{id}`` for ``jobs show``/``list``.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Generator, Iterator, Mapping, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from synapse_cli import __version__
from synapse_cli.backends._remote import ErrorMap, Outputs, collect_outputs, map_errors, one_line, path_fields, retry_until_first_event
from synapse_cli.backends.base import Backend
from synapse_cli.errors import BackendError, UsageError, error_from_wire
from synapse_cli.events import Artifact, Event, Failed, Finished, Log, Progress, from_dict
from synapse_cli.jobs import get_kind, spec_to_dict

MAX_RETRY_AFTER_S = 60.0
DIR_TAR = "application/x-synapse-dir+tar"  # how a directory input travels (synapse_cli.server.uploads)
KEY_REJECTED = "endpoint rejected the API key"
# following a detached job's /events: attempts per outage (backoff from http.initial_backoff_ms up to 30 s
# apart, about 2.5 minutes with the default 500 ms); every connection that answers renews them
EVENTS_RETRIES = 10
_REMOTE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # an endpoint's job id, as it goes into URLs
T = TypeVar("T")


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
_REQUEST_ERRORS: ErrorMap = {
    _Retryable: (BackendError, "{url} answered {detail} ({attempts})"),
    httpx.ConnectTimeout: (BackendError, "cannot reach {url}: timed out connecting ({attempts})"),
    httpx.ConnectError: (BackendError, "cannot reach {url}: {detail} ({attempts})"),
    httpx.TimeoutException: (BackendError, "no answer from {url} within {timeout:g} s (http.timeout_s; {attempts})"),
    httpx.TransportError: (BackendError, "lost {url}: {detail} ({attempts})"),
}
_DOWNLOAD_ERRORS: ErrorMap = {
    _Retryable: (BackendError, "downloading {url}: {detail}"),
    _ArtifactGone: (BackendError, "{detail}"),
    httpx.HTTPError: (BackendError, "downloading {url} failed: {detail}"),
    OSError: (UsageError, "cannot write {folder}: {detail}"),
}


class HttpBackend(Backend):
    """Runs jobs on a synapse endpoint. ``client`` is the seam for tests (``httpx.MockTransport``)."""

    name = "http"
    detaches_shards = True  # ?detach=true&shards=N: the server splits a detached job as it does a streamed one
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
    def from_settings(cls, settings: Any, endpoint: str | None = None) -> "HttpBackend":
        """From ``[http]`` and ``api_key``; ``endpoint`` (a detached job's own) replaces ``http.endpoint``."""
        endpoint, key = endpoint or settings["http.endpoint"], settings["api_key"]
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
        data, uploads, targets, overwrite = _prepare(kind, spec)
        url = f"{self.endpoint}/v1/jobs/{kind}" + (f"?shards={int(shards)}" if shards > 1 else "")
        response = yield from self._open(url, data, uploads)
        try:
            yield from collect_outputs(self._events(url, response), lambda e, out: self._fetch(e, targets, out), overwrite, url, defer=True)
        finally:
            response.close()  # on an early close this cancels the job on the server

    def _events(self, url: str, response: httpx.Response) -> Iterator[Event]:
        """The response's NDJSON lines as events, to the end of the stream: after ``finished`` the
        server sends the job's ``error`` if it failed after finishing (compile's inputs that failed)."""
        lines = response.iter_lines()
        with map_errors(_STREAM_ERRORS, url=url, timeout=self.timeout_s):
            for line in lines:
                if not line.strip():
                    continue  # a keep-alive line
                event = _decode(line, url)
                yield event
                if isinstance(event, Finished):
                    break
            else:
                return
        try:  # the outputs are in place by now: a stream that breaks here loses nothing
            for line in lines:
                if line.strip():
                    yield _decode(line, url)
        except (httpx.TransportError, httpx.StreamError, httpx.DecodingError):
            return

    def _open(self, url: str, data: dict[str, Any], uploads: list[tuple[str, Path]], detach: bool = False) -> Iterator[Event]:
        """POST the job, retrying what is safe to retry; returns the open streaming response, or with
        ``detach`` the server's 202 answer (yields retry logs)."""
        attempts = self.max_retries + 1
        with map_errors(_START_ERRORS, url=url, timeout=self.timeout_s, attempts=f"{attempts} attempt{'s' * (attempts > 1)}"):
            try:
                return (yield from retry_until_first_event(lambda: self._post(url, data, uploads, detach), _should_retry, self.max_retries, self.backoff_s, url))
            except (httpx.ConnectError, httpx.TimeoutException):
                raise
            except httpx.TransportError as exc:
                raise self._diagnose(url, uploads, exc) from exc

    def _post(self, url: str, data: dict[str, Any], uploads: list[tuple[str, Path]], detach: bool = False) -> Any:
        with ExitStack() as files:
            if uploads:
                parts = [(name, _part(path, files)) for name, path in uploads]
                request = self._client.build_request("POST", url, data={"spec": json.dumps(data)}, files=parts, headers=self._headers)
            else:
                request = self._client.build_request("POST", url, json=data, headers=self._headers)
            response = self._client.send(request, stream=True)
        if response.status_code == 202 and detach:
            try:
                return _accepted(url, response.read())
            finally:
                response.close()
        if response.status_code == 200:
            ctype = response.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "application/x-ndjson":
                response.close()
                raise BackendError(f"{url} is not a synapse endpoint (answered {ctype or 'no content type'} instead of an NDJSON stream)")
            if detach:  # a server without detached jobs streams the job instead; closing the stream cancels it
                response.close()
                raise BackendError(f"{self.endpoint} does not keep detached jobs (an older synapse serve?): run without --detach")
            return response
        raise _refusal(response, url)

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

    # -- detached jobs: POST ?detach=true, then GET /v1/jobs/{id}, its /events, DELETE ------------------

    def detach(self, kind: str, spec: Any, job: Any, store: Any, env: Mapping[str, str]) -> None:
        """Upload as ``run`` does and POST with ``?detach=true``: the server answers 202 with its job id
        once the inputs are stored. The store keeps the endpoint, that id and where the outputs go (never the key)."""
        data, uploads, targets, overwrite = _prepare(kind, spec)
        store.set_pid(job.id, os.getpid())  # this process vouches for the row while it uploads (no reaping a long upload)
        query = {"detach": "true"}
        shards = (job.flags or {}).get("shards.count")
        if shards not in (None, "auto", 1, "1"):  # the server splits the job across its own workers
            if not get_kind(kind).shardable:
                raise UsageError(f"--shards: {kind} jobs do not shard")
            query["shards"] = str(int(shards))
        url = f"{self.endpoint}/v1/jobs/{kind}?{urlencode(query)}"
        accepted = _returned(self._open(url, data, uploads, detach=True))
        remote = {"endpoint": self.endpoint, "id": accepted["id"], "kind": kind, "overwrite": overwrite,
                  "targets": [[name, index, value] for (name, index), value in targets.items()]}  # fmt: skip
        try:
            store.set_remote(job.id, remote)
            store.start(job.id, pid=None)
        except BaseException:  # nobody could ever follow it: it must not run on unseen
            try:
                self._request("DELETE", self._job_url(remote), retries=0)
            except Exception:  # noqa: BLE001 - best effort while already failing
                pass
            raise

    def follow(self, job: Any, store: Any) -> Iterator[Event]:
        """Re-attach: the job's events from where the job store left off (``/events?after=N``),
        reconnecting when the connection drops, then its outputs downloaded and renamed into place.

        The server's events are copied into the store as they come (its event i is the store's
        row i+1), so an interrupted ``jobs wait`` resumes without a gap or a duplicate. Closing
        this iterator stops following; the job goes on on the server (``cancel`` stops it).
        """
        remote = job.remote or {}
        job_url = self._job_url(remote)
        targets = {(name, index): value for name, index, value in remote.get("targets", [])}
        mirror = _Mirror(store, job.id)
        events = self._remote_events(job, job_url, mirror)
        local = collect_outputs(events, lambda e, out: self._fetch(e, targets, out), bool(remote.get("overwrite")), job_url, defer=True)
        result: dict[str, Any] | None = None  # the finished result: every output is in place
        try:
            for event in local:
                if isinstance(event, Finished):
                    result = event.result
                yield event
        except BackendError as exc:
            if result is None and isinstance(exc.__cause__, _ArtifactGone):  # it can never complete here: not `processing` for ever
                _store_write(lambda: store.finish(job.id, "failed", error_code=3, error_message=str(exc)))
            raise
        finally:
            local.close()  # an early close removes what was downloaded so far
            mirror.flush()
            if result is not None:  # an error after it (compile's inputs that failed) was recorded first, with the result (_ended)
                _store_write(lambda: store.finish(job.id, "completed", result=result))

    def cancel(self, job: Any, store: Any) -> None:
        """``DELETE /v1/jobs/{id}``: the server kills the job's processes and removes its outputs."""
        url = self._job_url(job.remote or {})
        response = self._request("DELETE", url)
        if response.status_code == 200:
            _store_write(lambda: store.finish(job.id, "cancelled", error_code=130, error_message="cancelled by synapse jobs cancel"))
            return
        if response.status_code == 404:
            raise self._gone(job, store)
        if response.status_code == 409:  # it ended first
            record = self.refresh(job, store)
            status = record.get("status", "finished")
            hint = f": synapse jobs wait {job.id} downloads its outputs" if status == "completed" else ""
            raise UsageError(f"job {job.id} already {status} on {self.endpoint}{hint}")
        raise _error_from_body(url, response.status_code, response.content)

    def refresh(self, job: Any, store: Any, timeout_s: float | None = None, retries: int | None = None) -> dict[str, Any]:
        """The server's record of the job (``GET /v1/jobs/{id}``); its progress, and a failure or
        cancellation, are written to the job store. A completed job, or one that failed after
        finishing (it has a result: compile's inputs that failed), stays active in the store until
        ``follow`` has its outputs in place."""
        url = self._job_url(job.remote or {})
        response = self._request("GET", url, timeout_s=timeout_s, retries=retries)
        if response.status_code == 404:
            raise self._gone(job, store)
        if response.status_code != 200:
            raise _error_from_body(url, response.status_code, response.content)
        record = _json_object(url, response.content)
        progress = record.get("progress") if isinstance(record.get("progress"), dict) else {}
        done, total = progress.get("done"), progress.get("total")
        if isinstance(done, (int, float)) and done is not True:
            _store_write(lambda: store.append_events(job.id, [], {"done": done, "total": total, "phase": job.phase}))
        status = record.get("status")
        if status in ("failed", "cancelled") and not _failed_after_finishing(record):
            error = record.get("error") if isinstance(record.get("error"), dict) else {}
            code = error.get("code") if isinstance(error.get("code"), int) else (130 if status == "cancelled" else 1)
            _store_write(lambda: store.finish(job.id, status, error_code=code, error_message=str(error.get("message") or f"{status} on {self.endpoint}")))
        return record

    def _job_url(self, remote: Mapping[str, Any]) -> str:
        job_id = remote.get("id")
        if not isinstance(job_id, str) or not _REMOTE_ID.fullmatch(job_id):
            raise UsageError(f"this job has no endpoint job id (its record: {dict(remote)!r:.120})")
        return f"{self.endpoint}/v1/jobs/{job_id}"

    def _gone(self, job: Any, store: Any) -> BackendError:
        """A 404 for the job: the server no longer has it, so it can never finish here."""
        message = f"{self.endpoint} has no job {(job.remote or {}).get('id')} (its record expired, or the server lost it)"
        _store_write(lambda: store.finish(job.id, "failed", error_code=3, error_message=message))
        return BackendError(message)

    def _request(self, method: str, url: str, timeout_s: float | None = None, retries: int | None = None) -> httpx.Response:
        """One GET or DELETE (both idempotent): connect errors, 429 and 5xx are retried; 401/403 is a BackendError."""
        retries = self.max_retries if retries is None else retries
        timeout = self.timeout_s if timeout_s is None else timeout_s

        def once() -> httpx.Response:
            response = self._client.request(method, url, headers=self._headers, timeout=timeout)
            if response.status_code in (401, 403):
                raise BackendError(f"{KEY_REJECTED} (HTTP {response.status_code} from {url}; set SYNAPSE_API_KEY or --api-key)")
            if response.status_code == 429 or response.status_code >= 500:
                raise _Retryable(response.status_code, _retry_after(response.headers.get("retry-after")))
            return response

        attempts = retries + 1
        with map_errors(_REQUEST_ERRORS, url=url, timeout=timeout, attempts=f"{attempts} attempt{'s' * (attempts > 1)}"):
            return _returned(retry_until_first_event(once, _should_retry, retries, self.backoff_s, url))

    def _remote_events(self, job: Any, job_url: str, mirror: "_Mirror") -> Iterator[Event]:
        """What an earlier ``jobs wait`` recorded, then ``/events?after=N`` live up to the job's last event.

        A dropped connection, a 5xx or a silence past ``http.timeout_s`` (the server sends a keep-alive
        every 15 s) reconnects with backoff from the last event received; each connection that answers
        renews the budget of ``EVENTS_RETRIES`` attempts, so only a server that stays unreachable ends
        the wait (exit 3; the job goes on there and ``jobs wait`` resumes)."""
        finished: Finished | None = None  # after it only the job's ``error`` may follow (it failed after finishing)
        for data in mirror.recorded:
            event = _decode_data(data, job_url)
            yield event
            if isinstance(event, Failed):
                return
            finished = event if isinstance(event, Finished) else finished
        url = f"{job_url}/events"
        what = f"following {url}"
        while True:
            response = yield from self._connect_events(job, url, mirror, what)
            try:
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    data = _json_object(url, line)
                    if data.get("type") == "keepalive":
                        continue
                    index = data.pop("index", None)
                    if not isinstance(index, int) or isinstance(index, bool):
                        raise BackendError(f"{url} sent an event without its index: {line!r:.120}")
                    if index < mirror.after:
                        continue  # already recorded
                    if index > mirror.after:
                        raise BackendError(f"{url} skipped events {mirror.after} to {index - 1}")
                    event = _decode_data(data, url)
                    mirror.add(data, event)
                    if isinstance(event, Failed):
                        self._ended(job, mirror, event, finished.result if finished else None)
                    yield event
                    if isinstance(event, Failed):
                        return
                    finished = event if isinstance(event, Finished) else finished
                if finished:  # the stream ends after ``finished`` and the error that may follow it
                    return
                # the server ended the stream before the job's last event (it restarts, or has no more)
                last = self._last_word(job, mirror)
                if last is not None:
                    yield last
                    return
                yield Log(f"{url}: the stream ended before the job did; resuming from event {mirror.after}", level="warning")
            except (httpx.TransportError, httpx.StreamError) as exc:  # dropped, or silent past http.timeout_s
                if finished:  # the outputs are in place: nothing is lost
                    return
                yield Log(f"{url}: {one_line(str(exc)) or type(exc).__name__}; resuming from event {mirror.after}", level="warning")
            finally:
                response.close()
            time.sleep(self.backoff_s)  # a server that ends streams at once is not hammered

    def _connect_events(self, job: Any, url: str, mirror: "_Mirror", what: str) -> Iterator[Event]:
        """``GET /events?after=N`` until it answers 200 (yields retry logs); returns the open response."""

        def connect() -> httpx.Response:
            request = self._client.build_request("GET", url, params={"after": mirror.after}, headers={**self._headers, "Accept": "application/x-ndjson"})
            response = self._client.send(request, stream=True)
            if response.status_code == 200:
                return response
            if response.status_code == 404:
                response.close()
                raise _NoJob()
            raise _refusal(response, url)

        attempts = EVENTS_RETRIES + 1
        try:
            with map_errors(_REQUEST_ERRORS, url=url, timeout=self.timeout_s, attempts=f"{attempts} attempts; the job goes on there, and synapse jobs wait resumes"):
                return (yield from retry_until_first_event(connect, _should_retry_events, EVENTS_RETRIES, self.backoff_s, what))
        except _NoJob:
            raise self._gone(job, mirror.store) from None

    def _ended(self, job: Any, mirror: "_Mirror", event: Failed, result: dict[str, Any] | None) -> None:
        """The job's error: its final state in the store, with its result if it failed after finishing (compile's inputs that failed)."""
        mirror.flush()
        status = "cancelled" if event.code == 130 else "failed"
        _store_write(lambda: mirror.store.finish(job.id, status, result=result, error_code=event.code, error_message=event.message))

    def _last_word(self, job: Any, mirror: "_Mirror") -> Event | None:
        """The stream ended without the job's last event: the record says whether the job ended (and how)."""
        try:
            record = self.refresh(job, mirror.store, retries=0)
        except BackendError as exc:
            if "has no job" in str(exc):
                raise
            return None  # unreachable for now: reconnecting will tell
        status = record.get("status")
        if _failed_after_finishing(record):
            return None  # its ``finished`` (and outputs) come first: reconnecting delivers them, then its error
        if status in ("failed", "cancelled"):
            error = record.get("error") if isinstance(record.get("error"), dict) else {}
            code = error.get("code") if isinstance(error.get("code"), int) else (130 if status == "cancelled" else 1)
            return Failed(code=code, message=str(error.get("message") or f"job {status} on {self.endpoint}"), error=str(error.get("error") or "JobError"))
        if status == "completed" and isinstance(record.get("result"), dict):
            return Finished(result=record["result"])
        return None

    # -- outputs ------------------------------------------------------------------

    def _fetch(self, event: Artifact, targets: dict[tuple[str, int | None], str], outputs: Outputs) -> Event:
        """``collect_outputs``'s callback: download one artifact into a temporary sibling of its output."""
        if event.path.startswith("s3://"):  # the server wrote it to its object: nothing comes through this client
            return event
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
                if response.status_code in (404, 410):
                    raise _ArtifactGone(f"downloading {url}: the server no longer has it (HTTP {response.status_code}): a finished job's "
                                        "outputs are kept for the server's artifact lifetime; run the job again")
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


def _prepare(kind: str, spec: Any) -> tuple[dict[str, Any], list[tuple[str, Path]], dict[tuple[str, int | None], str], bool]:
    """The spec as JSON, the files to upload, where each output goes and ``overwrite``; what
    could not be saved afterwards is refused now, before anything is uploaded."""
    data = spec_to_dict(spec)
    paths = path_fields(kind, data)
    uploads = [(p.field, Path(p.value)) for p in paths if not p.output]
    targets = {(p.field, p.index): p.value for p in paths if p.output}
    overwrite = bool(data.get("overwrite", False))
    _check_inputs(uploads)
    _check_targets(targets, overwrite)
    return data, uploads, targets, overwrite


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


def _decode_data(data: dict[str, Any], url: str) -> Event:
    try:
        return from_dict(data)
    except (ValueError, TypeError):
        raise BackendError(f"{url} sent a line that is not a synapse event: {json.dumps(data)!r:.120}") from None


def _json_object(url: str, body: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        raise BackendError(f"{url} answered something that is not a JSON object: {one_line(text)!r:.120}")
    return data


def _accepted(url: str, body: bytes) -> dict[str, Any]:
    """The 202 answer to ``?detach=true``: ``{"id", "status", "links"}``."""
    data = _json_object(url, body)
    if not isinstance(data.get("id"), str) or not _REMOTE_ID.fullmatch(data["id"]):
        raise BackendError(f"{url} accepted the job without a usable id: {json.dumps(data)!r:.120}")
    return data


def _failed_after_finishing(record: Mapping[str, Any]) -> bool:
    """A job record (``GET /v1/jobs/{id}``) of a job that failed after its ``finished``: its outputs wait for download."""
    return record.get("status") == "failed" and isinstance(record.get("result"), dict)


def _returned(steps: Generator[Any, None, T]) -> T:
    """Run a ``retry_until_first_event`` generator where no one renders its retry logs; its value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def _store_write(write: Callable[[], None]) -> None:
    """A write to the job store on the way: best effort, as ``runs.record`` does (the job is the server's)."""
    from synapse_cli.runs import STORE_ERRORS

    try:
        write()
    except STORE_ERRORS:
        pass


class _Mirror:
    """A detached job's events, copied into the local job store as they come.

    The server's event ``i`` is the store's row ``i + 1``, so the store says where to resume
    (``after``). Writes are batched (every ``flush_s``, and at once for any event but progress);
    a batch the store refuses stays buffered for the next try, and rows another ``jobs wait`` of
    the same job wrote first are not written twice.
    """

    def __init__(self, store: Any, job_id: str, flush_s: float = 0.5) -> None:
        self.store, self.job_id, self.flush_s = store, job_id, flush_s
        self.recorded = [data for _, data in store.events(job_id)]
        self.after = len(self.recorded)  # the next index to ask for
        self._start = self.after  # the index of _buffer[0]
        self._buffer: list[dict[str, Any]] = []
        self._progress: dict[str, Any] | None = None
        self._last = time.monotonic()

    def add(self, data: dict[str, Any], event: Event) -> None:
        self._buffer.append(data)
        self.after += 1
        if isinstance(event, Progress):
            self._progress = {"done": event.done, "total": event.total, "phase": event.phase}
        if not isinstance(event, Progress) or time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if not self._buffer and not self._progress:
            return
        self._last = time.monotonic()

        def write() -> None:
            have = self._start + len(self.store.events(self.job_id, self._start))  # rows are contiguous from 1
            self.store.append_events(self.job_id, self._buffer[max(have - self._start, 0):], self._progress)
            self._start += len(self._buffer)
            self._buffer, self._progress = [], None

        _store_write(write)


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
    return BackendError(f"{url} answered HTTP {status}: {one_line(body.decode('utf-8', 'replace')) or 'no body'}")
