"""The container side of the Modal backend: running a job where its files are not.

A remote spec names files on the shared Volume as ``vol:<relative path>``.
Inside the container ``container_stream`` maps those to the Volume's mount
(``SYNAPSE_VOLUME_ROOT``, default ``/data``), runs the same job generator as a
local run, and yields its events as plain dicts, with paths mapped back to
``vol:`` form so the client knows what to download. No modal import here: the
Modal functions in ``synapse_cli/modal_app.py`` are thin wrappers over this.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from synapse_cli.events import Artifact, Event, Finished, to_dict
from synapse_cli.backends._remote import PathField, stage_paths
from synapse_cli.jobs import load_job, select_installed, spec_from_dict
from synapse_cli.storage.staging import staged

VOL = "vol:"
DEFAULT_MOUNT = "/data"


def volume_root() -> Path:
    return Path(os.environ.get("SYNAPSE_VOLUME_ROOT", DEFAULT_MOUNT))


def to_container(kind: str, spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """``vol:x`` → ``<root>/x`` in every path field; output folders are created."""

    def place(path: PathField) -> str:
        local = str(root / path.value[len(VOL) :]) if path.value.startswith(VOL) else path.value
        if path.output:
            Path(local).parent.mkdir(parents=True, exist_ok=True)
        return local

    return stage_paths(kind, spec, place)


def from_container(value: Any, root: Path) -> Any:
    """Paths under the Volume root back to ``vol:`` form, recursively through results."""
    from synapse_cli.jsonwalk import map_strings

    prefix = str(root).rstrip("/") + "/"
    return map_strings(value, lambda s: VOL + s[len(prefix):] if s.startswith(prefix) else s)


def container_stream(kind: str, spec: dict[str, Any], notify: dict[str, Any] | None = None, job_id: str | None = None,
                     on_delivery: Callable[[Any], None] | None = None,
                     run: Callable[[Any, Any], Iterator[Event]] | None = None) -> Iterator[dict[str, Any]]:
    """Run job ``kind`` on a ``vol:``-addressed spec; yield its events as dicts.

    ``run(staged_spec, spec)``: what runs the job once its URLs are staged (default: its generator,
    here); a sharded job's split-and-merge (``backends.modal.inside``) is handed in by the app.

    ``notify`` (``notify.Target.for_call``) with ``job_id``: the job's webhooks are sent from here,
    through the URL guard (a container must not reach its cloud's metadata service or private
    network for a stranger), and the terminal one is waited for before the stream ends;
    ``on_delivery(notify.Delivery)`` hears what became of each."""
    root = volume_root()
    # models come from the image (the bundled default) or from models/ on the Volume, put there by its owner
    job_spec = spec_from_dict(kind, select_installed(kind, to_container(kind, spec, root), root / "models"))
    from synapse_cli.storage.client import Storage

    def events() -> Iterator[Event]:
        # s3:// and https:// fields are read and written here, with the named Secret's AWS_* credentials
        # (the client uploads and downloads nothing for them); a user's https:// goes through the URL guard
        job = run or (lambda local, _original: load_job(kind)(local))
        for event in staged(kind, job_spec, Storage.for_container(os.environ), lambda local: job(local, job_spec)):
            if isinstance(event, Artifact):
                event = replace(event, path=from_container(event.path, root))
            elif isinstance(event, Finished):
                event = replace(event, result=from_container(event.result, root))
            yield event

    stream = events() if not notify else _notified(events(), notify, job_id or "job", kind, on_delivery)
    for event in stream:
        yield to_dict(event)


def _notified(events: Iterator[Event], notify: dict[str, Any], job_id: str, kind: str, on_delivery: Callable[[Any], None] | None) -> Iterator[Event]:
    from synapse_cli.netguard import Guard
    from synapse_cli.notify import Target, notify_events

    target = Target.from_call(notify)
    client = Guard(allow_hosts=notify.get("allow_hosts") or (), allow_http=target.allow_http).client()
    try:
        yield from notify_events(events, target, job_id, kind, client=client, on_delivery=on_delivery)
    finally:
        client.close()
