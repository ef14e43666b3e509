"""Inside a container: a sharded job split, run and merged where its URLs are read and its pieces are.

``<kind>_sharded`` (``synapse_cli.modal_app``) runs this when a client cannot split the job itself:
its fields are ``s3://``/``https://`` URLs the client may hold no credentials for, or it is detached
and someone must merge it with no client waiting (webhooks, URL outputs). In that container:

1. the spec's URLs are staged as for any job (``storage.staging``): a streamed input is presigned,
   an output is a local file uploaded once the merged job finished;
2. the job is split as the client would split it (``shards.sharded_events``, ``[shards]`` as the
   client asked), each shard one call of ``<kind>`` through ``ContainerBackend``: a path already
   on the Volume goes as its ``vol:`` form (nothing uploaded again), a presigned input goes as the
   URL the user gave (each shard reads it with its own credentials), and each piece comes back
   from the Volume into this container's temp folder;
3. the kind's merge runs here, and the staged outputs are written to their URLs.

A job too short to split runs here whole, unless its kind needs a GPU (this container has none):
then it is one call of ``<kind>``.

No client waits for any of it: the events of the merged job are this call's events.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from synapse_cli.backends._remote import PathField, stage_paths
from synapse_cli.backends.base import Capabilities
from synapse_cli.backends.modal.backend import ModalBackend
from synapse_cli.backends.modal.files import _Files
from synapse_cli.container import VOL
from synapse_cli.events import Event


class ShardSettings:
    """The ``[shards]`` settings a client sent (``ModalBackend.shard_settings``), read as ``settings["shards.x"]``."""

    def __init__(self, section: Mapping[str, Any]) -> None:
        self.section = dict(section)

    def __getitem__(self, key: str) -> Any:
        group, _, name = key.partition(".")
        if group != "shards" or name not in self.section:
            raise KeyError(key)
        return self.section[name]


class ContainerBackend(ModalBackend):
    """``ModalBackend`` as a container uses it: each shard one call of the same app's ``<kind>``.

    ``root``: where the Volume is mounted here. ``urls``: the presigned URLs this container's staging
    made -> the URLs the user gave, which each shard reads itself.
    """

    name = "modal"

    def __init__(self, config: Mapping[str, Any], lookup: Callable[[str], Any], volume: Any, root: Path, urls: Mapping[str, str]) -> None:
        super().__init__(config, lookup=lookup, volume=volume)
        self.root = root
        self.urls = dict(urls)

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        # the URLs were staged here already: this container splits them as any other job
        return Capabilities(shards="remote", url_shards="remote", scales_out=True, shard_retries=self.shard_retries)

    def run(self, kind: str, spec: Any) -> Iterator[Event]:
        """The job whole (too short to split): here, unless it needs a GPU this container lacks."""
        from synapse_cli.jobs import get_kind, load_job

        if get_kind(kind).gpu:
            return self._call(kind, spec)
        return load_job(kind)(spec)

    def run_shard(self, kind: str, spec: Any) -> Iterator[Event]:
        return self._call(kind, spec)

    def _credentials(self) -> None:
        """A container calls its own app with the identity Modal gave it: no token to look for."""

    def stage(self, kind: str, spec: Any, files: _Files) -> dict[str, Any]:
        prefix = str(self.root).rstrip("/") + "/"

        def place(path: PathField) -> str:
            if not path.output and path.value.startswith(prefix):  # on the Volume already: its vol: form
                return VOL + path.value[len(prefix):]
            return files.place(path)  # a piece (fetched back here when the shard finished), or a file only this container has

        data = stage_paths(kind, asdict(spec), place)
        for name, value in data.items():  # presigned by this container -> the user's URL: the shard signs its own
            if isinstance(value, str) and value in self.urls:
                data[name] = self.urls[value]
            elif isinstance(value, list):
                data[name] = [self.urls.get(v, v) if isinstance(v, str) else v for v in value]
        return data


def sharded_job(kind: str, spec: Any, original: Any, backend_for: Callable[[Mapping[str, str]], ContainerBackend],
                section: Mapping[str, Any]) -> Iterator[Event]:
    """The events of ``spec`` (staged: its URLs placed by this container) split by ``section``
    (``[shards]`` as the client asked), its shards run through ``backend_for(urls)``, merged here.
    ``original`` is the spec as the user gave it, for the URLs each shard reads itself."""
    from synapse_cli.shards import sharded_events
    from synapse_cli.storage.urls import url_fields

    staged = asdict(spec)
    urls: dict[str, str] = {}
    for field in url_fields(kind, asdict(original)):
        if field.output:
            continue
        seen = staged.get(field.field)
        seen = seen[field.index] if field.index is not None and isinstance(seen, list) else seen
        if isinstance(seen, str) and seen != field.url and seen.startswith(("https://", "http://")):
            urls[seen] = field.url
    backend = backend_for(urls)
    try:
        yield from sharded_events(kind, spec, backend, ShardSettings(section), workdir=Path(tempfile.gettempdir()))
    finally:
        backend.close()
