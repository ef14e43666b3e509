"""Renderers: they only consume events.

``render(events, mode, summarize)`` drains the stream and returns the
``finished`` result. ``ndjson`` prints every event on stdout (``--json``);
``rich`` draws a progress bar on stderr (a terminal); ``plain`` prints at
most one progress line a second on stderr (CI). In the human modes the final
result line, from ``summarize(result)``, goes to stdout.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable

from synapse_cli.events import Event

Summarize = Callable[[dict[str, Any]], str]


def choose_mode(json_output: bool, stream: Any = None, env: Any = None) -> str:
    """``ndjson`` with --json; ``rich`` on an interactive terminal; ``plain`` otherwise (CI, pipes, TERM=dumb)."""
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    if json_output:
        return "ndjson"
    isatty = getattr(stream, "isatty", lambda: False)()
    if isatty and env.get("TERM") != "dumb" and not env.get("CI"):
        return "rich"
    return "plain"


def render(events: Iterable[Event], mode: str, summarize: Summarize | None = None) -> dict[str, Any]:
    if mode == "ndjson":
        from synapse_cli.render.ndjson import render_ndjson

        return render_ndjson(events)
    if mode == "rich":
        from synapse_cli.render.rich_bar import render_rich

        return render_rich(events, summarize=summarize)
    from synapse_cli.render.plain import render_plain

    return render_plain(events, summarize=summarize)


def default_summary(result: dict[str, Any]) -> str:
    import json

    return json.dumps(result, separators=(",", ":"), default=str)
