"""Running a planned job: attached (its events, recorded as they pass) or detached (a row and a worker)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Generator, Iterator

from synapse_cli.errors import UsageError
from synapse_cli.events import Event, Log, Started, failed
from synapse_cli.pipeline.planning import Plan


def job_events(plan: Plan) -> Generator[Event, None, None]:
    """The job's events, recorded in the job store as they pass.

    An identical completed job's result is reused, an identical running one followed
    (unless the options turned the cache off). Closing this iterator early (or an
    exception, Ctrl-C included, raised through it) cancels the job: the backend stops it
    and removes partial outputs, and the store marks it cancelled. Any error, before the
    job starts (a bad input found by the backend) or after, ends its row ``failed``.
    """
    from synapse_cli.store.recording import record, step_summary, with_webhooks
    from synapse_cli.store import ACTIVE

    kind, spec, store = plan.kind, plan.spec, plan.store
    key, uncached = None, None
    # a backend that sends the webhooks where it runs (an endpoint) must run the job to send them: no reuse then
    notified_elsewhere = bool(plan.settings["notify.url"]) and plan.backend.capabilities.notifies
    if plan.options.cache and not notified_elsewhere:  # (--no-cache: nothing to hash, and the cache's code stays unloaded)
        from synapse_cli.store.cache import cache_key

        key = cache_key(kind, spec, plan.settings)  # (the settings reach a URL input's store: its ETag is its identity)
        if key is None:
            from synapse_cli.store.cache import uncached_reason

            uncached = uncached_reason(kind, spec)
    job, other = store.claim_or_find(kind, asdict(spec), plan.backend.name, key)
    plan.job_id = job.id

    def start() -> Iterator[Event]:  # called by record: what it raises is recorded as the job's end
        if other is not None:
            from synapse_cli.store.cache import follow, reusable, reuse

            if reusable(other):
                return reuse(other, kind, spec)
            if other.status in ACTIVE and not (other.detached and other.backend != "local"):
                # (a detached Modal or endpoint job's events reach this store only while `jobs wait` runs: not followed)
                return follow(store, other, kind, spec)
        from synapse_cli.shards import job_events as run_events  # one call, or shards merged into one stream

        events = run_events(kind, spec, plan.backend, plan.settings)  # may raise before its first event (--shards auto probes)
        return _noted(events, uncached) if uncached else events

    try:
        # the webhooks see what the store saw, the terminal delivery waited for (bounded by [notify] retry_for_s)
        yield from with_webhooks(record(store, job, start, on_end=step_summary), plan.notify, job.id, kind, store.path)
    finally:
        store.release(job.id)


def _noted(events: Iterator[Event], note: str) -> Iterator[Event]:
    """The events, with one ``Log`` line ``note`` right after ``Started``."""
    for event in events:
        yield event
        if isinstance(event, Started):
            yield Log(note)
            yield from events
            return


def start_detached(plan: Plan, env: dict[str, str] | None = None) -> Any:
    """Start the job where it survives this process (a local worker, a spawned Modal call); return its store row."""
    from synapse_cli.config import env_name, registry
    from synapse_cli.store.cache import cache_key

    options, backend, kind, spec = plan.options, plan.backend, plan.kind, plan.spec
    flags = {**options.flags(), **plan.flags}
    can = backend.capabilities
    if not can.detach:  # refused before a row exists
        raise UsageError(f"--detach is not supported with the {backend.name} backend")
    if flags.get("shards.count") not in (None, "auto", "1", 1) and not can.detach_shards:
        raise UsageError(f"--detach with --shards runs on the local backend; the {backend.name} backend detaches one call")
    given = {k: v for k, v in flags.items() if v is not None}
    key = cache_key(kind, spec, plan.settings) if options.cache else None  # an identical later job reuses this one's result
    job = plan.store.create(kind, asdict(spec), backend.name, cache_key=key, detached=True, flags=given)  # secrets are not stored
    plan.job_id = job.id
    env = dict(env or {})
    env.update({env_name(k): str(v) for k, v in given.items() if k in registry() and registry()[k].secret})  # they reach the worker this way
    if options.config:
        env["SYNAPSE_CONFIG"] = str(Path(options.config).resolve())
    if options.profile:
        env["SYNAPSE_PROFILE"] = options.profile
    try:
        backend.detach(kind, spec, job, plan.store, env)
    except BaseException as exc:  # it never started: no pending row is left behind
        try:
            plan.store.finish(job.id, "failed", error_code=failed(exc).code, error_message=f"could not start: {failed(exc).message}")
        except Exception:  # noqa: BLE001
            pass  # the row then goes once this process has: reap() fails a pending job whose creator is gone
        raise
    return job
