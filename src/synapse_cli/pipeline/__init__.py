"""The application core: options → settings → spec → backend → events → result.

``synapse export``, ``synapse_cli.export(...)`` and every other client reach a job through
here: ``plan(kind, options, *args, **kind_options)`` resolves the settings (flag > env >
file > default), builds the kind's spec with its own builder and picks the backend and the
job store; ``job_events(plan)`` runs it attached, recording its events; ``start_detached(plan)``
starts it where it outlives this process. Nothing here renders or exits: the CLI maps
errors to exit codes, the API raises them.
"""

from __future__ import annotations

from synapse_cli.pipeline.options import RunOptions
from synapse_cli.pipeline.plan import Plan, backend_for, backend_named, plan, runner_for, settings_for, split_options
from synapse_cli.pipeline.run import job_events, start_detached

__all__ = [
    "Plan",
    "RunOptions",
    "backend_for",
    "backend_named",
    "job_events",
    "plan",
    "runner_for",
    "settings_for",
    "split_options",
    "start_detached",
]
