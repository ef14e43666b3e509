"""The one pipeline every job command goes through: resolve → spec → backend → record → render → exit code."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import typer

from synapse_cli.cli._options import Common
from synapse_cli.config import Settings, load_settings
from synapse_cli.errors import SynapseError, UsageError
from synapse_cli.events import Event, failed


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def exit_on_error(json_output: bool = False) -> Iterator[None]:
    """Map every failure to one stderr line and its exit code (and a last NDJSON ``error`` line with --json)."""

    def fail(exc: BaseException, label: str, message: str, code: int) -> None:
        if json_output:
            from synapse_cli.render.ndjson import encode

            ev = failed(exc)
            sys.stdout.write(encode(type(ev)(code=code, message=message, error=ev.error)) + "\n")
            sys.stdout.flush()
        print(f"{label}: {_one_line(message)}", file=sys.stderr, flush=True)
        if not json_output:  # with --json the caller (e.g. python -m synapse_cli.ci) annotates from the error line
            from synapse_cli.render.plain import error_annotation, in_github_actions

            if in_github_actions():
                print(error_annotation(f"synapse: {label}", message), file=sys.stderr, flush=True)
        raise typer.Exit(code)

    try:
        yield
    except typer.Exit:
        raise
    except SynapseError as exc:
        if os.environ.get("SYNAPSE_TRACEBACK") == "1":
            raise
        fail(exc, "Interrupted" if exc.exit_code == 130 else type(exc).__name__, str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        fail(exc, "Interrupted", "interrupted", 130)
    except Exception as exc:  # a bug of ours or an unmapped foreign error: still one line
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            # whoever read stdout went away (`synapse jobs list | head -3`), and the job's cleanup has run on
            # the way here: stop quietly, with the code of a process that SIGPIPE ends, and give the
            # interpreter's last flush somewhere to go
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        if os.environ.get("SYNAPSE_TRACEBACK") == "1":
            raise
        fail(exc, "Error", f"{type(exc).__name__}: {exc} (set SYNAPSE_TRACEBACK=1 for details)", 1)


def _stdout_gone() -> bool:
    """Is stdout a pipe whose reader has gone? (polling its write end then reports an error.)"""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout has no file descriptor (a test's capture)
        return False


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """``synapse jobs cancel`` sends SIGTERM: treat it like Ctrl-C, so the job's cleanup runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def settings_for(common: Common, flags: dict[str, Any] | None = None) -> Settings:
    return load_settings({**common.flags(), **(flags or {})}, common.config, common.profile)


def backend_named(name: str, settings: Settings):
    """The backend a stored job ran on (``jobs wait``/``cancel``), configured from the settings."""
    if name == "modal":
        from synapse_cli.backends.modal import ModalBackend

        return ModalBackend.from_settings(settings)
    if name == "http":
        from synapse_cli.backends.http import HttpBackend

        return HttpBackend.from_settings(settings)
    from synapse_cli.backends.local import LocalBackend

    return LocalBackend()


def backend_for(settings: Settings, local_only: bool = False):
    """The backend the settings select: local (in-process), an HTTP endpoint, or Modal.

    An endpoint only matters for remote runs: with ``--use-modal`` (or ``backend = "modal"``)
    and an endpoint configured, the endpoint is used, as teams that front Modal with a web
    endpoint expect. ``--endpoint`` given on the command line selects it by itself.
    """
    endpoint = settings["http.endpoint"]
    if local_only:  # e.g. synapse sample: nothing to gain from running it remotely
        return backend_named("local", settings)
    if endpoint and (settings["backend"] == "modal" or settings.source("http.endpoint") == "flag"):
        return backend_named("http", settings)
    return backend_named(settings["backend"], settings)


def runner_for(job: Any, settings: Settings):
    """Who follows or cancels a detached job: the remote backend that holds it (a spawned call),
    else this machine (a local worker writing the job store)."""
    if job.remote and job.backend == "http":  # the endpoint the job was sent to, with today's key (the store keeps none)
        from synapse_cli.backends.http import HttpBackend

        return HttpBackend.from_settings(settings, endpoint=job.remote.get("endpoint"))
    return backend_named(job.backend if job.remote else "local", settings)


@dataclass
class JobRequest:
    """What a job command asks the pipeline for: the kind, how to build its spec from the settings,
    the common options, the command's own setting flags, and how to summarize the result."""

    kind: str
    build_spec: Callable[[Settings], Any]
    common: Common
    flags: dict[str, Any] = field(default_factory=dict)
    summarize: Callable[[dict[str, Any]], str] | None = None


@dataclass
class Plan:
    """A job ready to run: resolved settings, validated spec, the backend and the job store.

    ``job_id`` is set once the job has a row in the store. ``close()`` releases the backend
    and the store; it may be called more than once.
    """

    request: JobRequest
    settings: Settings
    spec: Any
    backend: Any
    store: Any
    job_id: str | None = None

    @property
    def kind(self) -> str:
        return self.request.kind

    def close(self) -> None:
        backend, store, self.backend, self.store = self.backend, self.store, None, None
        try:
            if backend is not None:
                backend.close()
        finally:
            if store is not None:
                store.close()


_CAPTURE: ContextVar[list[JobRequest] | None] = ContextVar("synapse_capture", default=None)


@contextmanager
def capture_requests() -> Iterator[list[JobRequest]]:
    """Inside, ``run_job`` hands back what a command asked for instead of running it.

    The Python API calls a command's own function this way, so its specs are built,
    validated and defaulted by exactly the code the CLI runs.
    """
    requests: list[JobRequest] = []
    token = _CAPTURE.set(requests)
    try:
        yield requests
    finally:
        _CAPTURE.reset(token)


