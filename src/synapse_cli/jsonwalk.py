"""One walk over JSON-like values (what specs, events and results are made of), for every module that
rewrites the strings in one: staged paths named back, server paths shown as the client's, URLs redacted."""

from __future__ import annotations

from typing import Any, Callable


def map_strings(value: Any, fn: Callable[[str], Any]) -> Any:
    """``value`` with ``fn`` applied to every string in it, through dicts (their values; keys stay),
    lists and tuples, each rebuilt as the same kind (a tuple stays a tuple). Anything else is kept as it is."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_strings(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    return value
