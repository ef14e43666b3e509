"""The backend interface: ``run(kind, spec) -> Iterator[Event]`` plus ``close()``, and a
``Capabilities`` record that says, once, what else a backend can do.

The pipeline reads ``capabilities``; it never probes a backend with ``getattr`` or compares
its methods with this base class's. A backend that cannot detach leaves ``detach``/
``follow``/``cancel`` to this class (a UsageError naming the backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping

from synapse_cli.errors import UsageError
from synapse_cli.events import Event

Sharding = Literal["none", "local", "remote", "server"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do besides ``run``.

    - ``detach``: a job can outlive this process (``--detach``: ``detach``/``follow``/``cancel``).
    - ``shards``: how ``--shards N`` runs. ``none``: refused. ``local``: each shard is one
      ``run_shard`` on this machine, merged here. ``remote``: each shard is one ``run_shard``
      call elsewhere (its own machine), merged here. ``server``: the endpoint splits the job
      across its own workers and merges it (``run_sharded``).
    - ``url_shards``: how ``--shards N`` runs for a spec with ``s3://`` or ``https://`` fields, where
      that differs from ``shards`` (None: the same). Modal's is ``server``: such a job is split,
      run and merged in a container, since this client may hold no credentials to probe it.
    - ``detach_shards``: a detached job may be sharded.
    - ``scales_out``: each call gets a machine of its own, so ``--shards auto`` splits by size.
    - ``shard_retries``: how often one shard is retried after a transient failure (BackendError).
    - ``notifies``: the backend has the job's webhooks sent where it runs, attached runs too (an
      endpoint: its server signs and sends them); else the pipeline sends an attached run's from
      this process. A detached job's are always sent where it runs (``detach``).
    - ``stages_urls``: the job runs in this process, so this process reads and writes the spec's
      ``s3://`` and ``https://`` fields (``synapse_cli.storage``); elsewhere, where the job runs does.
    """

    detach: bool = False
    shards: Sharding = "none"
    url_shards: Sharding | None = None
    detach_shards: bool = False
    scales_out: bool = False
    shard_retries: int = 0
    notifies: bool = False
    stages_urls: bool = False


class Backend:
    name = "backend"
    capabilities = Capabilities()

    def run(self, kind: str, spec: Any) -> Iterator[Event]:
        """Run job ``kind`` (a key of ``synapse_cli.jobs.JOBS``) on ``spec``, yielding its events.

        Errors surface as ``synapse_cli.errors`` exceptions raised from the iterator;
        closing the iterator early cancels the job and removes partial outputs.
        """
        raise NotImplementedError

    def run_shard(self, kind: str, spec: Any) -> Iterator[Event]:
        """Run one shard of a sharded job (``shards`` ``local`` or ``remote``; see ``synapse_cli.shards``)."""
        raise UsageError(f"--shards is not supported with the {self.name} backend")

    def run_sharded(self, kind: str, spec: Any, shards: Any) -> Iterator[Event]:
        """Run the whole job split into ``shards`` (an int, or ``auto``) where it runs (``shards`` ``server``)."""
        raise UsageError(f"--shards is not supported with the {self.name} backend")

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