def plan_job(request: JobRequest) -> Plan:
    """Settings (flag > env > file > default), then the spec, the backend and the job store."""
    from synapse_cli.jobs import get_kind
    from synapse_cli.store import JobStore

    settings = settings_for(request.common, request.flags)
    spec = request.build_spec(settings)
    backend = backend_for(settings, local_only=not get_kind(request.kind).remote)
    try:
        store = JobStore.from_settings(settings)
    except BaseException:
        backend.close()
        raise
    return Plan(request, settings, spec, backend, store)


def job_events(plan: Plan) -> Iterator[Event]:
    """The job's events, recorded in the job store as they pass.

    An identical completed job's result is reused, an identical running one followed
    (unless the request turned the cache off). Closing this iterator early (or an
    exception, Ctrl-C included, raised through it) cancels the job: the backend stops it
    and removes partial outputs, and the store marks it cancelled. Any error, before the
    job starts (a bad input found by the backend) or after, ends its row ``failed``.
    """
    from synapse_cli.runs import record, step_summary
    from synapse_cli.store import ACTIVE

    kind, spec, store = plan.kind, plan.spec, plan.store
    key = None
    if plan.request.common.cache:  # (--no-cache: nothing to hash, and the cache's code stays unloaded)
        from synapse_cli.result_cache import cache_key

        key = cache_key(kind, spec, plan.settings)  # (the settings reach a URL input's store: its ETag is its identity)
    job, other = store.claim_or_find(kind, asdict(spec), plan.backend.name, key)
    plan.job_id = job.id

    def start() -> Iterator[Event]:  # called by record: what it raises is recorded as the job's end
        if other is not None:
            from synapse_cli.result_cache import follow, reusable, reuse

            if reusable(other):
                return reuse(other, kind, spec)
            if other.status in ACTIVE and not (other.detached and other.backend != "local"):
                # (a detached Modal or endpoint job's events reach this store only while `jobs wait` runs: not followed)
                return follow(store, other, kind, spec)
        from synapse_cli.shards import job_events as run_events  # one call, or shards merged into one stream

        return run_events(kind, spec, plan.backend, plan.settings)  # may raise before its first event (--shards auto probes)

    try:
        yield from record(store, job, start, on_end=step_summary)
    finally:
        store.release(job.id)


def start_detached(plan: Plan, env: dict[str, str] | None = None) -> Any:
    """Start the job where it survives this process (a local worker, a spawned Modal call); return its store row."""
    from synapse_cli.backends.base import Backend
    from synapse_cli.config import env_name, registry
    from synapse_cli.result_cache import cache_key

    common, backend, kind, spec = plan.request.common, plan.backend, plan.kind, plan.spec
    flags = {**common.flags(), **plan.request.flags}
    if type(backend).detach is Backend.detach:  # refused before a row exists
        raise UsageError(f"--detach is not supported with the {backend.name} backend")
    if flags.get("shards.count") not in (None, "auto", "1", 1) and not backend.detaches_shards:
        raise UsageError(f"--detach with --shards runs on the local backend; the {backend.name} backend detaches one call")
    given = {k: v for k, v in flags.items() if v is not None}
    key = cache_key(kind, spec, plan.settings) if common.cache else None  # an identical later job reuses this one's result
    job = plan.store.create(kind, asdict(spec), backend.name, cache_key=key, detached=True, flags=given)  # secrets are not stored
    plan.job_id = job.id
    env = dict(env or {})
    env.update({env_name(k): str(v) for k, v in given.items() if k in registry() and registry()[k].secret})  # they reach the worker this way
    if common.config:
        env["SYNAPSE_CONFIG"] = str(Path(common.config).resolve())
    if common.profile:
        env["SYNAPSE_PROFILE"] = common.profile
    try:
        backend.detach(kind, spec, job, plan.store, env)
    except BaseException as exc:  # it never started: no pending row is left behind
        try:
            plan.store.finish(job.id, "failed", error_code=failed(exc).code, error_message=f"could not start: {failed(exc).message}")
        except Exception:  # noqa: BLE001
            pass  # the row then goes once this process has: reap() fails a pending job whose creator is gone
        raise
    return job


def run_job(
    kind: str,
    build_spec: Callable[[Settings], Any],
    common: Common,
    flags: dict[str, Any] | None = None,
    summarize: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Resolve settings, build and validate the spec, run it on the chosen backend, record and render its events."""
    request = JobRequest(kind, build_spec, common, dict(flags or {}), summarize)
    captured = _CAPTURE.get()
    if captured is not None:  # the Python API is building this job (capture_requests)
        captured.append(request)
        return {}
    from synapse_cli.render import choose_mode, default_summary, render

    with exit_on_error(common.json):
        plan = plan_job(request)
        try:
            if common.detach:
                return detach(plan)
            stream = job_events(plan)
            try:
                with sigterm_as_interrupt():
                    return render(stream, choose_mode(common.json), summarize or default_summary)
            finally:
                stream.close()  # on Ctrl-C this runs the job's cleanup (kill ffmpeg, remove temp files)
        finally:
            plan.close()
    return {}


def detach(plan: Plan) -> dict[str, Any]:
    """Start the job where it survives this terminal and print its id."""
    import json

    job = start_detached(plan)
    if plan.request.common.json:
        typer.echo(json.dumps({"job_id": job.id, "status": "pending", "kind": plan.kind, "backend": plan.backend.name}))
    else:
        typer.echo(job.id)
        print(f"{plan.kind}: detached as job {job.id} (synapse jobs wait {job.id})", file=sys.stderr)
    return {"job_id": job.id}
