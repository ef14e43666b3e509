"""A followed detached job's events, copied into the local job store in batches (best effort: a store that fails never stops the follow)."""

from __future__ import annotations

import time
from typing import Any, Callable


from synapse_cli.events import Event, Progress


def _store_write(write: Callable[[], None]) -> None:
    """A write to the job store on the way: best effort, as ``runs.record`` does (the job is the server's)."""
    from synapse_cli.store.recording import STORE_ERRORS

    try:
        write()
    except STORE_ERRORS:
        pass


class _Mirror:
    """A detached job's events, copied into the local job store as they come.

    The server's event ``i`` is the store's row ``i + 1``, so the store says where to resume
    (``after``). Writes are batched (every ``flush_s``, and at once for any event but progress);
    a batch the store refuses stays buffered for the next try, and rows another ``jobs wait`` of
    the same job wrote first are not written twice.
    """

    def __init__(self, store: Any, job_id: str, flush_s: float = 0.5) -> None:
        self.store, self.job_id, self.flush_s = store, job_id, flush_s
        self.recorded = [data for _, data in store.events(job_id)]
        self.after = len(self.recorded)  # the next index to ask for
        self._start = self.after  # the index of _buffer[0]
        self._buffer: list[dict[str, Any]] = []
        self._progress: dict[str, Any] | None = None
        self._last = time.monotonic()

    def add(self, data: dict[str, Any], event: Event) -> None:
        self._buffer.append(data)
        self.after += 1
        if isinstance(event, Progress):
            self._progress = {"done": event.done, "total": event.total, "phase": event.phase}
        if not isinstance(event, Progress) or time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if not self._buffer and not self._progress:
            return
        self._last = time.monotonic()

        def write() -> None:
            have = self._start + len(self.store.events(self.job_id, self._start))  # rows are contiguous from 1
            self.store.append_events(self.job_id, self._buffer[max(have - self._start, 0):], self._progress)
            self._start += len(self._buffer)
            self._buffer, self._progress = [], None

        _store_write(write)
