"""Signed webhooks: a job's own events POSTed to a URL from where the job runs (Standard Webhooks 1.0).

``notify_events(events, target, job_id, kind)`` passes a job's events through unchanged while a
sender thread POSTs them to ``target.url``:

- ``started``; ``progress``, coalesced to at most one every ``progress_interval_s`` (the newest
  wins) and best-effort (one try); ``finished`` with the result and the outputs the job wrote;
  ``error``; ``cancelled``. Each body is ``{"type", "timestamp", "job_id", "kind", "data"}``,
  ``data`` being the event's own fields (``docs/webhooks.md``).
- Every request is signed: ``webhook-id`` (one id per message, the same on each retry, so a
  receiver can drop duplicates), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
  ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` with the ``whsec_`` secret.
- A terminal event (``finished``, ``error``, ``cancelled``) is retried with backoff for
  ``retry_for_s``: any answer but a 2xx is a failure (a redirect too: it is not followed), a
  ``Retry-After`` is waited for, a ``410 Gone`` stops delivery for good.
- A webhook never fails the job: what the receiver does is recorded (``on_delivery``, which the
  job store keeps for ``synapse jobs show``) and at worst warned about. When the stream ends, the
  caller waits for the terminal delivery (bounded by ``retry_for_s``), so a process that exits
  right after its job still gets its last word out.

The secret comes from ``SYNAPSE_NOTIFY_SECRET`` only (a ``secret`` setting: never in the file,
a spec, an event, a log line, the job store or the cache). ``Target`` keeps it out of its repr.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Generator
from typing import Any, Callable, Iterator

from synapse_cli.errors import UsageError, one_line
from synapse_cli.events import Artifact, Event, Failed, Finished, Outcome, Progress, Started, failed, to_dict

log = logging.getLogger("synapse.notify")

SECRET_PREFIX = "whsec_"
TERMINAL = ("finished", "error", "cancelled")
ATTEMPT_TIMEOUT_S = 10.0  # one POST, connection and answer
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 15.0
MAX_ARTIFACTS = 1000  # outputs listed in a finished body


def secret_key(secret: str) -> bytes:
    """The signing key of a ``whsec_<base64>`` secret (UsageError naming the setting, never the value)."""
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        raise UsageError(
            "SYNAPSE_NOTIFY_SECRET is not a webhook secret: expected whsec_ and at least 16 bytes in base64 "
            "(make one with: python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\")"
        )
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
    }


@dataclass(frozen=True)
class Target:
    """Where a job's webhooks go, and how hard to try. ``secret`` never appears in a repr."""

    url: str
    secret: str = field(repr=False)
    progress_interval_s: float = 5.0
    retry_for_s: float = 60.0
    allow_http: bool = False

    def __post_init__(self) -> None:
        secret_key(self.secret)

    @property
    def key(self) -> bytes:
        return secret_key(self.secret)

    @classmethod
    def from_settings(cls, settings: Any, url: str | None = None, local: bool = False) -> "Target | None":
        """The target ``url`` (else ``[notify] url``) names, or None. ``local``: the job runs on this
        machine, where plain ``http://`` is allowed (a receiver here or on the LAN during development)."""
        url = url or settings["notify.url"]
        if not url:
            return None
        secret = settings["notify.secret"]
        if not secret:
            raise UsageError("--notify needs a signing secret: set SYNAPSE_NOTIFY_SECRET (whsec_…, see docs/webhooks.md)")
        target = cls(url, secret, settings["notify.progress_interval_s"], settings["notify.retry_for_s"],
                     allow_http=local or settings["notify.allow_http"])
        target.check()
        return target

    def for_call(self, allow_hosts: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """What a remote call needs to send the webhooks where it runs (a Modal container): this target,
        its secret included, and the hosts the container's URL guard admits. A call argument, never
        part of the spec (which the job store and the cache keep)."""
        return {"url": self.url, "secret": self.secret, "progress_interval_s": self.progress_interval_s,
                "retry_for_s": self.retry_for_s, "allow_http": self.allow_http, "allow_hosts": list(allow_hosts)}

    @classmethod
    def from_call(cls, data: dict[str, Any]) -> "Target":
        return cls(str(data["url"]), str(data["secret"]), float(data.get("progress_interval_s", 5.0)), float(data.get("retry_for_s", 60.0)),
                   allow_http=bool(data.get("allow_http")))

    def check(self) -> None:
        """The URL's form: ``https://`` (or ``http://`` where allowed) with a host. Where it may
        connect is the transport's business (``synapse_cli.netguard`` on a server or in a container)."""
        from urllib.parse import urlsplit

        from synapse_cli.netguard import redact

        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise UsageError(f"--notify {redact(self.url)} is not a valid URL") from None
        allowed = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in allowed or not parts.hostname:
            extra = "" if self.allow_http else " (plain http:// only on the local backend, or with [notify] allow_http)"
            raise UsageError(f"--notify {redact(self.url)}: expected an https:// URL{extra}")


@dataclass
class Delivery:
    """What became of one message: ``delivered``, ``failed`` (gave up), ``gone`` (410) or ``dropped`` (superseded)."""

    event: str
    webhook_id: str
    outcome: str
    attempts: int
    http_status: int | None = None
    detail: str | None = None
    at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Notifier:
    """The sender: a queue of messages and one thread that POSTs them in order.

    ``client``: an ``httpx.Client`` (a ``netguard.Guard`` client on a server or in a container), or
    ``client_factory`` to have the sender thread make one; by default a plain one that follows no
    redirects and ignores proxy settings. ``on_delivery(Delivery)`` is called from the sender thread
    for every message's outcome. ``first_backoff_s`` is a seam for tests."""

    def __init__(self, target: Target, job_id: str, kind: str, client: Any = None,
                 on_delivery: Callable[[Delivery], None] | None = None, warn: Callable[[str], None] | None = None,
                 first_backoff_s: float = FIRST_BACKOFF_S, close_client: bool | None = None,
                 client_factory: Callable[[], Any] | None = None) -> None:
        from synapse_cli.netguard import redact

        self.target = target
        self.job_id = job_id
        self.kind = kind
        self._key = target.key
        self._own_client = client is None if close_client is None else close_client  # closed by the sender thread when it ends
        self._client = client  # else made by the sender thread (``client_factory``, or a plain one): httpx's import and TLS setup overlap the job
        self._client_factory = client_factory or self._default_client
        self._on_delivery = on_delivery
        self._warn = warn or log.warning
        self._first_backoff_s = first_backoff_s
        self._where = redact(target.url)
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._seq = 0
        self._last_progress = float("-inf")  # when the last progress was taken for sending
        self._progress: dict[str, Any] | None = None  # the newest progress not sent yet
        self._gone = False
        self.deliveries: list[Delivery] = []
        self._thread = threading.Thread(target=self._run, name=f"synapse-notify-{job_id[:8]}", daemon=True)
        self._thread.start()

    # -- the job's side ----------------------------------------------------------------

    def send(self, type_: str, data: dict[str, Any]) -> None:
        """Queue one message. Progress is coalesced: the newest waits in one slot and goes out once
        ``progress_interval_s`` has passed since the last progress sent (so the last numbers before
        a quiet spell do arrive); a terminal message drops a progress still waiting."""
        with self._cond:
            if self._closing or self._gone:
                return
            if type_ == "progress":
                self._progress = data
            else:
                if type_ in TERMINAL:
                    self._progress = None
                self._queue.append((type_, data))
            self._cond.notify_all()

    def close(self, wait: bool = True) -> None:
        """No more messages: wait (bounded by ``retry_for_s`` and one attempt) until the queue is sent.
        ``wait=False``: return at once; the sender goes on with what is queued, then ends."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if wait:
            self.join()

    @property
    def alive(self) -> bool:
        """The sender is still at work (retrying, or waiting for more messages)."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the sender to end (at most ``timeout``, else its own bound); True when it has."""
        bound = self.target.retry_for_s + ATTEMPT_TIMEOUT_S + 5
        self._thread.join(timeout=bound if timeout is None else min(timeout, bound))
        return not self._thread.is_alive()

    # -- the sender thread -------------------------------------------------------------------

    def _default_client(self) -> Any:
        import httpx

        # a plain http:// target never uses TLS (and no redirect is followed to an https:// one): skip loading the CA bundle
        verify: Any = True if not self.target.url.startswith("http://") else httpx.create_ssl_context(verify=False)
        return httpx.Client(follow_redirects=False, trust_env=False, timeout=ATTEMPT_TIMEOUT_S, verify=verify)

    def _run(self) -> None:
        try:
            if self._client is None:
                try:
                    self._client = self._client_factory()
                except Exception as exc:  # noqa: BLE001 - no client, no webhooks: the job goes on
                    self._warn(one_line(f"webhooks to {self._where} cannot be sent: {type(exc).__name__}: {exc}", 300))
                    return
            while True:
                with self._cond:
                    item = self._next()
                    if item is None:
                        return
                    type_, data = item
                try:
                    self._deliver(type_, data)
                except Exception as exc:  # noqa: BLE001 - a webhook never fails the job
                    self._warn(one_line(f"webhook to {self._where}: {type(exc).__name__}: {exc}", 300))
        finally:
            if self._own_client and self._client is not None:
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001
                    pass

    def _next(self) -> tuple[str, dict[str, Any]] | None:
        """(Holding the lock) the next message to send, waiting for one; None once closed and sent."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._progress is not None and not self._closing:
                due = self._last_progress + self.target.progress_interval_s
                now = time.monotonic()
                if now >= due:
                    data, self._progress, self._last_progress = self._progress, None, now
                    return "progress", data
                self._cond.wait(due - now)
                continue
            if self._closing:
                return None  # (a progress still waiting when the stream ended: its terminal message says more)
            self._cond.wait()

    def _deliver(self, type_: str, data: dict[str, Any]) -> None:
        if self._gone:
            return
        self._seq += 1
        msg_id = f"msg_{self.job_id}_{self._seq}"
        terminal = type_ in TERMINAL
        now = time.time()
        payload = {"type": type_, "timestamp": _iso(now), "job_id": self.job_id, "kind": self.kind, "data": data}
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")
        deadline = time.monotonic() + (self.target.retry_for_s if terminal else 0.0)
        attempts, status, detail, backoff = 0, None, None, self._first_backoff_s
        outcome = "failed"
        while True:
            attempts += 1
            wait: float | None = None
            try:
                timeout = ATTEMPT_TIMEOUT_S if not terminal else max(1.0, min(ATTEMPT_TIMEOUT_S, deadline - time.monotonic()))
                response = self._client.post(self.target.url, content=body, headers=signed_headers(self._key, msg_id, body), timeout=timeout)
                status = response.status_code
                response.close()
                if 200 <= status < 300:
                    outcome, detail = "delivered", None
                    break
                if status == 410:
                    outcome, detail = "gone", "410 Gone: no more deliveries for this job"
                    self._gone = True
                    break
                detail = f"HTTP {status}" + (" (a redirect: not followed)" if 300 <= status < 400 else "")
                wait = _retry_after(response.headers.get("retry-after"))
            except Exception as exc:  # noqa: BLE001 - refused by the guard, unreachable, timed out: a failed attempt
                status, detail = None, one_line(f"{type(exc).__name__}: {exc}", 300)
                if isinstance(exc, UsageError):  # the guard's refusal (RefusedURL)
                    break  # the address will not become allowed by waiting
            if not terminal:
                break
            left = deadline - time.monotonic()
            if wait is not None and wait > left:  # honoured: not sooner than asked, so not at all
                detail = f"{detail}; Retry-After {wait:g} s is past the retry budget"
                break
            if left < 0.05:
                break
            # the last attempt comes at the deadline rather than never
            time.sleep(min(left, wait if wait is not None else backoff * (0.8 + 0.4 * random.random())))
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        delivery = Delivery(type_, msg_id, outcome, attempts, status, detail, time.time())
        self.deliveries.append(delivery)
        if outcome != "delivered" and terminal:
            self._warn(f"webhook {type_} to {self._where}: {outcome} after {attempts} attempt(s): {detail}")
        if self._on_delivery is not None:
            try:
                self._on_delivery(delivery)
            except Exception as exc:  # noqa: BLE001 - recording is best-effort too
                log.debug("recording a delivery failed: %s", exc)


def _data(event: Event) -> dict[str, Any]:
    data = to_dict(event)
    data.pop("type", None)
    return data


class Feed:
    """A job's events in, webhook messages out: what ``notify_events`` does for a stream, for callers
    that see the events one at a time (the server, after translating them for the client).

    ``feed`` each event; ``fail(exc)`` when the job raised, ``cancel()`` when it was stopped before
    its result, ``close()`` when it is over (it waits for the terminal delivery unless ``wait=False``)."""

    def __init__(self, notifier: Notifier, url_base: str | None = None) -> None:
        self.notifier = notifier
        self.url_base = url_base.rstrip("/") if url_base else None  # the server's own URL: artifact paths become URLs
        self.artifacts: list[dict[str, Any]] = []
        self.outcome = Outcome()  # finished, then maybe an error (a job that failed after its result): both are sent

    @property
    def finished(self) -> bool:
        return self.outcome.finished is not None

    @property
    def ended(self) -> bool:
        """An error or a cancel was sent."""
        return self.outcome.ended

    def feed(self, event: Event) -> None:
        if isinstance(event, Started):
            self.notifier.send("started", _data(event))
        elif isinstance(event, Progress):
            self.notifier.send("progress", _data(event))
        elif isinstance(event, Artifact):
            if len(self.artifacts) < MAX_ARTIFACTS:
                path = event.path
                if self.url_base and path.startswith("/v1/"):
                    self.artifacts.append({"url": self.url_base + path, "bytes": event.bytes})
                else:
                    self.artifacts.append({"path": path, "bytes": event.bytes})
        elif isinstance(event, Finished):
            if not self.finished:
                self.notifier.send("finished", {**_data(event), "artifacts": list(self.artifacts)})
        elif isinstance(event, Failed):  # a stream that carries its failure as data (the server's)
            if not self.ended:
                self.notifier.send("cancelled" if event.code == 130 else "error", _data(event))
        self.outcome.see(event)

    def fail(self, exc: BaseException) -> None:
        self.feed(failed(exc))

    def cancel(self) -> None:
        """Stopped before the result (the reader went away): ``cancelled``; after it, nothing to add."""
        if not self.finished:
            self.feed(failed(KeyboardInterrupt()))

    def close(self, wait: bool = True) -> None:
        if not self.finished and not self.ended:
            self.feed(Failed(1, "the job ended without a result", "JobError"))
        self.notifier.close(wait)


def notify_events(events: Iterator[Event], target: Target, job_id: str, kind: str, client: Any = None,
                  on_delivery: Callable[[Delivery], None] | None = None, warn: Callable[[str], None] | None = None,
                  notifier: Notifier | None = None) -> Iterator[Event]:
    """Pass ``events`` through unchanged, POSTing the job's own events to ``target`` on the way.

    The terminal message follows from how the stream ends: ``finished`` (with the outputs the job
    wrote), then ``error`` if the job still failed after it; ``error`` for a failure; ``cancelled``
    for Ctrl-C, a cancel or a reader that stopped before the result. Before returning (or raising),
    waits for the terminal delivery, bounded by ``target.retry_for_s``."""
    feed = Feed(notifier or Notifier(target, job_id, kind, client=client, on_delivery=on_delivery, warn=warn))
    try:
        for event in events:
            feed.feed(event)
            yield event
    except GeneratorExit:
        if isinstance(events, Generator):
            events.close()  # the job stops first (its cleanup runs, its record says how it ended), then it is told
        feed.cancel()
        raise
    except BaseException as exc:
        feed.fail(exc)
        raise
    finally:
        feed.close()
