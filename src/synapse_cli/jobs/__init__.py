"""Job generators: plain functions ``spec -> Iterator[Event]``.

Nothing here imports typer, rich or modal, so the same generator runs
in-process, inside a Modal container, or behind the HTTP endpoint. Heavy
libraries (ultralytics, the decoding engines) are imported inside the job
functions, never at module import.

``JOBS`` maps a job kind to ``"module:function"`` and its spec class, loaded
lazily so ``synapse --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, fields
from typing import Any, Callable, Iterator

from synapse_cli.events import Event

# kind -> (module, generator function, spec class)
JOBS: dict[str, tuple[str, str, str]] = {
    "export": ("synapse_cli.jobs.export.job", "export_video", "ExportSpec"),
    "compile": ("synapse_cli.jobs.compile.job", "compile_constraints", "CompileSpec"),
    "infer": ("synapse_cli.jobs.infer.job", "run_yolo", "InferSpec"),
    "sample": ("synapse_cli.jobs.sample", "make_sample", "SampleSpec"),
}


def _lookup(kind: str, index: int) -> Any:
    try:
        entry = JOBS[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(JOBS)}") from None
    return getattr(importlib.import_module(entry[0]), entry[index])


def load_job(kind: str) -> Callable[[Any], Iterator[Event]]:
    return _lookup(kind, 1)


def spec_class(kind: str) -> type:
    return _lookup(kind, 2)


def spec_to_dict(spec: Any) -> dict[str, Any]:
    return asdict(spec)


def spec_from_dict(kind: str, data: dict[str, Any]) -> Any:
    """Rebuild a spec that crossed a boundary; unknown keys are a usage error."""
    from synapse_cli.errors import UsageError

    cls = spec_class(kind)
    names = {f.name for f in fields(cls)}
    extra = sorted(set(data) - names)
    if extra:
        raise UsageError(f"unknown {kind} spec field(s): {', '.join(extra)}")
    return cls(**data)
