"""One job, many calls: split a spec into shards, run them at once, merge their results.

A kind that can be sharded has two hooks (see ``synapse_cli.jobs``): ``split(spec, n,
workdir)`` returns up to ``n`` shard specs whose outputs are pieces in ``workdir``, and
``merge(spec, shards, results, workdir)`` is a generator that joins the pieces into the
spec's real outputs and ends with the job's ``Finished``.

``run_sharded`` drives any backend: each shard is one ``backend.run(kind, shard)`` in its
own thread (a Modal ``remote_gen`` call, a worker process, a server's job), and the
events of all of them become one stream, as if one job ran:

- one ``Started`` (once every shard has started) whose total is the shards' sum, and
  ``Progress`` whose ``done`` is the sum of each shard's best so far: never backwards,
  even when a shard is retried;
- ``Log`` events tagged with their shard (``"2/8"``); a warning every shard repeats
  (a clamped keyframe) is shown once;
- a transient failure (``BackendError``) retries that shard alone; a job failure cancels
  the others and is raised; closing the stream (Ctrl-C) cancels every shard;
- the merge's ``Artifact`` and ``Finished``, with ``shards: [{index, seconds, attempts}]``
  and the Modal seconds and cost summed over the shards.

A kind may also have a ``beside(spec, workdir)`` hook: work on the whole job that the merge
needs and the shards do not (export's audio). It runs in a thread of this process while the
shards run, so on Modal it costs no wall-clock time and locally it fills the gaps (a worker
starting, the first shard done before the last); its failure fails the job like a shard's.

A detached job on a backend that spawns its shards (Modal) is split when it starts
(``split_detached``) and merged by whoever waits for it (``follow_detached``: ``run_sharded``
over shards that already run).

A backend may split a job where it runs instead (``capabilities.shards == "server"``, or
``url_shards`` for a spec with URL fields): then ``job_events`` hands it the whole job and the
count asked for (``backend.run_sharded``), and that side runs ``sharded_events`` itself (Modal's
``<kind>_sharded`` container, ``backends/modal/inside.py``).

Nothing here imports typer, rich or modal.
"""

from __future__ import annotations

import math
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from synapse_cli.errors import BackendError, SynapseError
from synapse_cli.events import Artifact, Event, Finished, Log, Outcome, Progress, Started

_DONE = object()
_BESIDE = -1  # the index of the beside hook's failure on the events queue


def shard_count(requested: Any, scales_out: bool, size: float | None, per_shard: float, most: int) -> int:
    """How many shards: ``requested`` (an int, or ``"auto"``) for a job of ``size`` units.

    ``auto`` is 1 where calls share one machine (the local backend gains nothing by default)
    and ``ceil(size / per_shard)`` where each call gets a machine of its own (Modal), clamped
    to ``[1, most]``.
    """
    if requested not in (None, "auto"):
        return max(1, int(requested))
    if not scales_out or not size or per_shard <= 0:
        return 1
    return max(1, min(int(most), math.ceil(size / per_shard)))


@dataclass
class _Shard:
    index: int
    spec: Any
    attempts: int = 0
    started_at: float = 0.0
    seconds: float = 0.0
    total: float | None = None
    done: float = 0.0
    result: dict[str, Any] | None = None
    call: Any = None  # the running generator, closed by its own thread


@dataclass
class _Run:
    shards: list[_Shard]
    events: "queue.Queue[tuple[int, Any]]" = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)


def _work(run: _Run, shard: _Shard, start: Callable[[Any], Iterator[Event]], retries: int) -> None:
    """One shard's thread: run it, retrying transient failures, and hand its events to the merger."""
    while True:
        if run.cancel.is_set():  # cancelled before this shard (or its retry) began: start nothing
            return
        shard.attempts += 1
        gen = start(shard.spec)
        shard.call = gen
        outcome = Outcome()
        try:
            for event in gen:
                if run.cancel.is_set():
                    return
                outcome.see(event)
                run.events.put((shard.index, event))
            run.events.put((shard.index, _DONE))
            return
        except SynapseError as exc:
            if outcome.finished is not None and not isinstance(exc, BackendError):
                # the shard finished, then reported failed inputs (compile does): the merge sees them in the results
                run.events.put((shard.index, _DONE))
                return
            if not isinstance(exc, BackendError) or shard.attempts > retries or run.cancel.is_set():
                run.events.put((shard.index, exc))
                return
            run.events.put((shard.index, Log(f"shard {shard.index + 1}/{len(run.shards)} failed ({exc}); retrying it", "warning")))
        except BaseException as exc:  # noqa: BLE001 - handed to the merging thread, which raises it
            run.events.put((shard.index, exc))
            return
        finally:
            gen.close()  # type: ignore[attr-defined]  # (a job's generator) a cancelled shard stops here: its ffmpeg is killed, its Modal call cancelled


