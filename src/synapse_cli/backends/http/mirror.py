"""A followed endpoint job's events, copied into the local job store through the one ``Recorder``
(best effort: a store that fails never stops the follow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synapse_cli.events import Event, from_dict

if TYPE_CHECKING:
    from synapse_cli.store.recording import Recorder


def _quiet(store: Any, job_id: str) -> "Recorder":
    """A ``Recorder`` of the job for what the server's record says of it: best effort and silent (the job is the server's)."""
    from synapse_cli.store.recording import Recorder

    return Recorder(store, job_id, warn=lambda message: None)


class _Mirror:
    """A detached job's events, copied into the local job store as they come.

    The server's event ``i`` is the store's row ``i + 1``, so the store says where to resume
    (``after``). The ``Recorder`` batches the writes, keeps a batch the store refuses for the next
    try, skips rows another ``jobs wait`` of the same job wrote first, and writes the job's final
    state from how its stream ends (an ``error``, even after ``finished``, ends it at once).
    """

    def __init__(self, store: Any, job_id: str, flush_s: float = 0.5) -> None:
        from synapse_cli.store.recording import Recorder

        self.store, self.job_id = store, job_id
        self.recorded = [data for _, data in store.events(job_id)]
        self.after = len(self.recorded)  # the next index to ask for
        self.recorder = Recorder(store, job_id, flush_s=flush_s, written=self.after, warn=lambda message: None)
        for data in self.recorded:  # how the stream ends counts what an earlier wait recorded (its ``finished``)
            try:
                self.recorder.outcome.see(from_dict(data))
            except (ValueError, TypeError):
                pass  # (the follow says so when it reads it again)

    def add(self, data: dict[str, Any], event: Event) -> None:
        self.after += 1
        self.recorder.event(event, data)

    def flush(self) -> None:
        """What is buffered (a held ``finished`` too), and the final state only if an ``error`` decided it."""
        self.recorder.flush(force=True)

    def completed(self) -> None:
        """The outputs are in place: the job's ``finished`` (held until now) and its end."""
        self.recorder.end()
