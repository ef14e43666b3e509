"""Runs in the job store: recording a run's event stream, and re-attaching to a stored run.

- ``Recorder``: one job's events, progress, final state and webhook deliveries into the job
  store, the one recorder every path uses (a local run, the HTTP client's copy of an endpoint
  job, the server's detached jobs). Recording is best-effort: a store that fails (locked, disk
  full) costs a warning, never the job.
- ``record`` passes a run's events through a ``Recorder``.
- ``store_events`` turns a stored job back into a live event stream (``jobs wait``).
- ``step_summary`` appends a finished run to the GitHub Actions step summary.

Reusing the result of an identical run is ``synapse_cli.store.cache``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from synapse_cli.errors import Interrupted, SynapseError, error_from_wire
from synapse_cli.events import Deliveries, Event, Failed, Finished, Log, Outcome, Progress, Started, failed, from_dict, to_dict
from synapse_cli.store import ACTIVE, HEARTBEAT_S, Job, JobStore

RECORD_BUSY_S = 5.0  # while a job runs, a write waits this long for the store's lock, then the job goes on without it
RETRY_AFTER_S = 10.0  # after a failed write, buffer events this long before trying the store again
# what a store can fail with: sqlite's errors, the OS's (disk full, permissions), ours (JobStore cannot open it)
STORE_ERRORS = (sqlite3.Error, OSError, SynapseError)

def store_events(store: JobStore, job_id: str, poll_s: float = 0.2, after: int = 0, with_errors: bool = True) -> Iterator[Event]:
    """A stored job as a live stream: its events so far, then new ones as its worker writes them.

    Ends with the job (``events.Outcome``): ``finished`` ends the stream, a failure raises its error
    (so ``jobs wait`` exits with the job's exit code), and so does an error that follows ``finished``
    (a Recorder writes both with the final state).
    """
    outcome = Outcome()
    while True:
        batch = store.events(job_id, after)
        for seq, data in batch:
            after = seq
            event = from_dict(data)
            outcome.see(event)
            if outcome.failure is not None:
                if with_errors:
                    raise error_from_wire(outcome.failure.error, outcome.failure.code, outcome.failure.message)
                return
            yield event
        finished = outcome.finished is not None
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


class Recorder:
    """One job's events into the job store: what every path that records a job uses (a local run's
    ``record``, the HTTP client's copy of an endpoint job, the server's detached jobs).

    - ``event(e)`` buffers an event. Progress is coalesced into the row's progress (done, total,
      phase; ``started``'s total counts as 0 of it) and written at most every ``flush_s``; other
      events at once, or every ``batch_s`` (a caller that batches must ``flush`` later: ``event``
      returns True then). Events after ``finished`` are held and written with the final state.
    - The final state follows from how the stream ends (``events.Outcome``): an ``error`` ends it at
      once (``failed``, ``cancelled`` for code 130, the result kept if ``finished`` came first);
      ``end()`` when the stream is over (``completed`` after ``finished``). The state is written
      first, then the last events, in one step under ``lock``: whoever reads the last event reads a
      job that has ended.
    - ``deliveries(list)``: what became of the job's webhooks (``notify.Delivery.to_dict()``).
    - ``written``: event rows another process may have written already (the HTTP client's copy of
      a server's job: its event i is row i + 1); rows already there are not written twice.

    Best-effort: a write that fails (the store locked, a full disk) is said once through ``warn``
    (else kept in ``warnings``), its events stay buffered, and the store is left alone for
    ``RETRY_AFTER_S``; the final state is tried whatever the back-off, and once more by
    ``retry_end``. Never raises a store's error."""

    def __init__(self, store: JobStore, job_id: str, flush_s: float = 0.5, batch_s: float = 0.0, lock: Any = None,
                 on_write: Callable[[list[dict[str, Any]]], None] | None = None, warn: Callable[[str], None] | None = None,
                 written: int | None = None) -> None:
        self.store, self.job_id, self.flush_s, self.batch_s = store, job_id, flush_s, batch_s
        self.outcome = Outcome()
        self.warnings: list[str] = []
        self.final: tuple[str, dict[str, Any]] | None = None  # the final state, once the stream decided it
        self.final_written = False
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._on_write, self._warn, self._written = on_write, warn, written
        self._buffer: list[dict[str, Any]] = []
        self._progress: dict[str, Any] | None = None
        self._last_flush = time.monotonic()
        self._retry_at = 0.0  # after a failed write the store is left alone until then
        self._warned = False
        self._delivered = 0  # deliveries recorded by ``deliveries(..., known=...)``

    def start(self, busy_s: float) -> None:
        """While the job runs, a write waits at most ``busy_s`` for the store's lock (``RECORD_BUSY_S``)."""
        self._attempt("its start", lambda: self.store.set_busy_timeout(busy_s), force=True)

    def event(self, event: Event, data: dict[str, Any] | None = None) -> bool:
        """Buffer ``event`` (``data``: its wire form, if the caller has it) and write what is due;
        True when something stays buffered that a later ``flush`` must write (``batch_s``)."""
        if isinstance(event, Deliveries):  # an endpoint's report: the job's whole list so far
            self.deliveries(event.webhooks, whole=True)
            return False
        if self.final is not None:
            return False  # the job ended: nothing follows its last event
        held = self.outcome.finished is not None
        self.outcome.see(event)
        self._buffer.append(data if data is not None else to_dict(event))
        if isinstance(event, Progress):
            self._progress = {"done": event.done, "total": event.total, "phase": event.phase}
        elif isinstance(event, Started) and event.total is not None and self._progress is None:
            self._progress = {"done": 0, "total": event.total, "phase": None}
        if self.outcome.ended:
            self._finish()
            return False
        if held or isinstance(event, Finished):
            return False  # written with the final state
        since = time.monotonic() - self._last_flush
        if isinstance(event, Started) or since >= (self.flush_s if isinstance(event, Progress) else self.batch_s):
            self.flush()
            return False
        return True

    def flush(self, force: bool = False) -> None:
        """Write the buffered events (held ones too) and progress, unless backing off after a failure (or ``force``)."""
        if self.final is not None:
            self.retry_end()
            return
        self._attempt("its progress", self._write_events, force)
        self._last_flush = time.monotonic()

    def tick(self) -> None:
        """Time passed with no event (an endpoint's keep-alive line): write what is buffered once ``flush_s``
        has gone by since the last write, as the next event would have. Never a held ``finished``: that one
        waits for ``end()`` (the outputs are not in place yet)."""
        if self.final is not None or self.outcome.finished is not None or not (self._buffer or self._progress):
            return
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def end(self, fallback: Failed | None = None) -> None:
        """The stream is over: its final state, then what is left of the events. A stream that
        ended with neither ``finished`` nor an ``error`` ends with ``fallback`` (else only its
        events are written: the job goes on elsewhere)."""
        if self.final is not None:
            self.retry_end()
        elif self.outcome.status is not None:
            self._finish()
        elif fallback is not None:
            self.event(fallback)
        else:
            self.flush(force=True)

    def fail(self, exc: BaseException) -> None:
        """The stream raised ``exc``: it is the job's last event (``events.failed``)."""
        self.event(failed(exc))

    def ended_elsewhere(self, status: str, error_code: int | None = None, error_message: str | None = None,
                        progress: dict[str, Any] | None = None) -> None:
        """What the job's runner says of it outside its stream (an endpoint's record, a 404, a cancel
        it confirmed): its progress, and its final state if ``status`` is final; no event is stored."""
        if progress is not None:
            self._attempt("its progress", lambda: self.store.append_events(self.job_id, [], progress), force=True)
        if status in ("completed", "failed", "cancelled") and self.final is None:
            self.final = (status, {"result": None, "error_code": error_code, "error_message": error_message})
            self.final_written = self._attempt(f"its end ({status})", self._write_final, force=True)

    def retry_end(self) -> None:
        """The final state again, if the store refused it (the last chance: the stream is over)."""
        if self.final is not None and not self.final_written:
            self.final_written = self._attempt("its end", self._write_final, force=True)

    def deliveries(self, deliveries: list[dict[str, Any]], whole: bool = False) -> None:
        """Each webhook delivery's outcome, oldest first (``target``: its URL, redacted). ``whole``: the
        job's whole list so far (an endpoint's report): those the store already has are skipped."""
        def write() -> None:
            rows = deliveries[len(self.store.deliveries(self.job_id)):] if whole else deliveries
            for d in rows:
                self.store.add_delivery(self.job_id, {**d, "at": _seconds(d.get("at"))}, d.get("target"))

        if deliveries:
            self._attempt("its webhooks", write, force=True)

    @property
    def buffered(self) -> int:
        """Events waiting to be written."""
        return len(self._buffer)

    # -- writing -----------------------------------------------------------------------------

    def _finish(self) -> None:
        status = self.outcome.status
        assert status is not None
        fields = self.outcome.final()
        modal = (fields["result"] or {}).get("modal") or {}  # a Modal run's gpu and estimated cost
        self.final = (status, {**fields, "gpu": modal.get("gpu"), "cost_usd": modal.get("estimated_cost_usd")})
        self.final_written = self._attempt(f"its end ({status})", self._write_final, force=True)

    def _write_final(self) -> None:
        assert self.final is not None
        status, fields = self.final
        with self._lock:
            self.store.finish(self.job_id, status, **fields)
            self._write_events(locked=True)

    def _write_events(self, locked: bool = False) -> None:
        if not self._buffer and not self._progress:
            return
        with contextlib.nullcontext() if locked else self._lock:
            rows = self._buffer
            if self._written is not None:  # rows another process wrote first are not written twice
                have = self._written + len(self.store.events(self.job_id, self._written))
                rows = rows[max(have - self._written, 0):]
            self.store.append_events(self.job_id, rows, self._progress)
        if self._written is not None:
            self._written += len(self._buffer)
        batch, self._buffer, self._progress = self._buffer, [], None
        if self._on_write is not None:
            self._on_write(batch)

    def _attempt(self, what: str, write: Callable[[], None], force: bool = False) -> bool:
        if not force and time.monotonic() < self._retry_at:
            return False
        try:
            write()
            return True
        except STORE_ERRORS as exc:
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            if not self._warned:
                self._warned = True
                message = (f"job store {self.store.path}: could not record {what} ({exc}); the job goes on, "
                           "but synapse jobs may show it incomplete")
                if self._warn is not None:
                    self._warn(message)
                else:
                    self.warnings.append(message)
            return False


def _seconds(at: Any) -> float | None:
    """A delivery's time: Unix seconds, or the ISO 8601 form an endpoint's record gives."""
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        return float(at)
    if isinstance(at, str):
        from datetime import datetime

        try:
            return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def record(store: JobStore, job: Job, events: Iterator[Event] | Callable[[], Iterator[Event]], flush_s: float = 0.5,
           on_end: Callable[[Job], None] | None = None, busy_s: float = RECORD_BUSY_S) -> Iterator[Event]:
    """Pass ``events`` through, writing them to the store (a ``Recorder``) and the job's final state.

    ``events`` may be a function that starts the run and returns its events: whatever it raises
    (a bad input found before the job starts, a refused option) ends the job ``failed`` with that
    error's code and message, like an error raised by the events themselves. Give the function
    whenever starting can fail: a row left ``processing`` by a live process is waited on by every
    identical job of that process (the result cache follows it).

    Best-effort: a write that fails (the store locked past ``busy_s``, a full disk) becomes one
    warning ``Log`` event (or stderr line, once no event can follow); its events stay buffered for
    a later write, and the job runs to its end either way: its output never depends on the store.
    A ``Deliveries`` event (an endpoint's report of the job's webhooks) is recorded, not passed on."""
    recorder = Recorder(store, job.id, flush_s=flush_s)

    def warnings() -> Iterator[Log]:
        for message in recorder.warnings:
            yield Log(message, level="warning")
        recorder.warnings.clear()

    def warn_stderr() -> None:  # no event can follow: the warning goes to stderr itself
        for w in warnings():
            print(f"Warning: {w.message}", file=sys.stderr, flush=True)

    recorder.start(busy_s)
    heartbeat = _Heartbeat(store.path, job.id, busy_s)
    try:
        if callable(events):
            events = events()
        for event in events:
            recorder.event(event)
            yield from warnings()
            if not isinstance(event, Deliveries):
                yield event
        recorder.end(Failed(1, "the job ended without a result", "JobError"))
        warn_stderr()
    except GeneratorExit:
        if recorder.outcome.finished is not None:  # the reader stopped at the result: the job did finish
            recorder.end()
        else:
            recorder.fail(Interrupted("interrupted"))
        recorder.retry_end()
        warn_stderr()
        raise
    except (KeyboardInterrupt, Exception) as exc:
        recorder.fail(exc)
        warn_stderr()
        raise
    finally:
        heartbeat.stop()
        if recorder.final is not None and not recorder.final_written and job.status in ACTIVE:
            status, fields = recorder.final  # what on_end gets when the store cannot say
            job.status, job.finished_at = status, time.time()
            job.result, job.error_code, job.error_message = fields.get("result"), fields.get("error_code"), fields.get("error_message")
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
