from __future__ import annotations

import json
import sys
from typing import IO, Any, Iterable

from synapse_cli.events import Event, Finished, to_dict


def encode(event: Event) -> str:
    """One NDJSON line (no newline): the format of ``--json`` and of the HTTP stream."""
    return json.dumps(to_dict(event), separators=(",", ":"), ensure_ascii=False, default=str)


def render_ndjson(events: Iterable[Event], out: IO[str] | None = None) -> dict[str, Any]:
    out = out or sys.stdout
    result: dict[str, Any] = {}
    for event in events:
        out.write(encode(event) + "\n")
        out.flush()  # a pipeline step reads the events as they happen
        if isinstance(event, Finished):
            result = event.result
    return result
