"""``StoreChannel``: where a detached job's events go instead of a connection (the server's job store)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from synapse_cli.events import Event, Failed, Finished, from_dict
from synapse_cli.server import runner

if TYPE_CHECKING:
    from synapse_cli.server.detached import DetachedJobs

log = logging.getLogger("synapse.server")


class StoreChannel:
    """``runner.Channel``'s part for a detached job: each event is translated to what the client
    sees, stored through the job's ``Recorder`` (batched: a burst of thousands of log lines costs one
    transaction per ``FLUSH_S``; ``started`` and the last event at once), its followers woken and
    its webhooks fed what was stored. Never blocks the job on a reader (there may be none).

    ``finished`` is held here until the job's thread ends, because a cancel may still come (then
    the job is ``cancelled`` and its outputs go) and the job may still fail after it (compile with
    inputs that failed: ``finished`` and the ``error`` are then stored together, the job ``failed``
    with its result and outputs kept; ``events.Outcome``). Other events after ``finished`` are
    dropped; after ``end`` (a cancel) the job's next event raises ``runner._Cancelled``, which stops it."""

    stalled = False
    FLUSH_S = 0.05
    MAX_BATCH = 1000

    def __init__(self, jobs: "DetachedJobs", run: runner.JobRun, feed: Any = None) -> None:
        self.jobs = jobs
        self.run = run
        self.feed = feed  # the job's webhooks (notify.Feed), fed what is stored: the events the client sees
        self._lock = threading.Lock()
        self._closed = False
        self._held: list[Event] | None = None  # the job's ``finished``, until its thread ends
        self.recorder = jobs.recorder(run.job_id, on_write=self._written, flush_s=self.FLUSH_S, batch_s=self.FLUSH_S)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last(self) -> str | None:
        """The status the job's last event gave it, once stored."""
        return self.recorder.final[0] if self.recorder.final is not None else None

    def _written(self, batch: list[dict[str, Any]]) -> None:
        self.jobs.notify(self.run.job_id)
        if self.feed is not None:
            for data in batch:
                self.feed.feed(from_dict(data))

    def _record(self, events: list[Event]) -> None:
        later = [self.recorder.event(e) for e in events]
        if self.recorder.buffered >= self.MAX_BATCH:
            self.recorder.flush()
        elif any(later):
            self.jobs.flush_later(self)

    def put(self, item: Any, final: bool = False) -> None:
        if item is runner.DONE:
            return
        with self._lock:
            if self._closed:
                if final:
                    return
                raise runner._Cancelled()
            if self.recorder.final is not None:
                return
            if self._held is not None:  # after ``finished``, only a failure counts: stored with it
                if isinstance(item, Failed):
                    self._record([*self._held, *self.run.translate(item)])
                    self._held = None
                return
            if isinstance(item, Finished):
                self.recorder.flush()  # what came before it
                self._held = self.run.translate(item)
                return
            self._record(self.run.translate(item))

    def flush(self) -> None:
        with self._lock:
            self.recorder.flush()

    def end(self, items: list[Any]) -> None:
        """A cancel (``DELETE``, the time limit, shutdown): ``items`` are the job's last events, a held ``finished`` is dropped."""
        with self._lock:
            if self._closed or self.recorder.final is not None:
                return
            self._closed = True
            self._held = None
            self._record([self.run.translate(i)[0] for i in items])
            self.recorder.end()

    def last_word(self, fallback: Failed) -> None:
        """The job's thread ended: store its held ``finished`` (it completed), or ``fallback`` if it left no last event."""
        with self._lock:
            if self._closed or self.recorder.final is not None:
                return
            self._closed = True
            if self._held is not None:
                self._record(self._held)
                self._held = None
            self.recorder.end(self.run.translate(fallback)[0])  # type: ignore[arg-type]  # (a Failed translates to a Failed)

    def close(self) -> None:
        with self._lock:
            self._closed = True
