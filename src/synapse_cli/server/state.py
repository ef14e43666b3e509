"""The server's limits and live state: what every route, the detached-job manager and the sweep share.

``ServerOptions`` is built once by ``create_app`` (``from_settings``) and kept on ``app.state.synapse``;
routes read it from there (``of(request)``). The detached-job manager is handed it and never
imports the app. ``forget`` and ``start_heartbeat`` are the two operations on the live jobs.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from synapse_cli.events import Failed
from synapse_cli.protocol import MIN_KEY_CHARS

if TYPE_CHECKING:
    from starlette.requests import Request

    from synapse_cli.server.detached import DetachedJobs
    from synapse_cli.server.runner import JobRun

HEARTBEAT_S = 5.0
HEARTBEAT_STALE_S = 60.0  # a folder whose .alive is older than this belongs to a process that died


@dataclass
class ServerOptions:
    """What the app needs: its limits (from settings and keyword arguments), then its live state."""

    work_dir: Path
    api_key: str | None = None
    max_upload_mb: int = 2048
    allow_anonymous: bool = False  # only a loopback-only server without a key (tests, embedding)
    artifact_ttl_s: float = 3600.0
    models_dir: Path | None = None  # owner-installed models a client may name (besides the bundled default)
    max_concurrent_jobs: int = 0  # 0: one per core
    job_timeout_s: float = 4 * 3600.0  # 0: none
    min_free_mb: int = 1024
    stall_timeout_s: float = 60.0
    body_timeout_s: float = 60.0
    keepalive_s: float = 15.0
    max_key_failures: int = 10  # per address, per KEY_FAILURE_WINDOW_S
    max_queued_jobs: int = 100  # detached jobs waiting for a slot (uploads included); past it, 429
    keep_jobs_days: float = 30.0  # detached jobs that ended longer ago leave jobs.db (record, events, folder); 0: kept for ever
    on_job_end: Callable[[], None] | None = None  # e.g. Modal: commit the Volume
    allow_hosts: tuple[str, ...] = ()  # [serve] allow_hosts: private hosts a client's URLs may reach (netguard)
    notify_secret: str | None = field(default=None, repr=False)  # SYNAPSE_NOTIFY_SECRET: signs the jobs' webhooks; none, no webhooks
    notify_progress_interval_s: float = 5.0
    notify_retry_for_s: float = 60.0
    notify_allow_http: bool = False
    storage: Any = None  # synapse_cli.storage.client.Storage, guarded: the URL fields of the jobs it runs
    # -- live state --
    notifiers: list[Any] = field(default_factory=list)  # webhook senders still at work (server.webhooks)
    live: dict[str, Path] = field(default_factory=dict)  # this process's jobs (uploading, queued or running) -> folder
    waiting: set[str] = field(default_factory=set)  # detached jobs in ``live`` that hold no slot (uploading or queued)
    slot_lock: threading.Lock = field(default_factory=threading.Lock)
    detached: "DetachedJobs | None" = None
    runs: "dict[str, JobRun]" = field(default_factory=dict)
    key_failures: dict[str, deque[float]] = field(default_factory=dict)
    last_sweep: float = 0.0
    sweeps_stop: threading.Event = field(default_factory=threading.Event)  # set when the app's lifespan ends: a sweep under way stops early
    heartbeat: threading.Thread | None = None
    idle: threading.Event = field(default_factory=threading.Event)  # set when the last live job ends
    closing: bool = False

    @property
    def jobs_dir(self) -> Path:
        return self.work_dir / "jobs"

    @property
    def max_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def job_slots(self) -> int:
        return self.max_concurrent_jobs or os.cpu_count() or 1

    def slots_used(self) -> int:
        """Jobs holding a slot: running (streamed or detached) and streamed uploads."""
        return len(self.live) - len(self.waiting)

    def cancel_all(self, reason: str = "the server is shutting down") -> None:
        """Stop every running job now: its stream ends with an error line, its processes are killed;
        detached jobs still waiting for a slot fail."""
        self.closing = True
        if self.detached is not None:
            self.detached.cancel_queued(reason)
        for run in list(self.runs.values()):
            run.cancel(reason, Failed(3, f"{reason}; the job was stopped (nothing was saved)", "BackendError"))

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """``cancel_all``, then wait until each job's thread and processes are gone. True when they are."""
        from synapse_cli.server import webhooks
        from synapse_cli.server.processes import kill_children

        self.cancel_all()
        deadline = time.monotonic() + timeout_s
        for run in list(self.runs.values()):
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
            kill_children(run.native_id)
        webhooks.wait_all(self, max(0.0, deadline - time.monotonic()))  # terminal webhooks still being retried
        return not any(r.thread is not None and r.thread.is_alive() for r in self.runs.values())


