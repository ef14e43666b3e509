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

_API = ("Job", "JobStream", "run", "run_async", "settings", "stream", "stream_async", "submit")
# one shortcut per job kind and its async twin, made from the kinds' records by synapse_cli.api
_KINDS = ("compile", "compile_async", "export", "export_async", "infer", "infer_async", "sample", "sample_async")
_EVENTS = ("Event", "Started", "Progress", "Log", "Artifact", "Finished", "Failed")
_ERRORS = ("SynapseError", "UsageError", "JobError", "BackendError", "Interrupted")
__all__ = [*_API, *_KINDS, *_EVENTS, *_ERRORS, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily in __getattr__
    from synapse_cli.api import (
        Job, JobStream, compile, compile_async, export, export_async, infer, infer_async, run, run_async, sample,
        sample_async, settings, stream, stream_async, submit,
    )  # fmt: skip
    from synapse_cli.errors import BackendError, Interrupted, JobError, SynapseError, UsageError
    from synapse_cli.events import Artifact, Event, Failed, Finished, Log, Progress, Started


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in (("synapse_cli.api", (*_API, *_KINDS)), ("synapse_cli.events", _EVENTS), ("synapse_cli.errors", _ERRORS)):
        if name in names:
            value = getattr(importlib.import_module(module), name)
            globals()[name] = value
            return value
    if not name.startswith("_") and not _is_submodule(name):  # a kind that a plugin adds: synapse_cli.echo(...)
        api = importlib.import_module("synapse_cli.api")
        if api.shortcut_kind(name):
            value = globals()[name] = getattr(api, name)
            return value
    raise AttributeError(f"module 'synapse_cli' has no attribute {name!r}")


def _is_submodule(name: str) -> bool:
    """``from synapse_cli import pipeline`` asks ``__getattr__`` first: a module of ours is never a kind's shortcut."""
    import os

    here = os.path.dirname(__file__)
    return os.path.exists(os.path.join(here, f"{name}.py")) or os.path.isdir(os.path.join(here, name))


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
