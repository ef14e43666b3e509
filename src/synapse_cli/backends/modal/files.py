"""Files through the Volume: a run's inputs uploaded once (by content), its outputs fetched back and renamed into place."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from synapse_cli.backends._remote import Outputs, PathField, StagedNames
from synapse_cli.container import VOL
from synapse_cli.errors import BackendError, UsageError
from synapse_cli.events import Artifact, Event
from synapse_cli.hashing import sha256_file, sha256_tree


class _Uploads:
    """What this client has uploaded already (local path -> ``vol:`` key), shared by a job's shards."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: dict[str, str] = {}


class _Files:
    """Maps a spec's local paths to Volume paths and back, uploading and downloading as needed."""

    def __init__(self, volume: Any, job_id: str, uploads: "_Uploads | None" = None) -> None:
        self.uploads = uploads or _Uploads()
        self.volume = volume
        self.job_id = job_id
        self.local_of: dict[str, Path] = {}  # "vol:..." -> local path
        self.output_dirs: dict[str, Path] = {}  # "vol:outputs/<id>/<dir>" -> local dir
        self.inputs: dict[str, Path] = {}  # "vol:inputs/<sha256>/<name>" -> local path (for messages only)

    def place(self, path: PathField) -> str:
        """``stage_paths``'s callback: an input uploaded, an output pointed into the job's folder."""
        return self.output(path) if path.output else self.upload(path.value)

    def _exists(self, remote: str) -> bool:
        import modal.exception

        try:
            return bool(self.volume.listdir(remote))
        except (FileNotFoundError, modal.exception.NotFoundError):
            return False

    def upload(self, local: str) -> str:
        path = Path(local)
        if not path.exists():
            raise UsageError(f"input not found: {path}")
        with self.uploads.lock:  # concurrent shards of one job: the first uploads, the others reuse its key
            remote = self.uploads.done.get(str(path.resolve())) or self._upload(path)
            self.uploads.done[str(path.resolve())] = remote
        self.local_of[remote] = path
        self.inputs[remote] = path
        return remote

    def _upload(self, path: Path) -> str:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            key = f"inputs/{sha256_tree(path)}/{path.name}"
            if not self._exists(key):
                with self.volume.batch_upload(force=True) as batch:
                    for f in files:
                        batch.put_file(str(f), f"/{key}/{f.relative_to(path).as_posix()}")
        else:
            key = f"inputs/{sha256_file(path)}/{path.name}"
            if not self._exists(key):
                with self.volume.batch_upload(force=True) as batch:
                    batch.put_file(str(path), f"/{key}")
        return VOL + key

    def output(self, path: PathField) -> str:
        # one folder per field (and list index), so two outputs with the same file name cannot meet
        local = Path(path.value)
        slot = path.field if path.index is None else f"{path.field}/{path.index}"
        remote = f"{VOL}outputs/{self.job_id}/{slot}/{local.name}"
        self.local_of[remote] = local
        if path.is_dir:
            self.output_dirs[remote] = local
        return remote

    def local_path(self, remote: str) -> Path | None:
        if remote in self.local_of:
            return self.local_of[remote]
        for prefix, folder in self.output_dirs.items():
            if remote.startswith(prefix + "/"):
                return folder / remote[len(prefix) + 1 :]
        return None

    def fetch(self, event: Artifact, outputs: Outputs) -> Event:
        """``collect_outputs``'s callback: download ``vol:...`` into a temporary sibling of its local place."""
        from synapse_cli.storage.urls import is_url

        if is_url(event.path):  # written to its URL by the container: nothing comes through this client
            return event
        dest = self.local_path(event.path)
        if dest is None:
            raise BackendError(f"the job reported an unexpected output {event.path}")
        written = 0

        def write(tmp: Path) -> None:
            nonlocal written
            with tmp.open("wb") as f:
                for chunk in self.volume.read_file(event.path[len(VOL) :]):
                    written += f.write(chunk)

        outputs.receive(dest, write)
        return Artifact(path=str(dest), bytes=written)

    def names(self) -> StagedNames:
        """What the container calls the staged files (``/data/inputs/<sha256>/clip.mp4``, or its
        ``vol:`` form) -> the user's paths, for the text of its messages. An output's Volume folder
        maps to the output's own folder: the job writes a temporary sibling there first."""
        names: dict[str, str] = {}
        for remote, local in {**self.inputs, **self.local_of}.items():
            key = remote[len(VOL) :]
            names[key] = str(local)
            if key.startswith("outputs/"):
                parent = str(local.parent)
                names[key.rsplit("/", 1)[0] + "/"] = "" if parent == "." else parent.rstrip("/") + "/"
        return StagedNames(names, schemes=(VOL,))

    def localize(self, value: Any) -> Any:
        """Every ``vol:`` path in ``value`` (a result) as the local path it was fetched to."""
        from synapse_cli.jsonwalk import map_strings

        def local(text: str) -> str:
            found = self.local_path(text) if text.startswith(VOL) else None
            return str(found) if found is not None else text

        return map_strings(value, local)
