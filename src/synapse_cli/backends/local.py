from __future__ import annotations

from typing import Any, Iterator

from synapse_cli.events import Event
from synapse_cli.jobs import load_job


class LocalBackend:
    """Runs the job generator in this process."""

    name = "local"

    def run(self, job: str, spec: Any) -> Iterator[Event]:
        yield from load_job(job)(spec)

    def run_shard(self, job: str, spec: Any) -> Iterator[Event]:
        """A shard runs in its own worker process: shards use every core, and cancelling one kills it at once."""
        from synapse_cli.backends._worker import WorkerCall

        return WorkerCall(job, spec)  # type: ignore[return-value]

    def close(self) -> None:
        pass
