"""Running a job where its files are not: the container side of remote backends.

A remote spec names files on the shared Volume as ``vol:<relative path>``.
Inside the container ``container_stream`` maps those to the Volume's mount
(``SYNAPSE_VOLUME_ROOT``, default ``/data``), runs the same job generator as a
local run, and yields its events as plain dicts, with paths mapped back to
``vol:`` form so the client knows what to download. No modal import here: the
Modal functions in ``modal_functions/app.py`` are thin wrappers over this.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from synapse_cli.events import Artifact, Finished, to_dict
from synapse_cli.jobs import load_job, spec_class, spec_from_dict

VOL = "vol:"
DEFAULT_MOUNT = "/data"


def volume_root() -> Path:
    return Path(os.environ.get("SYNAPSE_VOLUME_ROOT", DEFAULT_MOUNT))


# Spec fields that name something on the machine that runs the job (a binary, a cache): the
# caller's value means nothing remotely, so remote backends drop them and the spec's default
# (whatever the remote machine has) applies. A spec class can declare its own ``HOST_FIELDS``.
DEFAULT_HOST_FIELDS = ("ffmpeg", "ffmpeg_path", "cache_dir")


def path_fields(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    cls = spec_class(kind)
    return tuple(getattr(cls, "INPUTS", ())), tuple(getattr(cls, "OUTPUTS", ()))


def host_fields(kind: str) -> tuple[str, ...]:
    return tuple(getattr(spec_class(kind), "HOST_FIELDS", DEFAULT_HOST_FIELDS))


def installed_fields(kind: str) -> tuple[str, ...]:
    return tuple(getattr(spec_class(kind), "INSTALLED", ()))


def select_installed(kind: str, spec: dict[str, Any], models_dir: str | Path | None) -> dict[str, Any]:
    """Point every ``INSTALLED`` field (a model name) at the owner-installed file it names.

    The one place a remote spec's model is resolved: a name, looked up among what the
    machine's owner installed; a path, an uploaded file or an unknown name is a UsageError.
    """
    cls = spec_class(kind)
    out = dict(spec)
    for name in installed_fields(kind):
        if out.get(name) is not None:
            out[name] = cls.select_installed(name, out[name], models_dir)
    return out


def _map(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [fn(v) if isinstance(v, str) else v for v in value]
    return value


def to_container(kind: str, spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """``vol:x`` → ``<root>/x`` in every path field; output folders are created."""
    inputs, outputs = path_fields(kind)
    out = dict(spec)
    for name in inputs + outputs:
        out[name] = _map(out.get(name), lambda v: str(root / v[len(VOL):]) if v.startswith(VOL) else v)
    for name in outputs:
        value = out.get(name)
        if isinstance(value, str):
            Path(value).parent.mkdir(parents=True, exist_ok=True)
    return out


def from_container(value: Any, root: Path) -> Any:
    """Paths under the Volume root back to ``vol:`` form, recursively through results."""
    prefix = str(root).rstrip("/") + "/"
    if isinstance(value, str) and value.startswith(prefix):
        return VOL + value[len(prefix):]
    if isinstance(value, list):
        return [from_container(v, root) for v in value]
    if isinstance(value, dict):
        return {k: from_container(v, root) for k, v in value.items()}
    return value


def container_stream(kind: str, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Run job ``kind`` on a ``vol:``-addressed spec; yield its events as dicts."""
    root = volume_root()
    # models come from the image (the bundled default) or from models/ on the Volume, put there by its owner
    job_spec = spec_from_dict(kind, select_installed(kind, to_container(kind, spec, root), root / "models"))
    for event in load_job(kind)(job_spec):
        if isinstance(event, Artifact):
            event = replace(event, path=from_container(event.path, root))
        elif isinstance(event, Finished):
            event = replace(event, result=from_container(event.result, root))
        yield to_dict(event)
