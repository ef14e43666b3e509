"""A toy job kind, ``echo``, declared the way any kind is (see docs/kinds.md): reads a file,
yields progress, and writes it back reversed. ``tests/test_kinds.py`` registers it with one
``register_kind(ECHO)`` and runs it on every backend with no edit to any of them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

from synapse_cli.jobs import JobKind


@dataclass
class EchoSpec:
    input: str
    output: str
    overwrite: bool = False

    INPUTS: ClassVar[tuple[str, ...]] = ("input",)
    OUTPUTS: ClassVar[tuple[str, ...]] = ("output",)
    HOST_FIELDS: ClassVar[tuple[str, ...]] = ()


def echo(spec: EchoSpec) -> Iterator[Any]:
    from synapse_cli.events import Artifact, Finished, Progress, Started
    from synapse_cli.jobs._files import atomic_output, check_output

    started = time.monotonic()
    out = Path(spec.output)
    check_output(out, spec.overwrite)
    data = Path(spec.input).read_bytes()
    yield Started(job="echo", total=2)
    yield Progress(done=1, total=2, phase="read")
    with atomic_output(out, spec.overwrite) as tmp:
        tmp.write_bytes(data[::-1])
    yield Progress(done=2, total=2, phase="write")
    yield Artifact(path=str(out), bytes=len(data))
    yield Finished(result={"input": spec.input, "output": str(out), "bytes": len(data)}, elapsed_s=round(time.monotonic() - started, 3))


ECHO = JobKind(name="echo", spec="tests.echo_kind:EchoSpec", run="tests.echo_kind:echo", image="media")
