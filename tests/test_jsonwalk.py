"""The one JSON walker (``synapse_cli.jsonwalk.map_strings``), against a walk written another way."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_cli.jsonwalk import map_strings

LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=25,
)


def strings(value: Any) -> list[str]:
    """Every string in ``value``, depth first, in order: with an explicit stack, not recursion."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
    return found


def shape(value: Any) -> Any:
    """``value`` with its strings blanked: the containers, their kinds, keys and every other leaf."""
    if isinstance(value, str):
        return str
    if isinstance(value, (list, tuple)):
        return (type(value), [shape(v) for v in value])
    if isinstance(value, dict):
        return (dict, [(k, shape(v)) for k, v in value.items()])
    return (type(value), value)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # timing checks are noise on a loaded machine
@given(VALUES)
def test_fn_sees_every_string_once_in_order_and_nothing_else_changes(value):
    before = copy.deepcopy(value)
    seen: list[str] = []

    def tag(s: str) -> str:
        seen.append(s)
        return f"<{s}>"

    out = map_strings(value, tag)
    assert seen == strings(value)
    assert strings(out) == [f"<{s}>" for s in seen]
    assert shape(out) == shape(value)  # tuples stay tuples, lists lists; keys and other leaves as they were
    assert value == before  # the input is not changed in place


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # timing checks are noise on a loaded machine
@given(VALUES)
def test_identity_gives_an_equal_value_and_composition_is_one_walk(value):
    assert map_strings(value, lambda s: s) == value
    assert map_strings(map_strings(value, str.upper), lambda s: s + "!") == map_strings(value, lambda s: s.upper() + "!")


def test_a_tuple_stays_a_tuple_and_keys_are_not_strings_to_rewrite():
    value = {"/srv/a": ("/srv/a", ["/srv/b", 3]), "n": None}
    out = map_strings(value, lambda s: s.replace("/srv/", "vol:"))
    assert out == {"/srv/a": ("vol:a", ["vol:b", 3]), "n": None}
    assert type(out["/srv/a"]) is tuple
