"""The application core: options → settings → spec → backend → events → result.

``synapse export``, ``synapse_cli.export(...)`` and every other client reach a job through
here: ``plan(kind, options, *args, **kind_options)`` resolves the settings (flag > env >
file > default), builds the kind's spec with its own builder and picks the backend and the
job store; ``job_events(plan)`` runs it attached, recording its events; ``start_detached(plan)``
starts it where it outlives this process. Nothing here renders or exits: the CLI maps
errors to exit codes, the API raises them.

The names load on first use: a command's options (``pipeline.options``) are declared before
anything runs, and ``synapse --help`` must not pay for the settings, the store or the backends.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "RunOptions": "options",
    "Plan": "planning", "backend_for": "planning", "backend_named": "planning", "plan": "planning", "runner_for": "planning",
    "settings_for": "planning", "split_options": "planning",
    "job_events": "run", "start_detached": "run",
}  # fmt: skip
__all__ = ["Plan", "RunOptions", "backend_for", "backend_named", "job_events", "plan", "runner_for", "settings_for", "split_options",
           "start_detached"]  # fmt: skip

if TYPE_CHECKING:
    from synapse_cli.pipeline.options import RunOptions
    from synapse_cli.pipeline.planning import Plan, backend_for, backend_named, plan, runner_for, settings_for, split_options
    from synapse_cli.pipeline.run import job_events, start_detached


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
