"""Our JSON Schema / regex -> GBNF converter, checked by loading the GBNF back through llguidance.

In-process and fast: no worker processes. Every feature the issue names gets valid and
invalid instances; an instance counts as accepted when llguidance, reading the GBNF,
accepts its compact serialisation byte by byte.
"""

from __future__ import annotations

import json
import random
import re

import pytest

pytest.importorskip("llguidance")  # the compile extra
pytest.importorskip("jsonschema")

from synapse_cli.jobs.compile import engines  # noqa: E402
from synapse_cli.jobs.compile.gbnf import Unsupported, int_range, regex_to_gbnf, schema_to_gbnf  # noqa: E402
from synapse_cli.jobs.compile.normalize import normalize  # noqa: E402
from tests.conftest import require


def accepts(grammar: str, texts: list[str]) -> list[bool]:
    return engines.check_artefact("llama.cpp", "json_schema", grammar, [[t] for t in texts])


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


FEATURES = {
    "object-required": (
        {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]},
        [{"a": "x"}, {"a": "x", "b": 1}, {"a": "", "b": -5, "c": [1]}],
        [{"b": 1}, {"a": 1}, [], "a"],
    ),
    "enum": (
        {"enum": ["red", 1, None, {"k": [True]}]},
        ["red", 1, None, {"k": [True]}],
        ["blue", 2, False, {"k": [False]}],
    ),
    "const": ({"const": {"v": 1.5}}, [{"v": 1.5}], [{"v": 2}, {"w": 1.5}]),
    "nested-ref": (
        {"type": "object", "properties": {"node": {"$ref": "#/$defs/node"}}, "$defs": {
            "node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}},
                     "required": ["v"], "additionalProperties": False}}},
        [{}, {"node": {"v": 1}}, {"node": {"v": 1, "next": {"v": 2, "next": {"v": 3}}}}],
        [{"node": {}}, {"node": {"v": 1, "next": {"w": 2}}}, {"node": {"v": "1"}}],
    ),
    "anyOf": (
        {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 10}]},
        ["ab", "", 10, 99999],
        ["abc", 9, -10, None],
    ),
    "oneOf-disjoint": (
        {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
        [True, False, None],
        [0, "true"],
    ),
    "array-min-max": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        [[1, 2], [1, 2, 3]],
        [[], [1], [1, 2, 3, 4], [1, "2"]],
    ),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        [[], ["a"], ["a", 1]],
        [[1], ["a", "b"], ["a", 1, 2]],
    ),
    "string-length": (
        {"type": "string", "minLength": 2, "maxLength": 4},
        ["ab", "abcd", "é€"],
        ["a", "abcde", 12],
    ),
    "string-pattern": (
        {"type": "string", "pattern": "^[A-Z][a-z]+(-[0-9]{2})?$"},
        ["Ab", "Abc-12"],
        ["ab", "Ab-1", "A", "Ab-123"],
    ),
    "pattern-unanchored": (
        {"type": "string", "pattern": "[0-9]"},
        ["a1b", "7", 'quote " and 5'],
        ["abc", ""],
    ),
    "pattern-escapes": (
        {"type": "string", "pattern": '^a"b\\\\c\\n$'},
        ['a"b\\c\n'],
        ["abc", 'a"b\\c'],
    ),
    "integer-bounds": (
        {"type": "integer", "minimum": -15, "maximum": 120},
        [-15, -9, 0, 7, 99, 100, 120],
        [-16, -100, 121, 1000, 1.5],
    ),
    "integer-exclusive": (
        {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        [1, 9],
        [0, 10, -1],
    ),
    "number-nonnegative": (
        {"type": "number", "minimum": 0},
        [0, 0.5, 12, 1e3],
        [-1, -0.5],
    ),
    "additionalProperties-false": (
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "additionalProperties": False},
        [{}, {"a": 1}, {"b": 2}, {"a": 1, "b": 2}],
        [{"c": 1}, {"a": 1, "c": 2}],
    ),
    "additionalProperties-schema": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
        [{"a": 1, "ab": "x"}, {"b": "y"}, {"": "z"}],
        [{"b": 1}, {"a": "x"}],
    ),
    "allOf-merge": (
        {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                   {"properties": {"b": {"type": "string"}}, "required": ["b"]}]},
        [{"a": 1, "b": "x"}],
        [{"a": 1}, {"b": "x"}, {"a": "1", "b": "x"}],
    ),
    "type-list": (
        {"type": ["string", "null"]},
        ["x", None],
        [1, [], {}],
    ),
    "format-date": (
        {"type": "string", "format": "date"},
        ["2024-02-29", "1999-12-31"],
        ["2024-13-01", "24-01-01", "2024-1-1"],
    ),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_feature_valid_accepted_invalid_rejected(name):
    schema, valid, invalid = FEATURES[name]
    grammar, ignored = schema_to_gbnf(normalize(schema))
    assert ignored == {"oneOf-disjoint": ["oneOf"], "format-date": ["format"]}.get(name, [])
    got = accepts(grammar, [compact(v) for v in valid + invalid])
    assert got[: len(valid)] == [True] * len(valid), grammar
    assert got[len(valid):] == [False] * len(invalid), grammar