def _beside(run: _Run, work: Iterator[Event], failed: list[BaseException]) -> None:
    """The beside hook's thread: run it to its end (its events are its own), unless the job is cancelled."""
    try:
        for _event in work:
            if run.cancel.is_set():
                return
    except BaseException as exc:  # noqa: BLE001 - raised by the merging thread, now or before the merge
        failed.append(exc)
        run.events.put((_BESIDE, exc))
    finally:
        work.close()  # type: ignore[attr-defined]  # (a job's generator) a cancelled job stops here: its ffmpeg is killed


def run_sharded(
    kind: str,
    spec: Any,
    count: int,
    start: Callable[[Any], Iterator[Event]],
    split: Callable[[Any, int, Path, Any], list[Any]],
    merge: Callable[[Any, list[Any], list[dict[str, Any]], Path], Iterator[Event]],
    retries: int = 0,
    workdir: Path | None = None,
    settings: Any = None,
    beside: Callable[[Any, Path], Iterator[Event]] | None = None,
) -> Iterator[Event]:
    """Run ``spec`` as ``count`` shards through ``start`` (``backend.run`` for this kind) and merge them.

    ``beside(spec, workdir)``, if given, runs in a thread of its own meanwhile; the merge starts
    once both it and the shards are done.
    """
    began = time.monotonic()
    parent = workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".synapse-shards-", dir=parent))
    threads: list[threading.Thread] = []
    run: _Run | None = None
    try:
        parts = split(spec, count, work, settings)
        if len(parts) <= 1:  # too small to split (or the kind says so): one ordinary call
            yield from start(parts[0] if parts else spec)
            return
        n = len(parts)
        run = _Run([_Shard(i, part) for i, part in enumerate(parts)])
        for shard in run.shards:
            shard.started_at = time.monotonic()
            thread = threading.Thread(target=_work, args=(run, shard, start, retries), name=f"synapse-shard-{shard.index}", daemon=True)
            thread.start()
            threads.append(thread)
        failed: list[BaseException] = []
        if beside is not None:
            aside = threading.Thread(target=_beside, args=(run, beside(spec, work), failed), name="synapse-beside", daemon=True)
            aside.start()
            threads.append(aside)
        yield from _merged_events(kind, run, n)
        for thread in threads[n:]:
            while thread.is_alive():
                thread.join(timeout=0.2)  # short waits: Ctrl-C still reaches this thread
        if failed:
            raise failed[0]
        yield Log(f"merging {n} shard{'s' if n != 1 else ''}")
        results = [s.result or {} for s in run.shards]
        for event in merge(spec, parts, results, work):
            if isinstance(event, Finished):
                # the job's time, split to merge, not the merge's own
                event = Finished(result=_with_shards(event.result, run.shards), elapsed_s=round(time.monotonic() - began, 3))
            elif isinstance(event, Progress):
                continue  # the bar stays full while the pieces are joined
            yield event
    finally:
        if run is not None:
            run.cancel.set()
            for shard in run.shards:
                stop = getattr(shard.call, "terminate", None)  # a worker process stops now, not at its next event
                if stop is not None:
                    stop()
        for thread in threads:
            thread.join(timeout=60)  # each closes its shard: worker processes waited for, Modal calls cancelled
        shutil.rmtree(work, ignore_errors=True)


