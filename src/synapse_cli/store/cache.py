"""The result cache: a job identical to one that completed is answered from that one.

- ``cache_key`` identifies a job by kind, input content, normalized params and
  synapse version (never by its outputs or its ``HOST_FIELDS``).
- ``reuse`` replays a completed job's result into new output paths.
- ``follow`` waits on an identical job another process is running, then reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from synapse_cli import __version__
from synapse_cli.errors import SynapseError
from synapse_cli.events import Artifact, Event, Finished, Log, Progress, Started
from synapse_cli.hashing import sha256_path
from synapse_cli.jobs import get_kind, path_values
from synapse_cli.jobs._files import atomic_output
from synapse_cli.jsonwalk import map_strings
from synapse_cli.store.recording import store_events
from synapse_cli.store import Job, JobStore


def cache_key(kind: str, spec: Any, settings: Any = None) -> str | None:
    """sha256 of kind + input contents + params + synapse version; None if an input cannot be read.

    Not part of the key: the outputs, ``overwrite`` and the kind's ``HOST_FIELDS`` (how and where
    it runs, e.g. which ffmpeg binary, not what it computes). An input at a URL is keyed by its
    ETag/version (or Last-Modified + size) and the redacted URL, never by its bytes (``settings``
    say how to reach the store); a job whose outputs are URLs is not cached (its result would be
    reused by copying local files)."""
    from synapse_cli.storage.urls import is_url

    record = get_kind(kind)
    data = asdict(spec)
    if any(is_url(v) for name in record.outputs for _, v in path_values(data.get(name), "output", name)):
        return None
    for name in record.outputs + record.host_fields + ("overwrite",):
        data.pop(name, None)
    try:
        for name in record.inputs + record.installed:  # a model is hashed like an input: same path, new weights, new key
            value = data.get(name)
            if value is None:
                continue
            hashed = [_url_identity(v, settings) if is_url(v) else sha256_path(Path(v)) if Path(v).exists() else v
                      for _, v in path_values(value, "input", name)]  # fmt: skip
            if any(h is None for h in hashed):
                return None
            data[name] = hashed[0] if isinstance(value, str) else hashed
    except (OSError, SynapseError):
        return None
    canonical = json.dumps({"kind": kind, "spec": data, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def uncached_reason(kind: str, spec: Any) -> str | None:
    """Why ``cache_key`` gave no key for a spec with URL fields (one log line for the user), else None."""
    from synapse_cli.storage.urls import is_url

    record, data = get_kind(kind), asdict(spec)
    urls = {side: [v for name in names for _, v in path_values(data.get(name), side, name) if is_url(v)]
            for side, names in (("output", record.outputs), ("input", record.inputs))}  # fmt: skip
    if urls["output"]:
        return "result cache skipped: the job writes to URLs (a reused result would be local files)"
    if urls["input"]:
        return ("result cache skipped: the version of its URL input could not be read from this machine "
                "(no storage credentials here, or the object is gone); the job runs in full")
    return None


def _url_identity(url: str, settings: Any) -> str | None:
    """What identifies the object at ``url`` now: the redacted URL plus its version/ETag (or Last-Modified and size)."""
    if settings is None:
        return None
    from synapse_cli.storage.client import Storage

    return Storage.from_settings(settings).identity(url)


def outputs_of(kind: str, spec: dict[str, Any]) -> dict[str, str]:
    return {name: spec[name] for name in get_kind(kind).outputs if isinstance(spec.get(name), str)}


def reusable(job: Job) -> bool:
    """A completed job whose outputs are all still there."""
    return job.status == "completed" and all(Path(p).exists() for p in outputs_of(job.kind, job.spec).values())


def _copy(src: Path, dest: Path, overwrite: bool) -> None:
    if src.is_dir():
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and target.resolve() == f.resolve():
                continue
            with atomic_output(target, overwrite) as tmp:
                shutil.copyfile(f, tmp)
        return
    with atomic_output(dest, overwrite) as tmp:
        shutil.copyfile(src, tmp)


def reuse(cached: Job, kind: str, spec: Any) -> Iterator[Event]:
    """The events of a job that is answered from ``cached``: its outputs copied to ours, its result rewritten."""
    start = time.monotonic()
    ours = outputs_of(kind, asdict(spec))
    theirs = outputs_of(cached.kind, cached.spec)
    overwrite = bool(getattr(spec, "overwrite", False))
    yield Started(job=kind, total=None)
    yield Log(f"reusing the result of job {cached.id} (same input, params and synapse version; --no-cache runs it again)")
    result = json.loads(json.dumps(cached.result or {}))
    for name, dest in ours.items():
        src = theirs.get(name)
        if not src:
            continue
        if Path(src).resolve() != Path(dest).resolve():
            _copy(Path(src), Path(dest), overwrite)
        result = _replace_strings(result, src, dest)
        if Path(dest).is_file():
            yield Artifact(path=dest, bytes=Path(dest).stat().st_size)
    yield Finished(result={**result, "cached_from": cached.id}, elapsed_s=round(time.monotonic() - start, 3))


def _replace_strings(value: Any, old: str, new: str) -> Any:
    """``value`` with every path ``old`` (or one under it) given as ``new`` instead."""
    under = old.rstrip("/") + "/"
    return map_strings(value, lambda s: new + s[len(old):] if s == old or s.startswith(under) else s)


def follow(store: JobStore, other: Job, kind: str, spec: Any) -> Iterator[Event]:
    """Another process is running the same job: show its progress, then take its result."""
    yield Log(f"job {other.id} is already running the same job: waiting for its result")
    for event in store_events(store, other.id):
        if isinstance(event, Progress):
            yield event
    yield from reuse(store.get(other.id), kind, spec)
