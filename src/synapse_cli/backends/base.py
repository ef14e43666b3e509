from __future__ import annotations

from typing import Any, Iterator, Protocol

from synapse_cli.events import Event


class Backend(Protocol):
    name: str

    def run(self, job: str, spec: Any) -> Iterator[Event]:
        """Run job ``job`` (a key of ``synapse_cli.jobs.JOBS``) on ``spec``, yielding its events.

        Errors surface as ``synapse_cli.errors`` exceptions raised from the iterator;
        closing the iterator early cancels the job and removes partial outputs.
        """
        ...

    def close(self) -> None: ...