def _merged_events(kind: str, run: _Run, n: int) -> Iterator[Event]:
    """The shards' events as one job's: until every shard has finished (or one has failed)."""
    pending: list[Event] = []  # what comes before everyone has started
    seen_warnings: set[str] = set()
    started = finished = 0
    announced = False
    last_done = -1.0
    while finished < n:
        index, item = run.events.get()
        if isinstance(item, BaseException):
            raise item
        shard = run.shards[index]
        tag = f"{index + 1}/{n}"
        out: list[Event] = []
        if item is _DONE:
            if shard.result is None:
                raise SynapseError(f"shard {tag} ended without a result")
            finished += 1
            shard.seconds = time.monotonic() - shard.started_at
            out.append(Log(f"shard {tag} finished in {shard.seconds:.1f} s", shard=tag))
        elif isinstance(item, Started):
            if shard.total is None:
                started += 1
                out.append(Log(f"shard {tag} started", shard=tag))
            shard.total = item.total or 0.0
        elif isinstance(item, Progress):
            shard.done = max(shard.done, float(item.done))  # a retried shard starts again from 0: keep its best
        elif isinstance(item, Log):
            if item.level == "warning" and item.message in seen_warnings:
                continue
            seen_warnings.add(item.message)
            out.append(replace(item, shard=tag))
        elif isinstance(item, Finished):
            shard.result = dict(item.result)
            shard.done = max(shard.done, shard.total or 0.0)
        elif isinstance(item, Artifact):
            continue  # a piece, not an output: the merge reports the real one
        if started < n:
            pending.extend(out)
            continue
        if not announced:
            announced = True
            yield Started(job=kind, total=sum(s.total or 0.0 for s in run.shards) or None)
            yield from pending
        yield from out
        done = sum(s.done for s in run.shards)
        if done > last_done:
            last_done = done
            yield Progress(done=done, total=sum(s.total or 0.0 for s in run.shards) or None, phase="encode" if kind == "export" else None)


def _with_shards(result: dict[str, Any], shards: list[_Shard]) -> dict[str, Any]:
    out = dict(result)
    out["shards"] = [{"index": s.index, "seconds": round(s.seconds, 3), "attempts": s.attempts} for s in shards]
    modal: list[dict[str, Any]] = [s.result["modal"] for s in shards if s.result and isinstance(s.result.get("modal"), dict)]
    if modal:
        costs: list[float | None] = [m.get("estimated_cost_usd") for m in modal]
        out["modal"] = {
            "gpu": modal[0].get("gpu"),
            "seconds": round(sum(float(m.get("seconds") or 0.0) for m in modal), 3),
            "estimated_cost_usd": None if any(c is None for c in costs) else round(sum(c or 0.0 for c in costs), 6),
            "calls": len(modal),
        }
    return out


# -- the entry point: a job's events on a backend, sharded or not -----------------------------------


def job_events(kind: str, spec: Any, backend: Any, settings: Any) -> Iterator[Event]:
    """The job's events on ``backend``: one call, or ``[shards] count`` shards merged into one stream.

    The kind's record says whether and how it shards (``split``/``merge``/``size``); the
    backend's ``capabilities.shards`` says how shards run (``run_shard``: a worker process, a Modal
    call; or the server's own ``run_sharded``). On a backend whose jobs run in this process
    (``capabilities.stages_urls``), the spec's URLs are staged here, around the whole job: every
    shard reads the same presigned URL, the merge writes a temp file, and that is uploaded once
    the job succeeded (``synapse_cli.storage.staging``).
    """
    if backend.capabilities.stages_urls:
        from synapse_cli.storage.urls import has_urls

        if has_urls(kind, spec):
            from synapse_cli.storage.client import Storage
            from synapse_cli.storage.staging import staged

            return staged(kind, spec, Storage.from_settings(settings), lambda local: _job_events(kind, local, backend, settings))
    return _job_events(kind, spec, backend, settings)


def _job_events(kind: str, spec: Any, backend: Any, settings: Any) -> Iterator[Event]:
    from synapse_cli.jobs import get_kind

    requested = settings["shards.count"]
    if get_kind(kind).shardable and _sharding(kind, spec, backend) == "server" and requested != 1:
        return backend.run_sharded(kind, spec, requested)  # split where the job runs (auto: by its own measure)
    return sharded_events(kind, spec, backend, settings)


def sharded_events(kind: str, spec: Any, backend: Any, settings: Any, workdir: Path | None = None) -> Iterator[Event]:
    """The job as ``[shards] count`` shards through ``backend.run_shard``, merged here (or one ``run``).

    ``workdir``: where the pieces go (default: beside the first output, so that they share its filesystem).
    """
    from synapse_cli.errors import UsageError
    from synapse_cli.jobs import get_kind

    record = get_kind(kind)
    count = _count(kind, spec, backend, settings)
    if count <= 1:
        return backend.run(kind, spec)
    if _sharding(kind, spec, backend) not in ("local", "remote"):
        raise UsageError(f"--shards is not supported with the {backend.name} backend")
    return run_sharded(
        kind, spec, count, lambda part: backend.run_shard(kind, part), record.hook("split"), record.hook("merge"),
        retries=backend.capabilities.shard_retries, workdir=workdir or _workdir(kind, spec), settings=settings,
        beside=_beside_hook(record),
    )  # fmt: skip