def check_key(api_key: str | None) -> None:
    if api_key is not None and len(api_key) < MIN_KEY_CHARS:
        raise ValueError(f"the API key is {len(api_key)} characters long; use at least {MIN_KEY_CHARS} (e.g. openssl rand -hex 24)")


# ServerOptions fields that come from ``[serve]``/``[notify]`` settings when no keyword gives them
_FROM_SETTINGS = {
    **{name: f"serve.{name}" for name in ("max_concurrent_jobs", "max_queued_jobs", "job_timeout_s", "min_free_mb", "stall_timeout_s",
                                          "body_timeout_s", "keep_jobs_days", "max_key_failures", "allow_hosts")},
    "notify_secret": "notify.secret", "notify_allow_http": "notify.allow_http",
    "notify_progress_interval_s": "notify.progress_interval_s", "notify_retry_for_s": "notify.retry_for_s",
}  # fmt: skip
_ARGUMENTS = ("work_dir", "api_key", "max_upload_mb", "allow_anonymous", "artifact_ttl_s", "models_dir")


def from_settings(settings: Mapping[str, Any], arguments: Mapping[str, Any], limits: dict[str, Any]) -> ServerOptions:
    """``create_app``'s options: each keyword argument (``arguments``: the named ones; ``limits``: any other
    field), else its setting, else the field's default. Refuses a missing or short key and unknown limits."""
    given = {k: v for k, v in arguments.items() if v is not None}
    work_dir = given.get("work_dir") or settings.get("serve.work_dir")
    api_key = given.get("api_key", settings.get("api_key"))
    if not api_key and not arguments.get("allow_anonymous"):
        raise ValueError("create_app needs an api_key (SYNAPSE_API_KEY), or allow_anonymous=True for a loopback-only server")
    check_key(api_key or None)
    unknown = sorted(set(limits) - (set(ServerOptions.__dataclass_fields__) - set(_ARGUMENTS)))
    if unknown:
        raise TypeError(f"create_app got unexpected keyword argument(s): {', '.join(unknown)}")
    for name, key in _FROM_SETTINGS.items():
        if name not in limits and key in settings:
            limits[name] = settings[key]
    if "allow_hosts" in limits:
        limits["allow_hosts"] = tuple(limits["allow_hosts"] or ())
    if "storage" not in limits:  # URL fields: [storage] and [serve] allow_buckets / allow_hosts (defaults where not given)
        from synapse_cli.config import registry
        from synapse_cli.storage.client import Storage

        storage_keys = {k: v.default for k, v in registry().items() if k.startswith(("storage.", "serve.allow_"))}
        limits["storage"] = Storage.guarded({**storage_keys, **{k: settings[k] for k in storage_keys if k in settings}})
    models_dir = given.get("models_dir", settings.get("serve.models_dir"))
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="synapse-serve-"))
    return ServerOptions(
        root.resolve(), api_key or None, int(given.get("max_upload_mb", settings.get("serve.max_upload_mb", 2048))),
        bool(arguments.get("allow_anonymous")), given.get("artifact_ttl_s", settings.get("serve.artifact_ttl_s", 3600.0)),
        Path(models_dir).expanduser().resolve() if models_dir else None, **limits,
    )  # fmt: skip


def of(request: "Request") -> ServerOptions:
    """The app's options, for a route."""
    opts: ServerOptions = request.app.state.synapse
    return opts


def forget(opts: ServerOptions, job_id: str) -> None:
    """The job no longer needs its folder kept alive nor its slot: a queued detached job may start."""
    opts.live.pop(job_id, None)
    opts.waiting.discard(job_id)
    if not opts.live:
        opts.idle.set()  # the heartbeat thread ends now, not in HEARTBEAT_S
    if opts.detached is not None:
        opts.detached.dispatch()


def start_heartbeat(opts: ServerOptions) -> None:
    """One thread per app touches ``.alive`` in each of this process's job folders, so that another
    process sharing the work dir (or this one's sweep) can tell a live job from a dead one."""
    if opts.heartbeat is not None and opts.heartbeat.is_alive() and not opts.idle.is_set():
        return

    opts.idle.clear()

    def beat() -> None:
        while opts.live:  # ends with the last job; the next job starts another
            if opts.idle.wait(HEARTBEAT_S):
                return
            for job_dir in list(opts.live.values()):
                try:
                    os.utime(job_dir / ".alive")
                except OSError:
                    pass

    opts.heartbeat = threading.Thread(target=beat, name="synapse-heartbeat", daemon=True)
    opts.heartbeat.start()
