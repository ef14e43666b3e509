"""A job's webhooks behind ``synapse serve``: the spec's ``notify`` URL, checked, then fed the events the client sees.

The target is a stranger's URL that this server will POST to, so it goes through the URL guard
(``synapse_cli.netguard``): when the job is submitted (a refused address is a 422 naming
``notify``, and nothing runs) and again on every connection (the guard's client connects only
to an address it checked, so a DNS answer that changes later cannot turn it inward). Plain
``http://`` only with ``[notify] allow_http``; private hosts only with ``[serve] allow_hosts``.

Messages are signed with the server's own secret (``SYNAPSE_NOTIFY_SECRET`` where the server
runs): the receiver verifies with the secret it shares with the server's operator. Bodies carry
what the client sees: its own paths in the result, and each output as an absolute download URL
(``<server>/v1/artifacts/…``, fetched with the API key). Deliveries of detached jobs are kept in
the server's job store (``GET /v1/jobs/{id}``: ``webhooks``); a client that asks
(``?report_webhooks=true``) gets the list at the end of its stream (``report``), streamed jobs
included, and keeps it in its own job store. The server does not hold a job's slot while it
retries: the sender runs on, and shutting down waits for it, bounded.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from synapse_cli.errors import SynapseError
from synapse_cli.server.uploads import BadUpload

if TYPE_CHECKING:
    from synapse_cli.notify import Feed, Target
    from synapse_cli.server.state import ServerOptions
    from synapse_cli.server.runner import JobRun

log = logging.getLogger("synapse.server")
_lock = threading.Lock()


def guard(opts: "ServerOptions") -> Any:
    from synapse_cli.netguard import Guard

    return Guard(allow_hosts=opts.allow_hosts, allow_http=opts.notify_allow_http)


def check_target(opts: "ServerOptions", url: str) -> "Target":
    """The job's webhook target, or ``BadUpload(422)`` naming ``notify``: no secret here, a bad URL,
    or a host that resolves to an address the guard refuses. Blocks on DNS: call it off the event loop."""
    import httpcore

    from synapse_cli.netguard import RefusedURL, redact
    from synapse_cli.notify import Target

    if not opts.notify_secret:
        raise BadUpload(422, "bad notify: this server sends no webhooks (it has no SYNAPSE_NOTIFY_SECRET)")
    try:
        target = Target(url, opts.notify_secret, opts.notify_progress_interval_s, opts.notify_retry_for_s, allow_http=opts.notify_allow_http)
        target.check()
        g = guard(opts)
        g.check_url(url, "notify")
        parts = urlsplit(url)
        g.addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    except RefusedURL as exc:
        raise BadUpload(422, f"bad notify: {exc}") from None
    except SynapseError as exc:
        raise BadUpload(422, f"bad notify: {str(exc).removeprefix('--notify ')}") from None
    except httpcore.ConnectError as exc:  # the name does not resolve
        raise BadUpload(422, f"bad notify: {redact(url)}: {exc}") from None
    return target


def start(opts: "ServerOptions", run: "JobRun", db_path: Path | None = None) -> "Feed | None":
    """The job's feed, its sender started; None when the job asked for no webhooks."""
    from synapse_cli.notify import Feed, Notifier
    from synapse_cli.store.recording import DeliveryLog

    if run.notify_target is None:
        return None
    target = run.notify_target
    deliveries = DeliveryLog(db_path, run.job_id, target.url) if db_path is not None else None
    # the guard's client is made by the sender thread (its TLS set-up would hold the event loop up)
    notifier = Notifier(target, run.job_id, run.kind, client_factory=guard(opts).client, on_delivery=deliveries,
                        warn=lambda message: log.warning("job %s: %s", run.job_id, message))
    with _lock:
        opts.notifiers[:] = [n for n in opts.notifiers if n.alive]
        opts.notifiers.append(notifier)
    return Feed(notifier, url_base=run.url_base)


async def report(opts: "ServerOptions", job_id: str, keepalive_s: float, keepalive: bytes,
                 deliveries: Callable[[], list[dict[str, Any]]]) -> AsyncIterator[bytes]:
    """A stream's last line for a client that asked (``?report_webhooks=true``): once the job's
    sender is done (bounded by ``[notify] retry_for_s``; ``keepalive`` every ``keepalive_s`` meanwhile),
    a ``webhooks`` line (``events.Deliveries``) listing what became of each message, as the job's
    record does. The client keeps them in its job store, for ``synapse jobs show``."""
    import anyio

    from synapse_cli.events import Deliveries
    from synapse_cli.render.ndjson import encode
    from synapse_cli.server.job_records import webhooks_wire

    with _lock:
        senders = [n for n in opts.notifiers if n.job_id == job_id]
    for notifier in senders:
        while not await anyio.to_thread.run_sync(notifier.join, keepalive_s):
            yield keepalive
    listed = await anyio.to_thread.run_sync(deliveries)
    yield (encode(Deliveries(webhooks_wire(listed))) + "\n").encode("utf-8")


def sent(feed: "Feed") -> list[dict[str, Any]]:
    """What became of each message of a streamed job's ``feed`` (its sender keeps them: no store row)."""
    from synapse_cli.netguard import redact

    target = redact(feed.notifier.target.url)
    return [{**d.to_dict(), "target": target} for d in feed.notifier.deliveries]


def wait_all(opts: "ServerOptions", timeout_s: float) -> bool:
    """Shutting down: give the senders still retrying ``timeout_s`` in all; True when all are done."""
    import time

    deadline = time.monotonic() + timeout_s
    with _lock:
        pending = list(opts.notifiers)
    for notifier in pending:
        notifier.join(max(0.0, deadline - time.monotonic()))
    return not any(n.alive for n in pending)
