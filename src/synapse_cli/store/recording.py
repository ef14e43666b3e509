"""Runs in the job store: recording a run's event stream, and re-attaching to a stored run.

- ``record`` passes events through while storing them in the job store and
  setting the job's final state from how the stream ends. Recording is
  best-effort: a store that fails (locked, disk full) costs a warning, never the job.
- ``store_events`` turns a stored job back into a live event stream (``jobs wait``).
- ``step_summary`` appends a finished run to the GitHub Actions step summary.

Reusing the result of an identical run is ``synapse_cli.store.cache``.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from synapse_cli.errors import Interrupted, SynapseError, error_from_wire
from synapse_cli.events import Event, Failed, Finished, Log, Progress, failed, from_dict, to_dict
from synapse_cli.store import ACTIVE, HEARTBEAT_S, Job, JobStore

RECORD_BUSY_S = 5.0  # while a job runs, a write waits this long for the store's lock, then the job goes on without it
RETRY_AFTER_S = 10.0  # after a failed write, buffer events this long before trying the store again
# what a store can fail with: sqlite's errors, the OS's (disk full, permissions), ours (JobStore cannot open it)
STORE_ERRORS = (sqlite3.Error, OSError, SynapseError)

def store_events(store: JobStore, job_id: str, poll_s: float = 0.2, after: int = 0, with_errors: bool = True) -> Iterator[Event]:
    """A stored job as a live stream: its events so far, then new ones as its worker writes them.

    Ends with the job: ``finished`` ends the stream, a failure raises its error (so ``jobs wait``
    exits with the job's exit code), and so does an error that follows ``finished`` (compile
    reports the inputs that failed after its result; ``record`` writes both with the final state).
    """
    finished = False
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
            finished = finished or isinstance(event, Finished)
        if finished and batch:
            continue  # whatever landed with it (an error) is read before the stream ends
        if not batch:
            job = store.get(job_id)
            if job.status not in ACTIVE:
                if store.events(job_id, after):
                    continue  # the last events landed with the final state
                if finished:
                    return
                if job.status == "completed":
                    yield Finished(result=job.result or {}, elapsed_s=round(job.wall_s or 0, 3))
                    return
                if with_errors:
                    raise error_from_wire(None, job.exit_code or 1, job.error_message or f"job {job.status}")
                return
            time.sleep(poll_s)


class _Heartbeat:
    """Says "still alive" every few seconds, so a silent long step is not taken for a dead worker.

    A failing beat (locked store, disk I/O error) is skipped, never fatal: the connection is
    reopened on the next beat, and beating goes on until the job ends."""

    def __init__(self, db_path: Path, job_id: str, busy_s: float = RECORD_BUSY_S, every_s: float = HEARTBEAT_S) -> None:
        self._stop = threading.Event()
        self.beats = 0  # successful ones
        self.errors = 0
        self._thread = threading.Thread(target=self._run, args=(db_path, job_id, busy_s, every_s), daemon=True)
        self._thread.start()

    def _run(self, db_path: Path, job_id: str, busy_s: float, every_s: float) -> None:
        store: JobStore | None = None  # its own connection: sqlite connections are not shared across threads
        while not self._stop.wait(every_s):
            try:
                if store is None:
                    store = JobStore(db_path, busy_timeout_s=busy_s)
                store.heartbeat(job_id)
                self.beats += 1
            except STORE_ERRORS:
                self.errors += 1
                _close(store)
                store = None
        _close(store)

    def stop(self) -> None:
        self._stop.set()


def _close(store: JobStore | None) -> None:
    try:
        if store is not None:
            store.close()
    except sqlite3.Error:
        pass


def record(store: JobStore, job: Job, events: Iterator[Event] | Callable[[], Iterator[Event]], flush_s: float = 0.5,
           on_end: Callable[[Job], None] | None = None, busy_s: float = RECORD_BUSY_S) -> Iterator[Event]:
    """Pass ``events`` through, writing them to the store (batched) and the job's final state.

    ``events`` may be a function that starts the run and returns its events: whatever it raises
    (a bad input found before the job starts, a refused option) ends the job ``failed`` with that
    error's code and message, like an error raised by the events themselves. Give the function
    whenever starting can fail: a row left ``processing`` by a live process is waited on by every
    identical job of that process (the result cache follows it).

    Best-effort: a write that fails (the store locked past ``busy_s``, a full disk) becomes one
    warning ``Log`` event (or stderr line, once no event can follow); its events stay buffered for
    a later write, and the job runs to its end either way: its output never depends on the store."""
    buffer: list[dict[str, Any]] = []
    progress: dict[str, Any] | None = None
    last_flush = time.monotonic()
    retry_at = 0.0  # after a failed write the store is left alone until then
    warned = False
    warnings: list[Log] = []
    unwritten: Callable[[], None] | None = None  # the final state, when the store refused it
    ended: dict[str, Any] = {}  # the finished event's result (and its Modal gpu and cost), once it came

    def attempt(what: str, write: Callable[[], None], force: bool = False) -> bool:
        nonlocal retry_at, warned
        if not force and time.monotonic() < retry_at:
            return False
        try:
            write()
            return True
        except STORE_ERRORS as exc:
            retry_at = time.monotonic() + RETRY_AFTER_S
            if not warned:
                warned = True
                warnings.append(Log(f"job store {store.path}: could not record {what} ({exc}); the job goes on, "
                                    "but synapse jobs may show it incomplete", level="warning"))
            return False

    def write_events() -> None:
        nonlocal buffer, progress
        if buffer or progress:
            store.append_events(job.id, buffer, progress)
        buffer, progress = [], None

    def flush() -> None:
        nonlocal last_flush
        attempt("its progress", write_events)
        last_flush = time.monotonic()

    def finish(status: str, **kwargs: Any) -> None:
        """The final state, then what is left of the events: tried even while backing off (it is the last chance)."""
        def write() -> None:
            store.finish(job.id, status, **kwargs)
            write_events()

        nonlocal unwritten
        unwritten = None
        if not attempt(f"its end ({status})", write, force=True):
            unwritten = write  # tried once more when the stream ends
            if job.status in ACTIVE:
                job.status, job.finished_at = status, time.time()  # what on_end gets when the store cannot say
                job.result, job.error_code, job.error_message = kwargs.get("result"), kwargs.get("error_code"), kwargs.get("error_message")

    def last_chance() -> None:
        if unwritten is not None:
            attempt("its end", unwritten, force=True)

    def warn_stderr() -> None:  # no event can follow: the warning goes to stderr itself
        for w in warnings:
            print(f"Warning: {w.message}", file=sys.stderr, flush=True)
        warnings.clear()

    def end(exc: BaseException) -> None:
        ev = failed(exc)
        buffer.append(to_dict(ev))
        kept = {"result": ended["result"]} if ended else {}  # a failure after the result (compile's failed inputs) keeps it
        finish("cancelled" if ev.code == 130 else "failed", error_code=ev.code, error_message=ev.message, **kept)
        warn_stderr()

    attempt("its start", lambda: store.set_busy_timeout(busy_s), force=True)
    heartbeat = _Heartbeat(store.path, job.id, busy_s)
    try:
        if callable(events):
            events = events()
        for event in events:
            buffer.append(to_dict(event))
            if isinstance(event, Progress):
                progress = {"done": event.done, "total": event.total, "phase": event.phase}
            if isinstance(event, Finished):
                # written with the final state when the stream ends (an error may follow it: compile's failed
                # inputs), the state first: whoever reads the finished event reads a job that has ended
                modal_info = event.result.get("modal") or {}
                ended.update(result=event.result, gpu=modal_info.get("gpu"), cost_usd=modal_info.get("estimated_cost_usd"))
            elif not ended and (not isinstance(event, Progress) or time.monotonic() - last_flush >= flush_s):
                flush()
            yield from warnings
            warnings.clear()
            yield event
        if ended:
            finish("completed", **ended)
        else:
            flush()
            finish("failed", error_code=1, error_message="the job ended without a result")
        last_chance()
        warn_stderr()
    except GeneratorExit:
        if ended:  # the reader stopped at the result: the job did finish
            finish("completed", **ended)
        else:
            end(Interrupted("interrupted"))
        last_chance()
        warn_stderr()
        raise
    except (KeyboardInterrupt, Exception) as exc:
        end(exc)
        raise
    finally:
        heartbeat.stop()
        if on_end is not None:
            final = job
            try:
                final = store.get(job.id)
                if final.status in ACTIVE and job.status not in ACTIVE:  # our final write was lost
                    final = job
            except STORE_ERRORS:
                pass
            on_end(final)
        try:
            store.set_busy_timeout(store.busy_timeout_s)
        except STORE_ERRORS:
            pass


class DeliveryLog:
    """``on_delivery`` for ``notify.Notifier``: each webhook's outcome into the job store, for ``synapse jobs show``.

    Called from the notifier's thread, so it opens its own connection there (a connection is not
    shared across threads mid-transaction). Best-effort, like all recording: a store that fails
    costs the row, never the job."""

    def __init__(self, db_path: Path, job_id: str, target: str, busy_s: float = RECORD_BUSY_S) -> None:
        from synapse_cli.netguard import redact

        self.db_path, self.job_id, self.target, self.busy_s = db_path, job_id, redact(target), busy_s
        self._store: JobStore | None = None

    def __call__(self, delivery: Any) -> None:
        try:
            if self._store is None:
                self._store = JobStore(self.db_path, busy_timeout_s=self.busy_s)
            self._store.add_delivery(self.job_id, delivery.to_dict(), self.target)
        except STORE_ERRORS:
            _close(self._store)
            self._store = None

    def close(self) -> None:
        _close(self._store)
        self._store = None


def with_webhooks(events: Iterator[Event], target: Any, job_id: str, kind: str, db_path: Path | None,
                  client: Any = None, warn: Callable[[str], None] | None = None) -> Iterator[Event]:
    """``events`` with the job's webhooks sent on the way (``notify.notify_events``), each delivery's
    outcome kept in the job store at ``db_path``; just ``events`` when ``target`` is None.

    ``warn``: where a terminal delivery that failed is said (by default one stderr line)."""
    if target is None:
        return events
    from synapse_cli.notify import notify_events

    def stderr(message: str) -> None:
        print(f"Warning: {message}", file=sys.stderr, flush=True)

    def run() -> Iterator[Event]:
        deliveries = DeliveryLog(db_path, job_id, target.url) if db_path is not None else None
        try:
            yield from notify_events(events, target, job_id, kind, client=client, on_delivery=deliveries, warn=warn or stderr)
        finally:
            if deliveries is not None:
                deliveries.close()

    return run()


def step_summary(job: Job, env: dict[str, str] | None = None) -> None:
    """In GitHub Actions, append a short Markdown summary of the job to the step summary."""
    path = (os.environ if env is None else env).get("GITHUB_STEP_SUMMARY")
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
