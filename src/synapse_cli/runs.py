"""Runs in the job store: recording a run's event stream, and re-attaching to a stored run.

- ``record`` passes events through while storing them in the job store and
  setting the job's final state from how the stream ends.
- ``store_events`` turns a stored job back into a live event stream (``jobs wait``).
- ``step_summary`` appends a finished run to the GitHub Actions step summary.

Reusing the result of an identical run is ``synapse_cli.result_cache``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from synapse_cli.errors import Interrupted, error_from_wire
from synapse_cli.events import Event, Failed, Finished, Progress, failed, from_dict, to_dict
from synapse_cli.store import ACTIVE, HEARTBEAT_S, Job, JobStore

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
    output = result.get("output") or result.get("output_dir") or ", ".join(_outputs(job)) or "-"
    wall = f"{job.wall_s:.1f} s" if job.wall_s is not None else "-"
    cost = f" (est. ${job.cost_usd:.4f})" if job.cost_usd else ""
    mark = _STATUS_MARKS.get(job.status, "")
    line = f"| {mark} | {job.kind} | {job.backend} | {job.status} | {wall}{cost} | `{output}` |\n"
    new = not Path(path).exists() or Path(path).stat().st_size == 0
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("### synapse\n\n| | job | backend | status | time | output |\n|---|---|---|---|---|---|\n")
        f.write(line)


_STATUS_MARKS = {"completed": "\u2705", "failed": "\u274c", "cancelled": "\u23f9\ufe0f"}  # the step summary's status column


def _outputs(job: Job) -> list[str]:
    from synapse_cli.jobs import JOBS, path_values

    kind = JOBS.get(job.kind)
    if kind is None:
        return []
    return [v for name in kind.outputs for _, v in path_values(job.spec.get(name), "output", name)]
