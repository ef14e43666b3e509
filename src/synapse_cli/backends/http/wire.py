"""What goes over the wire: a spec's uploads and local targets, the multipart parts, and the event lines and JSON bodies that come back."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Generator, Mapping, TypeVar


from synapse_cli.backends._remote import path_fields
from synapse_cli.errors import BackendError, UsageError, one_line
from synapse_cli.events import Event, failed_after_result, from_dict
from synapse_cli.jobs import spec_to_dict
from synapse_cli.protocol import DIR_TAR


_REMOTE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # an endpoint's job id, as it goes into URLs


T = TypeVar("T")


def _prepare(kind: str, spec: Any) -> tuple[dict[str, Any], list[tuple[str, Path]], dict[tuple[str, int | None], str], bool]:
    """The spec as JSON, the files to upload, where each output goes and ``overwrite``; what
    could not be saved afterwards is refused now, before anything is uploaded."""
    data = spec_to_dict(spec)
    paths = path_fields(kind, data)
    uploads = [(p.field, Path(p.value)) for p in paths if not p.output]
    targets = {(p.field, p.index): p.value for p in paths if p.output}
    overwrite = bool(data.get("overwrite", False))
    _check_inputs(uploads)
    _check_targets(targets, overwrite)
    return data, uploads, targets, overwrite


def _check_inputs(uploads: list[tuple[str, Path]]) -> None:
    for _, path in uploads:
        if not path.exists():
            raise UsageError(f"input not found: {path}")


def _part(path: Path, files: ExitStack) -> tuple[str, Any, str]:
    """A multipart file: the file itself, or a directory input as an uncompressed tar of its files."""
    if not path.is_dir():
        return (path.name, files.enter_context(open(path, "rb")), "application/octet-stream")
    import tarfile
    import tempfile

    archive = files.enter_context(tempfile.TemporaryFile())
    with tarfile.open(fileobj=archive, mode="w", dereference=True) as tar:
        for f in sorted(path.rglob("*")):
            if f.is_file():  # folders come with their files; links are followed
                tar.add(f, arcname=f.relative_to(path).as_posix(), recursive=False)
    archive.seek(0)
    return (path.resolve().name or "input", archive, DIR_TAR)


def _check_targets(targets: dict[tuple[str, int | None], str], overwrite: bool) -> None:
    """Refuse before uploading anything what could not be saved afterwards."""
    for value in targets.values():
        path = Path(value)
        if path.is_dir():  # a directory output: files are merged into it
            continue
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists (use --overwrite to replace it)")
        if not path.parent.is_dir():
            raise UsageError(f"output directory {path.parent} does not exist")


def _decode(line: str, url: str) -> Event:
    try:
        return from_dict(json.loads(line))
    except (ValueError, TypeError):
        raise BackendError(f"{url} sent a line that is not a synapse event: {line!r:.120}") from None


def _decode_data(data: dict[str, Any], url: str) -> Event:
    try:
        return from_dict(data)
    except (ValueError, TypeError):
        raise BackendError(f"{url} sent a line that is not a synapse event: {json.dumps(data)!r:.120}") from None


def _json_object(url: str, body: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        raise BackendError(f"{url} answered something that is not a JSON object: {one_line(text, 200)!r:.120}")
    return data


def _accepted(url: str, body: bytes) -> dict[str, Any]:
    """The 202 answer to ``?detach=true``: ``{"id", "status", "links"}``."""
    data = _json_object(url, body)
    if not isinstance(data.get("id"), str) or not _REMOTE_ID.fullmatch(data["id"]):
        raise BackendError(f"{url} accepted the job without a usable id: {json.dumps(data)!r:.120}")
    return data


def _failed_after_finishing(record: Mapping[str, Any]) -> bool:
    """A job record (``GET /v1/jobs/{id}``) of a job that failed after its ``finished``: its outputs wait for download."""
    return failed_after_result(record.get("status"), record.get("result"))


def _returned(steps: Generator[Any, None, T]) -> T:
    """Run a ``retry_until_first_event`` generator where no one renders its retry logs; its value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            value: T = stop.value
            return value
