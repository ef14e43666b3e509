"""The backend interface: ``run(kind, spec) -> Iterator[Event]`` plus ``close()``; and, for jobs
that outlive the terminal, ``detach``/``follow``/``cancel``, which a backend that cannot
do them leaves to this base class (a UsageError naming the backend)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from synapse_cli.errors import UsageError
from synapse_cli.events import Event


class Backend:
    name = "backend"
    detaches_shards = False  # a detached job's shards run where it runs (the local worker does)
    scales_out = False  # each call gets a machine of its own: --shards auto splits by size
    shard_retries = 0  # how often one shard is retried after a transient failure (BackendError)
    stages_urls = False  # this process reads and writes the spec's s3:// and https:// fields (synapse_cli.storage)

    def run(self, kind: str, spec: Any) -> Iterator[Event]:
        """Run job ``kind`` (a key of ``synapse_cli.jobs.JOBS``) on ``spec``, yielding its events.

        Errors surface as ``synapse_cli.errors`` exceptions raised from the iterator;
        closing the iterator early cancels the job and removes partial outputs.
        """
        raise NotImplementedError

    def run_shard(self, kind: str, spec: Any) -> Iterator[Event]:
        """Run one shard of a sharded job (see ``synapse_cli.shards``): by default, one more ``run``."""
        return self.run(kind, spec)

    def detach(self, kind: str, spec: Any, job: Any, store: Any, env: Mapping[str, str]) -> None:
        """Start stored job ``job`` where it survives this terminal; ``env`` carries the meta-options."""
        raise UsageError(f"--detach is not supported with the {self.name} backend")

    def follow(self, job: Any, store: Any) -> Iterator[Event]:
        """The events of a detached job that is still running, as they come."""
        raise UsageError(f"the {self.name} backend cannot re-attach to job {job.id}")

    def cancel(self, job: Any, store: Any) -> None:
        """Stop a detached job that is still running."""
        raise UsageError(f"the {self.name} backend cannot cancel job {job.id}")

    def close(self) -> None:
        pass
