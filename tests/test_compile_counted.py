"""Grammar constructs of our own in the GBNF converter, checked against ``jsonschema`` on random instances:
``contains``/``minContains``/``maxContains`` as counted alternations over the items, and number bounds
with integer values (``number_range``). The grammar is loaded as llama.cpp's artefact is checked
(llguidance's GBNF reader, xgrammar's second opinion on what it rejects).
"""

from __future__ import annotations

import json
import os

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from synapse_cli.jobs.compile.engines import check_artefact  # noqa: E402
from synapse_cli.jobs.compile.gbnf import schema_to_gbnf  # noqa: E402
from synapse_cli.jobs.compile.verify import candidates  # noqa: E402

SETTINGS = settings(max_examples=int(os.environ.get("SYNAPSE_TEST_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

items = st.lists(st.one_of(st.integers(-2, 3), st.sampled_from([1.0, 0.5, "a", None, True])), max_size=5)
condition = st.sampled_from([{"const": 1}, {"type": "string"}, {"type": "null"}, {"minimum": 1}, {"maximum": 0},
                             {"enum": [1, "a"]}, True, False, {"type": "integer", "exclusiveMinimum": 0}])


def _verdicts(schema: dict, values: list) -> tuple[list[bool], list[str]]:
    grammar, ignored = schema_to_gbnf(schema)
    accepted = check_artefact("llama.cpp", "json_schema", grammar, [candidates("json_schema", v, schema) for v in values])
    return accepted, ignored


@SETTINGS
@given(condition, st.one_of(st.none(), st.integers(0, 3)), st.one_of(st.none(), st.integers(0, 3)),
       st.sampled_from([None, {"type": ["integer", "string", "null"]}, {"type": "number"}]), st.lists(items, min_size=1, max_size=6))
def test_counted_contains_agrees(cond, lo, hi, item_schema, values):
    schema = {"type": "array", "contains": cond}
    if lo is not None:
        schema["minContains"] = lo
    if hi is not None:
        schema["maxContains"] = hi
    if item_schema is not None:
        schema["items"] = item_schema
    want = [jsonschema.Draft202012Validator(schema).is_valid(v) for v in values]
    try:
        accepted, ignored = _verdicts(schema, values)
    except Exception as exc:  # no array can hold the count: the converter says no value
        assert "admits no value" in str(exc) and not any(want), (schema, exc)
        return
    if ignored:  # only a maximum whose complement is not written (an integer type) is left to the report
        from synapse_cli.jobs.compile.complement import complement

        assert hi is not None and complement(cond) is None and set(ignored) <= {"contains", "minContains", "maxContains"}, (schema, ignored)
        return
    # all of it enforced: a counted alternation, not a dropped keyword
    for value, ok, valid in zip(values, accepted, want):
        if ok != valid:
            # the one known rejection, older than this construct: our integer rule reads 1.0 as a non-integer
            assert valid and '"integer"' in json.dumps(schema), (json.dumps(schema), value)
            assert any(isinstance(x, float) and x.is_integer() for x in value), (json.dumps(schema), value)


bound = st.one_of(st.none(), st.integers(-12, 12))
numbers = st.lists(st.one_of(st.integers(-15, 15), st.sampled_from([0.5, -0.5, 1.0, -1.0, 0.0, -0.0, 2.25, -10.5, 10.01, 9.99])),
                   min_size=1, max_size=8)


@SETTINGS
@given(bound, bound, bound, bound, numbers)
def test_number_bounds_with_integer_values_agree(lo, hi, xlo, xhi, values):
    schema: dict = {"type": "number"}
    for key, v in (("minimum", lo), ("maximum", hi), ("exclusiveMinimum", xlo), ("exclusiveMaximum", xhi)):
        if v is not None:
            schema[key] = v
    want = [jsonschema.Draft202012Validator(schema).is_valid(v) for v in values]
    if not any(want) and len(schema) > 1:
        values = values + [lo if lo is not None else hi]  # mostly empty ranges: still one value to try
        want.append(jsonschema.Draft202012Validator(schema).is_valid(values[-1]))
    try:
        accepted, ignored = _verdicts(schema, values)
    except Exception as exc:  # an empty range: the converter says no value
        assert "admits no value" in str(exc) and not any(want), (schema, exc)
        return
    assert not ignored, (schema, ignored)
    assert accepted == want, (schema, values)


def test_contains_beyond_the_counted_forms_is_reported():
    # beside minItems the count is not built: contains is listed, never silently approximated
    _, ignored = schema_to_gbnf({"type": "array", "contains": {"const": 1}, "minItems": 2})
    assert "contains" in ignored
    # a non-integer bound is not written: listed
    _, ignored = schema_to_gbnf({"type": "number", "minimum": 1.5})
    assert ignored == ["minimum"]


tuple_part = st.builds(
    lambda prefix, items: {"prefixItems": prefix, **({} if items is None else {"items": items})},
    st.lists(st.sampled_from([True, {"type": "string"}, {"const": 1}, {"type": "integer"}]), max_size=3),
    st.sampled_from([None, False, True, {"type": "string"}]))


@SETTINGS
@given(st.lists(tuple_part, min_size=2, max_size=3), st.lists(items, min_size=1, max_size=6))
def test_allof_of_tuples_of_different_lengths_agrees(parts, values):
    """items applies past its own branch's prefixItems: merged, the prefixes are aligned first
    (jsts-unevaluatedItems-11 lowered into such branches, and a mismerge was an unreported wrong accept)."""
    schema = {"type": "array", "allOf": parts}
    want = [jsonschema.Draft202012Validator(schema).is_valid(v) for v in values]
    try:
        accepted, ignored = _verdicts(schema, values)
    except Exception as exc:
        assert "admits no value" in str(exc) and not any(want), (schema, exc)
        return
    assert not ignored, (schema, ignored)
    for value, ok, valid in zip(values, accepted, want):
        if ok != valid:
            assert valid and '"integer"' in json.dumps(schema) and any(isinstance(x, float) and x.is_integer() for x in value), (json.dumps(schema), value)


def test_a_minimum_of_zero_admits_negative_zero_and_nothing_below():
    """-0.0 >= 0 (hypothesis found the grammar rejecting it); exponent forms stay admitted."""
    values = [-0.0, 0.0, 0, 1e20, 2.5, -0.5, -1, -1e-20]
    accepted, ignored = _verdicts({"type": "number", "minimum": 0}, values)
    assert not ignored and accepted == [True, True, True, True, True, False, False, False]
