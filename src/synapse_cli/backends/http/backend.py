"""``HttpBackend``: one job is one ``POST /v1/jobs/{kind}``; detached jobs are followed, cancelled and refreshed by id."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Generator, Iterator, Mapping
from urllib.parse import urlencode, urlsplit

import httpx

from synapse_cli import __version__
from synapse_cli.backends._remote import ErrorMap, collect_outputs, map_errors, retry_until_first_event
from synapse_cli.backends.base import Backend, Capabilities
from synapse_cli.errors import BackendError, UsageError, one_line
from synapse_cli.events import Deliveries, Event, Failed, Finished, Log, Outcome
from synapse_cli.jobs import get_kind
from synapse_cli.protocol import NDJSON
from synapse_cli.backends.http.errors import KEY_REJECTED, _ArtifactGone, _NoJob, _Retryable, _error_from_body, _refusal, _retry_after, _should_retry, _should_retry_events
from synapse_cli.backends.http.wire import _REMOTE_ID, _accepted, _decode, _decode_data, _failed_after_finishing, _json_object, _part, _prepare, _returned
from synapse_cli.backends.http.downloads import Downloads
from synapse_cli.backends.http.mirror import _Mirror, _quiet


# following a detached job's /events: attempts per outage (backoff from http.initial_backoff_ms up to 30 s
# apart, about 2.5 minutes with the default 500 ms); every connection that answers renews them
EVENTS_RETRIES = 10


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


class HttpBackend(Downloads, Backend):
    """Runs jobs on a synapse endpoint. ``client`` is the seam for tests (``httpx.MockTransport``)."""

    name = "http"
    # the server shards a job itself (run_sharded), detached too (?detach=true&shards=N)
    capabilities = Capabilities(detach=True, shards="server", detach_shards=True, notifies=True)

    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        client: httpx.Client | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        initial_backoff_ms: int = 500,
        notify: str | None = None,
    ) -> None:
        self.notify = notify  # the jobs' webhook URL: sent in the spec; the server signs and sends them (docs/webhooks.md)
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
            from synapse_cli.protocol import is_loopback_host, read_key

            if is_loopback_host(parts.hostname):
                key = read_key(parts.port or 80)
        return cls(
            endpoint,
            key,
            timeout_s=settings["http.timeout_s"],
            max_retries=settings["http.max_retries"],
            initial_backoff_ms=settings["http.initial_backoff_ms"],
            notify=settings["notify.url"],
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- the job ------------------------------------------------------------------

    def run_sharded(self, kind: str, spec: Any, shards: Any) -> Iterator[Event]:
        """The job split by the server across ``shards`` of its worker processes (``?shards=N``; ``auto``: the server's choice)."""
        return self.run(kind, spec, shards=1 if shards == "auto" else int(shards))

    def run(self, kind: str, spec: Any, shards: int = 1) -> Iterator[Event]:
        """Upload, stream the events as they arrive, then download the outputs and rename them into place."""
        data, uploads, targets, overwrite = self._prepare(kind, spec)
        query = {"shards": str(int(shards))} if shards > 1 else {}
        if self.notify:  # the stream ends with what became of each webhook (a Deliveries line), for the job store
            query["report_webhooks"] = "true"
        url = f"{self.endpoint}/v1/jobs/{kind}" + (f"?{urlencode(query)}" if query else "")
        response = yield from self._open(url, data, uploads)
        try:
            yield from collect_outputs(self._events(url, response), lambda e, out: self._fetch(e, targets, out), overwrite, url, defer=True)
        finally:
            response.close()  # on an early close this cancels the job on the server

    def _prepare(self, kind: str, spec: Any) -> tuple[dict[str, Any], list[tuple[str, Path]], dict[tuple[str, int | None], str], bool]:
        data, uploads, targets, overwrite = _prepare(kind, spec)
        if self.notify:  # beside the kind's fields: the server checks it with its URL guard (422 when refused)
            data = {**data, "notify": self.notify}
        return data, uploads, targets, overwrite

    def _events(self, url: str, response: httpx.Response) -> Iterator[Event]:
        """The response's NDJSON lines as events, to the end of the stream: after ``finished`` the
        server sends the job's ``error`` if it failed after finishing (compile's inputs that failed),
        and, when asked (``report_webhooks``), what became of the job's webhooks: that report is
        passed on before the ``error``, which ends the stream for whoever reads it."""
        lines = response.iter_lines()
        outcome = Outcome()
        with map_errors(_STREAM_ERRORS, url=url, timeout=self.timeout_s):
            for line in lines:
                if not line.strip():
                    continue  # a keep-alive line
                event = _decode(line, url)
                outcome.see(event)
                if outcome.ended:
                    break
                yield event
                if outcome.finished is not None:
                    break
            else:
                return
        try:  # the outputs are in place by now: a stream that breaks here loses nothing
            for line in lines:
                if line.strip():
                    event = _decode(line, url)
                    outcome.see(event)
                    if not isinstance(event, Failed):
                        yield event
        except (httpx.TransportError, httpx.StreamError, httpx.DecodingError):
            pass
        if outcome.failure is not None:
            yield outcome.failure

    def _open(self, url: str, data: dict[str, Any], uploads: list[tuple[str, Path]], detach: bool = False) -> Generator[Event, None, Any]:
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
            if ctype != NDJSON:
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
        return BackendError(f"the connection to {url} broke before the job started ({one_line(exc, 200) or type(exc).__name__})")

    # -- detached jobs: POST ?detach=true, then GET /v1/jobs/{id}, its /events, DELETE ------------------

    def detach(self, kind: str, spec: Any, job: Any, store: Any, env: Mapping[str, str]) -> None:
        """Upload as ``run`` does and POST with ``?detach=true``: the server answers 202 with its job id
        once the inputs are stored. The store keeps the endpoint, that id and where the outputs go (never the key)."""
        data, uploads, targets, overwrite = self._prepare(kind, spec)
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
        if self.notify:  # the server sends the job's webhooks: `jobs wait` asks for its report of them
            remote["notify"] = True
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
                message = str(exc)
                _quiet(store, job.id).ended_elsewhere("failed", 3, message)
            raise
        finally:
            local.close()  # type: ignore[attr-defined]  # (a job's generator) an early close removes what was downloaded so far
            if result is not None:  # every output is in place: the job's end (an error after its result was recorded already)
                mirror.completed()
            else:
                mirror.flush()

    def cancel(self, job: Any, store: Any) -> None:
        """``DELETE /v1/jobs/{id}``: the server kills the job's processes and removes its outputs."""
        url = self._job_url(job.remote or {})
        response = self._request("DELETE", url)
        if response.status_code == 200:
            _quiet(store, job.id).ended_elsewhere("cancelled", 130, "cancelled by synapse jobs cancel")
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
        progress: dict[str, Any] = record["progress"] if isinstance(record.get("progress"), dict) else {}
        done, total = progress.get("done"), progress.get("total")
        if isinstance(done, (int, float)) and done is not True:
            _quiet(store, job.id).ended_elsewhere("processing", progress={"done": done, "total": total, "phase": job.phase})
        webhooks = record.get("webhooks")
        if isinstance(webhooks, list) and webhooks:  # what became of the job's webhooks so far (synapse jobs show)
            _quiet(store, job.id).deliveries([w for w in webhooks if isinstance(w, dict)], whole=True)
        status = record.get("status")
        if status in ("failed", "cancelled") and not _failed_after_finishing(record):
            error: dict[str, Any] = record["error"] if isinstance(record.get("error"), dict) else {}
            code = error.get("code") if isinstance(error.get("code"), int) else (130 if status == "cancelled" else 1)
            _quiet(store, job.id).ended_elsewhere(status, code, str(error.get("message") or f"{status} on {self.endpoint}"))
        return record

    def _job_url(self, remote: Mapping[str, Any]) -> str:
        job_id = remote.get("id")
        if not isinstance(job_id, str) or not _REMOTE_ID.fullmatch(job_id):
            raise UsageError(f"this job has no endpoint job id (its record: {dict(remote)!r:.120})")
        return f"{self.endpoint}/v1/jobs/{job_id}"

    def _gone(self, job: Any, store: Any) -> BackendError:
        """A 404 for the job: the server no longer has it, so it can never finish here."""
        message = f"{self.endpoint} has no job {(job.remote or {}).get('id')} (its record expired, or the server lost it)"
        _quiet(store, job.id).ended_elsewhere("failed", 3, message)
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
        the wait (exit 3; the job goes on there and ``jobs wait`` resumes). A job sent with webhooks
        asks for the server's report of them (``report_webhooks``), read after the job's last event
        and kept in the job store as its deliveries."""
        outcome = Outcome()  # after ``finished`` only the job's ``error`` may follow (it failed after finishing)
        for data in mirror.recorded:
            event = _decode_data(data, job_url)
            outcome.see(event)
            yield event
            if outcome.ended:
                return
        url = f"{job_url}/events"
        what = f"following {url}"
        report = bool((job.remote or {}).get("notify"))
        while True:
            response = yield from self._connect_events(job, url, mirror, what, report)
            try:
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    data = _json_object(url, line)
                    if data.get("type") == "keepalive":
                        mirror.recorder.tick()  # a quiet job: what came before it reaches the store now, not at its next event
                        continue
                    if data.get("type") == Deliveries.type:  # after the last event: the server's report of the webhooks
                        webhooks = data.get("webhooks")
                        mirror.recorder.deliveries([d for d in webhooks if isinstance(d, dict)] if isinstance(webhooks, list) else [], whole=True)
                        continue
                    if outcome.ended:
                        continue  # nothing but the report follows the job's error
                    index = data.pop("index", None)
                    if not isinstance(index, int) or isinstance(index, bool):
                        raise BackendError(f"{url} sent an event without its index: {line!r:.120}")
                    if index < mirror.after:
                        continue  # already recorded
                    if index > mirror.after:
                        raise BackendError(f"{url} skipped events {mirror.after} to {index - 1}")
                    event = _decode_data(data, url)
                    mirror.add(data, event)  # an ``error`` writes the job's final state (with its result, if it came after it)
                    outcome.see(event)
                    if not outcome.ended:
                        yield event
                if outcome.failure is not None:  # read to the end of the stream first: the report comes after it
                    yield outcome.failure
                    return
                if outcome.finished is not None:  # the stream ends after ``finished`` and the error that may follow it
                    return
                # the server ended the stream before the job's last event (it restarts, or has no more)
                last = self._last_word(job, mirror)
                if last is not None:
                    yield last
                    return
                yield Log(f"{url}: the stream ended before the job did; resuming from event {mirror.after}", level="warning")
            except (httpx.TransportError, httpx.StreamError) as exc:  # dropped, or silent past http.timeout_s
                if outcome.failure is not None:
                    yield outcome.failure
                    return
                if outcome.finished is not None:  # the outputs are in place: nothing is lost
                    return
                yield Log(f"{url}: {one_line(exc, 200) or type(exc).__name__}; resuming from event {mirror.after}", level="warning")
            finally:
                response.close()
            time.sleep(self.backoff_s)  # a server that ends streams at once is not hammered

    def _connect_events(self, job: Any, url: str, mirror: "_Mirror", what: str, report: bool = False) -> Generator[Event, None, Any]:
        """``GET /events?after=N`` until it answers 200 (yields retry logs); returns the open response.
        ``report``: the stream ends with the server's report of the job's webhooks."""
        params: dict[str, Any] = {"after": mirror.after, **({"report_webhooks": "true"} if report else {})}

        def connect() -> httpx.Response:
            request = self._client.build_request("GET", url, params=params, headers={**self._headers, "Accept": NDJSON})
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
            error: dict[str, Any] = record["error"] if isinstance(record.get("error"), dict) else {}
            code: int = error["code"] if isinstance(error.get("code"), int) else (130 if status == "cancelled" else 1)
            return Failed(code=code, message=str(error.get("message") or f"job {status} on {self.endpoint}"), error=str(error.get("error") or "JobError"))
        if status == "completed" and isinstance(record.get("result"), dict):
            return Finished(result=record["result"])
        return None
