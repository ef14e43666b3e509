"""The one pipeline every job command goes through: resolve → spec → backend → record → render → exit code."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Iterator

import typer

from synapse_cli.cli._options import Common
from synapse_cli.config import Settings, load_settings
from synapse_cli.errors import SynapseError, UsageError
from synapse_cli.events import failed


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
        if os.environ.get("SYNAPSE_TRACEBACK") == "1":
            raise
        fail(exc, "Error", f"{type(exc).__name__}: {exc} (set SYNAPSE_TRACEBACK=1 for details)", 1)


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
    endpoint = settings["modal.endpoint"]
    if local_only:  # e.g. synapse sample: nothing to gain from running it remotely
        return backend_named("local", settings)
    if endpoint and (settings["backend"] == "modal" or settings.source("modal.endpoint") == "flag"):
        return backend_named("http", settings)
    return backend_named(settings["backend"], settings)


def run_job(
    kind: str,
    build_spec: Callable[[Settings], Any],
    common: Common,
    flags: dict[str, Any] | None = None,
    summarize: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Resolve settings, build and validate the spec, run it on the chosen backend, record and render its events."""
    from synapse_cli.jobs import get_kind
    from synapse_cli.render import choose_mode, default_summary, render
    from synapse_cli.store import ACTIVE, JobStore
    from synapse_cli.result_cache import cache_key, follow, reusable, reuse
    from synapse_cli.runs import record, step_summary

    with exit_on_error(common.json):
        all_flags = {**common.flags(), **(flags or {})}
        settings = settings_for(common, flags)
        spec = build_spec(settings)
        backend = backend_for(settings, local_only=not get_kind(kind).remote)
        store = JobStore.from_settings(settings)
        try:
            if common.detach:
                return detach(kind, spec, backend, store, all_flags, common)
            key = cache_key(kind, spec) if common.cache else None
            job, other = store.claim_or_find(kind, asdict(spec), backend.name, key)
            if other is not None and reusable(other):
                events = reuse(other, kind, spec)
            elif other is not None and other.status in ACTIVE:
                events = follow(store, other, kind, spec)
            else:
                from synapse_cli.shards import job_events

                events = job_events(kind, spec, backend, settings)
            stream = record(store, job, events, on_end=step_summary)
            try:
                with sigterm_as_interrupt():
                    return render(stream, choose_mode(common.json), summarize or default_summary)
            finally:
                stream.close()  # on Ctrl-C this runs the job's cleanup (kill ffmpeg, remove temp files)
        finally:
            backend.close()
            store.close()
    return {}


def detach(kind: str, spec: Any, backend: Any, store: Any, flags: dict[str, Any], common: Common) -> dict[str, Any]:
    """Start the job where it survives this terminal and print its id."""
    import json

    from synapse_cli.backends.base import Backend
    from synapse_cli.config import env_name, registry
    from synapse_cli.result_cache import cache_key

    if type(backend).detach is Backend.detach:  # refused before a row exists
        raise UsageError(f"--detach is not supported with the {backend.name} backend")
    if flags.get("shards.count") not in (None, "auto", "1", 1) and not backend.detaches_shards:
        raise UsageError(f"--detach with --shards runs on the local backend; the {backend.name} backend detaches one call")
    given = {k: v for k, v in flags.items() if v is not None}
    key = cache_key(kind, spec) if common.cache else None  # an identical later job reuses this one's result
    job = store.create(kind, asdict(spec), backend.name, cache_key=key, detached=True, flags=given)  # secrets are not stored
    env = {env_name(k): str(v) for k, v in given.items() if k in registry() and registry()[k].secret}  # they reach the worker this way
    if common.config:
        env["SYNAPSE_CONFIG"] = str(common.config.resolve())
    if common.profile:
        env["SYNAPSE_PROFILE"] = common.profile
    try:
        backend.detach(kind, spec, job, store, env)
    except BaseException as exc:  # it never started: no pending row is left behind
        try:
            store.finish(job.id, "failed", error_code=failed(exc).code, error_message=f"could not start: {failed(exc).message}")
        except Exception:
            pass  # the row then goes once this process has: reap() fails a pending job whose creator is gone
        raise
    if common.json:
        typer.echo(json.dumps({"job_id": job.id, "status": "pending", "kind": kind, "backend": backend.name}))
    else:
        typer.echo(job.id)
        print(f"{kind}: detached as job {job.id} (synapse jobs wait {job.id})", file=sys.stderr)
    return {"job_id": job.id}
