"""What happens around every job's event stream: recording it, reusing results, following other runs.

- ``record`` passes events through while storing them in the job store and
  setting the job's final state from how the stream ends.
- ``cache_key`` identifies a job by kind, input content, normalized params and
  synapse version; ``reuse`` replays a completed job's result into new output
  paths; ``follow`` waits on a job another process is running.
- ``store_events`` turns a stored job back into a live event stream (``jobs wait``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

from synapse_cli import __version__
from synapse_cli.errors import Interrupted, error_from_wire
from synapse_cli.events import Artifact, Event, Failed, Finished, Log, Progress, Started, failed, from_dict, to_dict
from synapse_cli.hashing import sha256_path
from synapse_cli.jobs._files import atomic_output
from synapse_cli.remote import installed_fields, path_fields
from synapse_cli.store import ACTIVE, HEARTBEAT_S, Job, JobStore

_NOT_PARAMS = ("overwrite", "ffmpeg")  # how and where, not what: they don't change the result


def cache_key(kind: str, spec: Any) -> str | None:
    """sha256 of kind + input contents + params + synapse version; None if an input cannot be read."""
    data = asdict(spec)
    inputs, outputs = path_fields(kind)
    for name in outputs + _NOT_PARAMS:
        data.pop(name, None)
    try:
        for name in inputs + installed_fields(kind):  # a model is hashed like an input: same path, new weights, new key
            value = data.get(name)
            if isinstance(value, str):
                data[name] = sha256_path(Path(value)) if Path(value).exists() else value
            elif isinstance(value, list):
                data[name] = [sha256_path(Path(v)) if Path(v).exists() else v for v in value]
    except OSError:
        return None
    canonical = json.dumps({"kind": kind, "spec": data, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def outputs_of(kind: str, spec: dict[str, Any]) -> dict[str, str]:
    _, outputs = path_fields(kind)
    return {name: spec[name] for name in outputs if isinstance(spec.get(name), str)}


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
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old.rstrip("/") + "/") else value
    if isinstance(value, list):
        return [_replace_strings(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace_strings(v, old, new) for k, v in value.items()}
    return value


def store_events(store: JobStore, job_id: str, poll_s: float = 0.2, after: int = 0, with_errors: bool = True) -> Iterator[Event]:
    """A stored job as a live stream: its events so far, then new ones as its worker writes them.

    Ends with the job: ``finished`` ends the stream, a failure raises its error (so ``jobs wait``
    exits with the job's exit code).
    """
    while True:
        batch = store.events(job_id, after)
        for seq, data in batch:
            after = seq
            event = from_dict(data)
            if isinstance(event, Failed):
                if with_errors:
                    raise error_from_wire(event.error, event.code, event.message)
                return
            yield event
            if isinstance(event, Finished):
                return
        if not batch:
            job = store.get(job_id)
            if job.status not in ACTIVE:
                if store.events(job_id, after):
                    continue  # the last events landed with the final state
                if job.status == "completed":
                    yield Finished(result=job.result or {}, elapsed_s=round(job.wall_s or 0, 3))
                    return
                if with_errors:
                    raise error_from_wire(None, job.exit_code or 1, job.error_message or f"job {job.status}")
                return
            time.sleep(poll_s)


def follow(store: JobStore, other: Job, kind: str, spec: Any) -> Iterator[Event]:
    """Another process is running the same job: show its progress, then take its result."""
    yield Log(f"job {other.id} is already running the same job: waiting for its result")
    for event in store_events(store, other.id):
        if isinstance(event, Progress):
            yield event
    yield from reuse(store.get(other.id), kind, spec)


class _Heartbeat:
    """Says "still alive" every few seconds, so a silent long step is not taken for a dead worker."""

    def __init__(self, db_path: Path, job_id: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(db_path, job_id), daemon=True)
        self._thread.start()

    def _run(self, db_path: Path, job_id: str) -> None:
        store = JobStore(db_path)  # its own connection: sqlite connections are not shared across threads
        try:
            while not self._stop.wait(HEARTBEAT_S):
                store.heartbeat(job_id)
        finally:
            store.close()

    def stop(self) -> None:
        self._stop.set()


def record(store: JobStore, job: Job, events: Iterator[Event], flush_s: float = 0.5,
           on_end: Callable[[Job], None] | None = None) -> Iterator[Event]:
    """Pass ``events`` through, writing them to the store (batched) and the job's final state."""
    buffer: list[dict[str, Any]] = []
    progress: dict[str, Any] | None = None
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal buffer, progress, last_flush
        if buffer or progress:
            store.append_events(job.id, buffer, progress)
        buffer, progress, last_flush = [], None, time.monotonic()

    def end(exc: BaseException) -> None:
        ev = failed(exc)
        buffer.append(to_dict(ev))
        flush()
        status = "cancelled" if ev.code == 130 else "failed"
        store.finish(job.id, status, error_code=ev.code, error_message=ev.message)

    heartbeat = _Heartbeat(store.path, job.id)
    completed = False
    try:
        for event in events:
            buffer.append(to_dict(event))
            if isinstance(event, Progress):
                progress = {"done": event.done, "total": event.total, "phase": event.phase}
            if isinstance(event, Finished):  # the state first: whoever sees the finished event sees a completed job
                modal_info = event.result.get("modal") or {}
                store.finish(job.id, "completed", result=event.result, gpu=modal_info.get("gpu"), cost_usd=modal_info.get("estimated_cost_usd"))
                completed = True
            if not isinstance(event, Progress) or time.monotonic() - last_flush >= flush_s:
                flush()
            yield event
        flush()
        store.finish(job.id, "failed", error_code=1, error_message="the job ended without a result")  # no-op after "completed"
    except GeneratorExit:
        if not completed:
            end(Interrupted("interrupted"))
        raise
    except (KeyboardInterrupt, Exception) as exc:
        end(exc)
        raise
    finally:
        heartbeat.stop()
        if on_end is not None:
            on_end(store.get(job.id))


def step_summary(job: Job, env: dict[str, str] | None = None) -> None:
    """In GitHub Actions, append a short Markdown summary of the job to the step summary."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    path = env.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    result = job.result or {}
    output = result.get("output") or result.get("output_dir") or ", ".join(outputs_of(job.kind, job.spec).values()) or "-"
    wall = f"{job.wall_s:.1f} s" if job.wall_s is not None else "-"
    cost = f" (est. ${job.cost_usd:.4f})" if job.cost_usd else ""
    line = f"| {job.kind} | {job.backend} | {job.status} | {wall}{cost} | `{output}` |\n"
    new = not Path(path).exists() or Path(path).stat().st_size == 0
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("### synapse\n\n| job | backend | status | time | output |\n|---|---|---|---|---|\n")
        f.write(line)
