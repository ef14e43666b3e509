"""synapse: one command for media and model jobs, in-process or on Modal; and the same jobs as a Python API.

    import synapse_cli as synapse

    for event in synapse.export("clip.mp4", job="framing", params={...}):
        print(event)
    result = synapse.run("compile", ["schemas/"], output_dir="out")
    job = synapse.submit("infer", "match.mp4", task="track"); job.wait()

The public names load on first use (``synapse_cli.api``, ``synapse_cli.events``,
``synapse_cli.errors``), so ``import synapse_cli`` costs next to nothing: no rich,
modal, torch or ultralytics. See docs/python.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("Job", "JobStream", "compile", "compile_async", "export", "export_async", "infer", "infer_async", "run",
        "run_async", "sample", "sample_async", "settings", "stream", "stream_async", "submit")  # fmt: skip
_EVENTS = ("Event", "Started", "Progress", "Log", "Artifact", "Finished", "Failed")
_ERRORS = ("SynapseError", "UsageError", "JobError", "BackendError", "Interrupted")
__all__ = [*_API, *_EVENTS, *_ERRORS, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily in __getattr__
    from synapse_cli.api import (
        Job, JobStream, compile, compile_async, export, export_async, infer, infer_async, run, run_async, sample,
        sample_async, settings, stream, stream_async, submit,
    )  # fmt: skip
    from synapse_cli.errors import BackendError, Interrupted, JobError, SynapseError, UsageError
    from synapse_cli.events import Artifact, Event, Failed, Finished, Log, Progress, Started


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in (("synapse_cli.api", _API), ("synapse_cli.events", _EVENTS), ("synapse_cli.errors", _ERRORS)):
        if name in names:
            value = getattr(importlib.import_module(module), name)
            globals()[name] = value
            return value
    raise AttributeError(f"module 'synapse_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