def test_ignored_keywords_are_reported_not_dropped_silently():
    schema = {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}, "n": {"type": "number", "multipleOf": 3}},
              "patternProperties": {"^x": {"type": "integer"}}, "minProperties": 1, "not": {"required": ["q"]}}
    grammar, ignored = schema_to_gbnf(normalize(schema))
    assert ignored == ["minProperties", "multipleOf", "not", "patternProperties", "uniqueItems"]
    # what it does enforce still holds
    assert accepts(grammar, [compact({"t": [1, 1]}), compact({"t": 1})]) == [True, False]


def test_untranslatable_pattern_is_ignored_with_the_keyword():
    grammar, ignored = schema_to_gbnf({"type": "string", "pattern": "(?=a)ab"})
    assert ignored == ["pattern"]
    assert accepts(grammar, ['"ab"', "1"]) == [True, False]


def test_whitespace_follows_llama_cpp_space_rule():
    grammar, _ = schema_to_gbnf(normalize({"type": "object", "properties": {"a": {"type": "array"}}}))
    assert accepts(grammar, ['{ "a" : [ 1 , 2 ] }', '{\n  "a": []\n}']) == [True, True]


@pytest.mark.parametrize("lo,hi", [(0, 0), (0, 9), (5, 5), (-3, 3), (7, 1234), (-1234, -7), (99, 101), (10, 10**6), (None, 5), (-5, None)])
def test_int_range_matches_exactly(lo, hi):
    grammar = f"root ::= n\nn ::= {int_range(lo, hi)}\n"
    rng = random.Random(7)
    a = -2000 if lo is None else lo
    b = 2000 if hi is None else hi
    sample = set(range(a - 15, a + 15)) | set(range(b - 15, b + 15)) | {rng.randint(a - 3000, b + 3000) for _ in range(150)}
    sample = sorted(sample)
    got = engines.check_artefact("llama.cpp", "regex", grammar, [[str(n)] for n in sample])
    expect = [(lo is None or n >= lo) and (hi is None or n <= hi) for n in sample]
    assert got == expect


@pytest.mark.parametrize(
    "pattern,texts",
    [
        ("[A-Z]{2,4}-[0-9]+", ["AB-1", "ABCD-0012", "A-1", "ABCDE-1", "ab-1", "AB-"]),
        ("(foo|ba[rz])+\\.txt", ["foo.txt", "barbaz.txt", ".txt", "fob.txt"]),
        ("\\d+(\\.\\d*)?|\\.\\d+", ["1", "1.", "1.5", ".5", ".", ""]),
        ("[^a-c\\s]x?", ["d", "dx", "a", " x", "x"]),
        ("é+€?", ["é", "éé€", "€"]),
    ],
)
def test_regex_to_gbnf_full_match_agrees_with_python_re(pattern, texts):
    grammar = regex_to_gbnf(pattern)
    got = engines.check_artefact("llama.cpp", "regex", grammar, [[t] for t in texts])
    assert got == [re.fullmatch(pattern, t) is not None for t in texts]


def test_regex_backreference_is_unsupported():
    with pytest.raises(Unsupported):
        regex_to_gbnf("(a)\\1")


def test_the_private_regex_parser_names_gbnf_uses_are_still_there():
    """The fence around ``re._parser``/``re._constants`` (jobs/compile/gbnf.py): a Python release that moves
    one of the names the converter uses fails here, not in a user's compile."""
    import importlib

    from synapse_cli.jobs.compile.gbnf import PRIVATE_RE_NAMES

    missing = [f"{module}.{name}" for module, names in PRIVATE_RE_NAMES.items() for name in names
               if not hasattr(importlib.import_module(module), name)]  # fmt: skip
    assert missing == []
    parsed = list(importlib.import_module("re._parser").parse("a[0-9]+"))
    assert [str(op) for op, _ in parsed] == ["LITERAL", "MAX_REPEAT"]


def test_the_private_xgrammar_check_the_recheck_uses_is_still_there():
    """The fence around xgrammar's private acceptance check (jobs/compile/engines.py): an xgrammar release
    that drops or reshapes it fails here, rather than silently turning the re-check off."""
    require("xgrammar", reason="xgrammar is not installed (docs/compile.md)")
    import importlib

    from synapse_cli.jobs.compile.engines import XGRAMMAR_PRIVATE, _xgrammar

    module, name = XGRAMMAR_PRIVATE
    accepts = getattr(importlib.import_module(module), name)
    grammar = _xgrammar().Grammar.from_ebnf('root ::= "a" [0-9]+')
    assert accepts(grammar, "a12") is True and accepts(grammar, "b1") is False
