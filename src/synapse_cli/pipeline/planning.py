"""From options to a job ready to run: settings, the kind's spec, the backend and the job store."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from synapse_cli.config import Settings, load_settings
from synapse_cli.errors import UsageError
from synapse_cli.pipeline.options import RunOptions


def settings_for(options: RunOptions, flags: Mapping[str, Any] | None = None) -> Settings:
    """flag > ``SYNAPSE_*`` env > config file > default, for these options and setting flags."""
    return load_settings({**options.flags(), **dict(flags or {})}, options.config, options.profile)


def _modal_app() -> Any:
    """The Modal app module, for an ephemeral run (``app.run()``): imported only then."""
    from synapse_cli import modal_app

    return modal_app


def backend_named(name: str, settings: Settings) -> Any:
    """The backend a stored job ran on (``jobs wait``/``cancel``), configured from the settings."""
    if name == "modal":
        from synapse_cli.backends.modal import ModalBackend

        return ModalBackend.from_settings(settings, app=_modal_app)
    if name == "http":
        from synapse_cli.backends.http import HttpBackend

        return HttpBackend.from_settings(settings)
    from synapse_cli.backends.local import LocalBackend

    return LocalBackend()


def backend_for(settings: Settings, local_only: bool = False) -> Any:
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


def runner_for(job: Any, settings: Settings) -> Any:
    """Who follows or cancels a detached job: the remote backend that holds it (a spawned call),
    else this machine (a local worker writing the job store)."""
    if job.remote and job.backend == "http":  # the endpoint the job was sent to, with today's key (the store keeps none)
        from synapse_cli.backends.http import HttpBackend

        return HttpBackend.from_settings(settings, endpoint=job.remote.get("endpoint"))
    return backend_named(job.backend if job.remote else "local", settings)


@dataclass
class Plan:
    """A job ready to run: resolved settings, validated spec, the backend and the job store.

    ``flags`` are the kind's own options that are settings (``infer.task``...), as given.
    ``job_id`` is set once the job has a row in the store. ``close()`` releases the backend
    and the store; it may be called more than once.
    """

    kind: str
    options: RunOptions
    settings: Settings
    spec: Any
    backend: Any
    store: Any
    flags: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    notify: Any = None  # the notify.Target this process sends an attached run's webhooks to (None: none, or the backend does)

    def close(self) -> None:
        backend, store, self.backend, self.store = self.backend, self.store, None, None
        try:
            if backend is not None:
                backend.close()
        finally:
            if store is not None:
                store.close()


def _flag_value(value: Any) -> Any:
    """A kind option's value as a setting flag: paths as strings, lists as ``a,b`` (as the command line gives them)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return ",".join(os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value)
    return value


def get_record(kind: str) -> Any:
    """The kind's record, or a UsageError naming the known kinds."""
    from synapse_cli.jobs import get_kind

    try:
        return get_kind(kind)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def split_options(kind: str, args: tuple[Any, ...], given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A kind's options (positional and keyword) into (setting flags, builder arguments), checked
    against the builder's signature: an unknown or missing option is a UsageError naming the accepted ones."""
    record = get_record(kind)
    if not record.build:
        raise UsageError(f"job kind {kind!r} declares no spec builder, so it cannot run from options")
    builder = record.hook("build")
    options = dict(given)
    flags = {record.options[name]: _flag_value(options.pop(name)) for name in list(options) if name in record.options}
    signature = inspect.signature(builder)
    try:
        bound = signature.bind(None, *args, **options)
    except TypeError as exc:
        names = [n for n in signature.parameters if n not in ("settings", "overwrite", "cache")]
        accepted = ", ".join([*names, *record.options, *RunOptions.api_names(), "settings"])
        raise UsageError(f"{kind}: {exc} (accepted: {accepted})") from None
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # settings: given at build time
    for name in ("overwrite", "cache"):
        if name in arguments:
            raise UsageError(f"{kind}: {name!r} is a common option; pass it once")
    return flags, arguments


def plan(kind: str, options: RunOptions | None = None, /, *args: Any, flags: Mapping[str, Any] | None = None, **kind_options: Any) -> Plan:
    """Settings (flag > env > file > default), then the kind's spec, the backend and the job store.

    ``kind_options`` are the kind's own options (its builder's parameters and the options its
    record maps to settings); ``flags`` are further settings given as flags (``{"ffmpeg.preset": ...}``).
    A bad option, setting or input raises here, before anything runs.
    """
    from synapse_cli.store import JobStore

    options = options or RunOptions()
    setting_flags, arguments = split_options(kind, args, kind_options)
    record = get_record(kind)
    given = {k: v for k, v in {**dict(flags or {}), **setting_flags}.items() if v is not None}
    settings = settings_for(options, given)
    spec = record.hook("build")(settings, **arguments, overwrite=options.overwrite, cache=options.cache)
    backend = backend_for(settings, local_only=not record.remote)
    try:
        notify = webhook_target(settings, backend)
        store = JobStore.from_settings(settings)
    except BaseException:
        backend.close()
        raise
    return Plan(kind, options, settings, spec, backend, store, flags=given, notify=notify)


def webhook_target(settings: Settings, backend: Any) -> Any:
    """The webhook target this process sends an attached run's events to, checked now (a missing
    secret or a bad URL is a UsageError before anything runs); None without ``--notify``/``[notify] url``,
    or when the backend has them sent where it runs (an endpoint's server signs them itself)."""
    if not settings["notify.url"] or backend.capabilities.notifies:
        return None
    from synapse_cli.notify import Target

    return Target.from_settings(settings, local=True)  # sent from this machine: plain http:// is the user's business here