def _sharding(kind: str, spec: Any, backend: Any) -> str:
    """How ``backend`` shards this spec: its ``url_shards`` for a spec with URL fields, else its ``shards``."""
    can = backend.capabilities
    if can.url_shards is not None:
        from synapse_cli.storage.urls import has_urls

        if has_urls(kind, spec):
            return str(can.url_shards)
    return str(can.shards)


def _beside_hook(record: Any) -> Callable[[Any, Path], Iterator[Event]] | None:
    return record.hook("beside") if record.beside else None


def _count(kind: str, spec: Any, backend: Any, settings: Any) -> int:
    """How many shards ``spec`` runs as on ``backend`` (``[shards]`` settings; 1 for a kind that does not shard)."""
    from synapse_cli.errors import UsageError
    from synapse_cli.jobs import get_kind

    record = get_kind(kind)
    requested = settings["shards.count"]
    if not record.shardable:
        if requested not in ("auto", 1):
            raise UsageError(f"--shards: {kind} jobs do not shard")
        return 1
    scales_out = backend.capabilities.scales_out
    size = record.hook("size")(spec) if requested == "auto" and scales_out else None
    return shard_count(requested, scales_out, size, float(settings[f"shards.{record.shard_by}"]), int(settings["shards.max"]))


def _workdir(kind: str, spec: Any) -> Path | None:
    """Where a sharded job's pieces go: beside its first output (one filesystem: the merge renames), else a temp folder."""
    from synapse_cli.jobs import get_kind

    outputs = [getattr(spec, name) for name in get_kind(kind).outputs if isinstance(getattr(spec, name, None), str)]
    return Path(outputs[0]).resolve().parent if outputs else None


# -- detached: the shards start now, their pieces are fetched and merged by ``jobs wait`` ----------------


def split_detached(kind: str, spec: Any, backend: Any, settings: Any) -> tuple[list[Any], Path]:
    """The shard specs of a detached job (one spec: it runs whole) and the folder named in their outputs.

    That folder is gone when this returns (splitting writes nothing in it); ``follow_detached``
    puts the pieces in a fresh one of its own when ``jobs wait`` fetches them.
    """
    from synapse_cli.jobs import get_kind

    count = _count(kind, spec, backend, settings)
    parent = _workdir(kind, spec) or Path(tempfile.gettempdir())
    if count <= 1:
        return [spec], parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".synapse-shards-", dir=parent))
    try:
        parts = list(get_kind(kind).hook("split")(spec, count, work, settings))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return (parts, work) if len(parts) > 1 else ([spec], parent)  # too small to split: one call


def follow_detached(
    kind: str, spec: Any, parts: list[Any], split_in: Path, start: Callable[[int, Any], Iterator[Event]], retries: int = 0
) -> Iterator[Event]:
    """A detached job's shards as one stream, then the kind's merge: ``run_sharded``, with shards that already run.

    ``parts`` are the shard specs ``split_detached`` made in ``split_in``; each is moved into this
    run's own folder, and ``start(index, part)`` follows shard ``index`` (its piece fetched to the
    part's outputs; a ``BackendError`` follows it again, up to ``retries`` times). A shard's
    failure, or closing this stream, stops following the others (``terminate()``): cancelling
    their calls is the backend's part.
    """
    from dataclasses import asdict

    from synapse_cli.backends._remote import stage_paths
    from synapse_cli.jobs import get_kind, spec_from_dict

    index: dict[int, int] = {}

    def moved(_spec: Any, _n: int, work: Path, _settings: Any) -> list[Any]:
        def place(path: Any) -> str:
            value = Path(path.value)
            return str(work / value.relative_to(split_in)) if path.output and value.is_relative_to(split_in) else path.value

        out = [spec_from_dict(kind, stage_paths(kind, asdict(part), place)) for part in parts]
        index.update({id(part): i for i, part in enumerate(out)})
        return out

    return run_sharded(
        kind, spec, len(parts), lambda part: start(index[id(part)], part), moved, get_kind(kind).hook("merge"),
        retries=retries, workdir=split_in.parent, beside=_beside_hook(get_kind(kind)),
    )  # fmt: skip
