"""The same-meaning rewrites (``jobs/compile/lower.py``): the rewritten schema and the original agree under
``jsonschema`` on every instance.

Property-based: hypothesis draws schemas from each rewrite's domain and random instances (objects over a
small key alphabet, arrays of small values, strings, numbers), and both schemas must give the same verdict.
The JSON-Schema-Test-Suite check runs every labelled instance of the 2020-12 slice through the rewritten
schema.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from synapse_cli.jobs.compile.complement import complement, not_in_words  # noqa: E402
from synapse_cli.jobs.compile.lower import lower  # noqa: E402
from synapse_cli.jobs.compile.normalize import keywords_used, normalize  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "compile"
JSTS = Path(os.environ.get("SYNAPSE_TEST_JSTS", SHARED / "jsts-2020-12.jsonl"))

KEYS = ["a", "b", "c", "ab"]
SETTINGS = settings(max_examples=int(os.environ.get("SYNAPSE_TEST_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- instances ---------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([1.0, 2.5, -0.5]),
                    st.sampled_from(["", "a", "b", "ab", "abc", "x"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)), max_leaves=8)
objects = st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4)
arrays = st.lists(scalars, max_size=5)
instances = st.one_of(values, objects, arrays)

# -- schemas from the rewrites' domains ----------------------------------------------------------

leaf = st.one_of(
    st.just(True), st.just(False),
    st.sampled_from(["null", "boolean", "object", "array", "number", "string", "integer"]).map(lambda t: {"type": t}),
    st.lists(st.sampled_from(["null", "string", "number", "object"]), min_size=1, max_size=3, unique=True).map(lambda t: {"type": t}),
    scalars.map(lambda v: {"const": v}),
    st.lists(scalars, min_size=1, max_size=4).map(lambda v: {"enum": v}),
    st.builds(lambda k, v: {k: v}, st.sampled_from(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]), st.integers(-2, 2)),
    st.builds(lambda k, v: {k: v}, st.sampled_from(["minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"]), st.integers(0, 3)),
    st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True).map(lambda r: {"required": r}),
)


def _props(sub):
    return st.dictionaries(st.sampled_from(KEYS), sub, min_size=1, max_size=2).map(lambda p: {"properties": p})


simple = st.recursive(leaf, lambda inner: st.one_of(
    _props(inner),
    st.lists(inner, min_size=1, max_size=3).map(lambda b: {"allOf": b}),
    st.lists(inner, min_size=1, max_size=3).map(lambda b: {"anyOf": b}),
    inner.map(lambda s: {"not": s}),
    st.builds(lambda a, b: {**a, **b} if isinstance(a, dict) and isinstance(b, dict) else a, inner, inner),
), max_leaves=5)


def _agree(original, instance) -> None:
    rewritten = lower(original)
    want = jsonschema.Draft202012Validator(original).is_valid(instance)
    got = jsonschema.Draft202012Validator(rewritten).is_valid(instance)
    assert want == got, (json.dumps(original), json.dumps(rewritten), instance)


@SETTINGS
@given(simple, instances)
def test_complement_is_the_exact_negation(schema, instance):
    neg = complement(schema)
    if neg is None:
        return  # no complement written (e.g. an integer type): the keyword stays where it is
    want = jsonschema.Draft202012Validator(schema).is_valid(instance)
    assert jsonschema.Draft202012Validator(neg).is_valid(instance) is (not want), (schema, neg, instance)


@SETTINGS
@given(simple, instances)
def test_not_rewrite_agrees(schema, instance):
    _agree({"not": schema}, instance)


@SETTINGS
@given(simple, simple, simple, instances, st.booleans(), st.booleans())
def test_if_then_else_rewrite_agrees(i, t, e, instance, has_then, has_else):
    schema = {"if": i}
    if has_then:
        schema["then"] = t
    if has_else:
        schema["else"] = e
    _agree(schema, instance)


@SETTINGS
@given(st.lists(simple, min_size=1, max_size=4), instances)
def test_oneof_rewrite_agrees(branches, instance):
    _agree({"oneOf": branches}, instance)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), st.lists(st.sampled_from(KEYS), max_size=3), max_size=3),
       st.dictionaries(st.sampled_from(KEYS), simple, max_size=2), objects)
def test_dependent_rewrites_agree(required, schemas, instance):
    _agree({"dependentRequired": required}, instance)
    _agree({"dependentSchemas": schemas}, instance)
    _agree({"dependentRequired": required, "dependentSchemas": schemas, "properties": {"a": {"type": "integer"}}}, instance)


names = st.one_of(
    st.builds(lambda k, v: {k: v}, st.sampled_from(["minLength", "maxLength"]), st.integers(0, 2)),
    st.sampled_from(["^a", "b$", "^a+$", "c"]).map(lambda p: {"pattern": p}),
    st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(lambda v: {"enum": v}),
    st.sampled_from(KEYS).map(lambda v: {"const": v}),
    st.sampled_from([True, False, {"type": "number"}, {"type": "string", "maxLength": 1}]),
)


@SETTINGS
@given(names, st.one_of(st.just(None), simple), objects)
def test_property_names_rewrite_agrees(names_schema, extra, instance):
    schema = {"propertyNames": names_schema}
    if extra is not None:
        schema["additionalProperties"] = extra
    _agree(schema, instance)
    assert "propertyNames" not in keywords_used(lower(schema))


# unevaluated*: the in-place applicators it distributes over, with properties and items around them
obj_part = st.one_of(
    _props(leaf),
    st.lists(st.sampled_from(["^a", "b$"]), min_size=1, max_size=2, unique=True).map(lambda ps: {"patternProperties": {p: {"type": "integer"} for p in ps}}),
    st.just({"additionalProperties": True}), st.just({"additionalProperties": {"type": "string"}}),
    leaf,
)
in_place = st.recursive(obj_part, lambda inner: st.one_of(
    st.lists(inner, min_size=1, max_size=3).map(lambda b: {"allOf": b}),
    st.lists(inner, min_size=1, max_size=3).map(lambda b: {"anyOf": b}),
    st.lists(inner, min_size=1, max_size=3).map(lambda b: {"oneOf": b}),
    st.tuples(inner, inner, inner).map(lambda t: {"if": t[0], "then": t[1], "else": t[2]}),
    inner.map(lambda i: {"if": i}),  # an if alone: no constraint, but it evaluates what it holds
    st.tuples(st.sampled_from(KEYS), inner).map(lambda t: {"dependentSchemas": {t[0]: t[1]}}),
    inner.map(lambda s: {"not": s}),
    st.tuples(inner, st.sampled_from([False, {"type": "string"}, True])).map(
        lambda t: {**(t[0] if isinstance(t[0], dict) else {}), "unevaluatedProperties": t[1]}),
    st.builds(lambda a, b: {**a, **b} if isinstance(a, dict) and isinstance(b, dict) else a, inner, inner),
), max_leaves=5)


@SETTINGS
@given(in_place, st.sampled_from([False, {"type": "string"}, {"type": "integer"}]), objects)
def test_unevaluated_properties_rewrite_agrees(schema, closing, instance):
    whole = {**schema, "unevaluatedProperties": closing} if isinstance(schema, dict) else {"allOf": [schema], "unevaluatedProperties": closing}
    _agree(whole, instance)


arr_part = st.one_of(
    st.lists(leaf, min_size=1, max_size=3).map(lambda p: {"prefixItems": p}),
    leaf.map(lambda s: {"items": s}),
    st.just({"prefixItems": [True], "items": {"type": "string"}}),
    leaf,
)
in_place_items = st.recursive(arr_part, lambda inner: st.one_of(
    st.lists(inner, min_size=1, max_size=3).map(lambda b: {"allOf": b}),
    st.lists(inner, min_size=1, max_size=3).map(lambda b: {"anyOf": b}),
    st.lists(inner, min_size=1, max_size=2).map(lambda b: {"oneOf": b}),
    st.tuples(inner, inner, inner).map(lambda t: {"if": t[0], "then": t[1], "else": t[2]}),
    inner.map(lambda i: {"if": i}),
    inner.map(lambda s: {"not": s}),
    st.builds(lambda a, b: {**a, **b} if isinstance(a, dict) and isinstance(b, dict) else a, inner, inner),
), max_leaves=5)


@SETTINGS
@given(in_place_items, st.sampled_from([False, {"type": "string"}, {"type": "integer"}]), arrays)
def test_unevaluated_items_rewrite_agrees(schema, closing, instance):
    whole = {**schema, "unevaluatedItems": closing} if isinstance(schema, dict) else {"allOf": [schema], "unevaluatedItems": closing}
    _agree(whole, instance)


@SETTINGS
@given(st.lists(st.text(alphabet="ab\"\\é", max_size=3), min_size=1, max_size=4), st.text(alphabet="ab\"\\é", max_size=4))
def test_not_in_words_matches_every_other_string(words, text):
    import re

    assert (re.fullmatch(not_in_words(words), text) is not None) is (text not in words)


def test_the_rewrites_remove_the_keywords_engines_drop():
    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
        "if": {"properties": {"kind": {"const": "a"}}, "required": ["kind"]},
        "then": {"required": ["n"]},
        "else": {"not": {"required": ["n"]}},
        "dependentRequired": {"n": ["kind"]},
        "propertyNames": {"maxLength": 4},
        "unevaluatedProperties": False,
    }
    low = lower(schema)
    assert not keywords_used(low) & {"if", "then", "else", "not", "dependentRequired", "propertyNames", "unevaluatedProperties"}
    for value in ({}, {"kind": "a"}, {"kind": "a", "n": 1}, {"kind": "b", "n": 1}, {"kind": "b"}, {"n": 2},
                  {"kind": "b", "x": 1}, {"kind": "a", "n": 1, "long_name": 1}, 3):
        assert jsonschema.Draft202012Validator(schema).is_valid(value) == jsonschema.Draft202012Validator(low).is_valid(value), value


def test_what_cannot_be_rewritten_stays():
    # an integer type has no complement written here (1.5 is a number that is not an integer)
    assert lower({"not": {"type": "integer"}}) == {"not": {"type": "integer"}}
    # contains evaluates items by value: an unevaluatedItems beside it stays, and so does the rest (all or nothing)
    schema = {"contains": {"type": "string"}, "unevaluatedItems": {"type": "integer"}, "not": {"type": "null"}}
    assert lower(schema) == schema


def test_every_labelled_instance_of_the_test_suite_agrees():
    if not JSTS.is_file():
        pytest.skip(f"no data at {JSTS}")
    changed = 0
    for line in JSTS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        try:
            schema = normalize(row["schema"])
        except Exception:  # remote references: bad input for compile, not this test's subject
            continue
        low = lower(schema)
        changed += low != schema
        for test in row["tests"]:
            try:
                got = jsonschema.Draft202012Validator(low).is_valid(test["data"])
            except Exception:  # \p{..} patterns Python's re does not read
                break
            assert got == test["valid"], (row["id"], test["description"], json.dumps(low)[:400])
    assert changed >= 100


def _as_floats(value):
    """The same JSON value with every integer written as a float (1 -> 1.0): equal under JSON Schema."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, list):
        return [_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in reversed(list(value.items()))}  # another key order too
    return value


@SETTINGS
@given(values, st.lists(values, max_size=3), instances)
def test_const_and_enum_of_structures_agree(value, others, instance):
    for probe in (instance, value, _as_floats(value)):
        _agree({"const": value}, probe)
        _agree({"enum": [value, *others]}, probe)
        _agree({"type": "object", "enum": [value, *others]}, probe)
    assert "const" not in json.dumps(lower({"const": [value]}))[:20]  # written as its structure


def test_float_counts_are_integers():
    assert lower({"minProperties": 1.0, "maxItems": 2.0}) == {"minProperties": 1, "maxItems": 2}


def test_a_rewrite_past_the_size_bound_is_not_used():
    # nested exclusive oneOfs of wide enums: each level multiplies the complements (4 kB -> 113 kB)
    leafs = [{"enum": [f"v{i}{j}" for j in range(30)]} for i in range(6)]
    schema = {"oneOf": [{"oneOf": leafs[:3] + [{"not": {"oneOf": leafs}}]}, *leafs[3:], {"not": {"oneOf": leafs}}]}
    assert lower(schema) != schema  # within the default bound (40 times the input)
    assert lower(schema, limit=50_000) == schema  # past it: the keywords stay, and the engines list them
