"""Inputs and normalisation: drafts unified, references bundled, bad input named by file and pointer.

In-process, no engines compiled (llguidance is only asked to parse a regex Python cannot).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")  # the compile extra

from synapse_cli.jobs.compile.inputs import BadInput, Unit, expand, load  # noqa: E402 (after the importorskip above)
from synapse_cli.jobs.compile.normalize import normalize, strip_keywords  # noqa: E402

DATA = Path(__file__).parent / "data" / "compile"


def one(path: Path):
    items = list(load(path))
    assert len(items) == 1
    return items[0]


def test_draft07_becomes_2020_12_with_defs_and_same_meaning():
    unit = one(DATA / "person.json")
    assert isinstance(unit, Unit) and unit.kind == "json_schema" and unit.name == "person"
    s = unit.payload
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "definitions" not in s and set(s["$defs"]) == {"address"}
    assert s["properties"]["address"] == {"$ref": "#/$defs/address"}
    jsonschema.Draft202012Validator.check_schema(s)
    original = jsonschema.Draft7Validator(json.loads((DATA / "person.json").read_text()))
    upgraded = jsonschema.Draft202012Validator(s)
    for line in (DATA / "person.checks.jsonl").read_text().splitlines():
        case = json.loads(line)
        assert original.is_valid(case["data"]) == upgraded.is_valid(case["data"]) == case["valid"], case["description"]


def test_draft04_exclusive_bounds_items_array_and_dependencies():
    s = normalize({
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "object",
        "properties": {
            "n": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 5},
            "pair": {"type": "array", "items": [{"type": "string"}, {"type": "integer"}], "additionalItems": False},
        },
        "dependencies": {"a": ["b"], "c": {"required": ["d"]}},
    })
    assert s["properties"]["n"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 5}
    assert s["properties"]["pair"] == {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}
    assert s["dependentRequired"] == {"a": ["b"]} and s["dependentSchemas"] == {"c": {"required": ["d"]}}


def test_ref_siblings_dropped_before_2019_kept_after():
    old = normalize({"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"x": {"type": "string"}},
                     "properties": {"a": {"$ref": "#/definitions/x", "maxLength": 1}}})
    assert old["properties"]["a"] == {"$ref": "#/$defs/x"}
    new = normalize({"$defs": {"x": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/x", "maxLength": 1}}})
    assert new["properties"]["a"] == {"$ref": "#/$defs/x", "maxLength": 1}


def test_relative_file_ref_and_deep_pointer_are_bundled():
    unit = one(DATA / "order.json")
    s = unit.payload
    ref = s["properties"]["items"]["items"]["$ref"]
    assert ref.startswith("#/$defs/")
    line = s["$defs"][ref[len("#/$defs/"):]]
    assert line["required"] == ["sku", "qty"]
    v = jsonschema.Draft202012Validator(s)
    assert v.is_valid({"id": 1, "items": [{"sku": "a", "qty": 1}]})
    assert not v.is_valid({"id": 1, "items": [{"sku": "a", "qty": 0}]})
    # a pointer into the middle of the document becomes its own $defs entry
    s2 = normalize({"properties": {"a": {"type": "integer"}, "b": {"$ref": "#/properties/a"}}})
    target = s2["properties"]["b"]["$ref"]
    assert s2["$defs"][target.rsplit("/", 1)[1]] == {"type": "integer"}


def test_recursive_root_ref_and_id_based_ref():
    s = normalize({"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}})
    assert s["properties"]["kids"]["items"] == {"$ref": "#"}
    s = normalize({"$id": "https://example.com/root.json", "$defs": {"leaf": {"$id": "leaf.json", "type": "string"}},
                   "properties": {"l": {"$ref": "https://example.com/leaf.json"}}})
    name = s["properties"]["l"]["$ref"].rsplit("/", 1)[1]
    assert s["$defs"][name] == {"type": "string"} and "$id" not in json.dumps(s)


@pytest.mark.parametrize(
    "fname,expected",
    [
        ("not-json.json", "not-json.json: not JSON: Expecting ',' delimiter (line 2 column 1)"),
        ("not-schema.json", "not-schema.json#/type: not a valid JSON Schema:"),
        ("bad-ref.json", "bad-ref.json#/properties/a/$ref: unresolvable $ref '#/$defs/missing'"),
        ("bad-regex.json", "bad-regex.json#/pattern: regex '(?<=a)b[' does not parse"),
    ],
)
def test_bad_input_is_one_line_with_file_and_pointer(fname, expected):
    item = one(DATA / fname)
    assert isinstance(item, BadInput)
    assert "\n" not in item.message
    assert item.message.startswith(str(DATA / expected.split(":")[0].split("#")[0]))
    assert expected.split(fname, 1)[1] in item.message


def test_ecmascript_regex_python_cannot_read_is_accepted_via_the_engine():
    import re

    pytest.importorskip("llguidance")
    for pattern in ("^\\p{Lu}+$", "^\\p{Bogus}+$"):
        with pytest.raises(re.error):  # neither reaches the engine's verdict through Python's re
            re.compile(pattern)
    unit = one_doc({"type": "string", "pattern": "^\\p{Lu}+$"})
    assert isinstance(unit, Unit) and unit.payload["pattern"] == "^\\p{Lu}+$"
    # the engine decides: a Unicode property it does not know is still refused, at the pattern's pointer
    bad = one_doc({"type": "string", "pattern": "^\\p{Bogus}+$"})
    assert isinstance(bad, BadInput) and "#/pattern: regex '^\\\\p{Bogus}+$' does not parse" in bad.message, bad.message


def one_doc(doc, tmp=[0]):  # noqa: B006 - a counter
    import tempfile

    d = Path(tempfile.mkdtemp())
    p = d / "doc.json"
    p.write_text(json.dumps(doc))
    return one(p)


def test_constraint_set_becomes_one_unit_per_constraint():
    items = list(load(DATA / "guardrails.json"))
    assert [(u.name, u.kind, u.severity) for u in items] == [
        ("guardrails.answer", "json_schema", "error"),
        ("guardrails.ticket", "regex", "warning"),
        ("guardrails.yesno", "grammar", "error"),
    ]
    assert items[1].source.endswith("guardrails.json#/constraints/1") and len(items[1].tests) == 3


def test_bad_constraint_names_its_pointer(tmp_path):
    p = tmp_path / "set.json"
    p.write_text(json.dumps({"name": "s", "constraints": [{"name": "a", "kind": "regex", "pattern": "a"},
                                                          {"name": "b", "kind": "sql", "pattern": "x"}]}))
    item = one(p)
    assert isinstance(item, BadInput) and item.message == f"{p}#/constraints/1/kind: kind must be one of json_schema, regex, grammar, got 'sql'"


def test_jsonl_records_are_units_named_by_id_and_directories_expand(tmp_path):
    items = list(load(DATA / "maskbench-sample.jsonl"))
    assert len(items) == 6 and all(isinstance(u, Unit) and u.tests for u in items)
    assert items[0].name == "Github_easy---o10014" and items[0].source.endswith("maskbench-sample.jsonl:1")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "b.schema.json").write_text("true")
    assert [(p.name, label) for p, label in expand([str(tmp_path)])] == [("a.json", str(tmp_path / "a.json")), ("b.schema.json", str(tmp_path / "b.schema.json"))]
    assert [label for _, label in expand([str(tmp_path)], ["given"])] == ["given/a.json", "given/b.schema.json"]  # a staged copy, named as the user named it
    assert one(tmp_path / "b.schema.json").name == "b"


def test_strip_keywords_turns_oneof_into_anyof():
    s = {"oneOf": [{"type": "integer"}, {"minimum": 0}], "properties": {"a": {"uniqueItems": True, "type": "array"}}}
    assert strip_keywords(s, {"oneOf", "uniqueItems"}) == {
        "anyOf": [{"type": "integer"}, {"minimum": 0}], "properties": {"a": {"type": "array"}}}


class DictMemo(dict):
    def put(self, key, value):
        self[key] = value


def test_memo_skips_the_meta_schema_check_for_an_unchanged_file_but_not_file_refs():
    memo = DictMemo()
    first = one_memo(DATA / "person.json", memo)
    assert len(memo) == 1
    key = next(iter(memo))
    assert memo[key] == {"normalized": first.payload}  # what a miss stores is the checked, normalized schema
    memo[key] = {"normalized": {"marker": True}}  # what the memo says is what a hit returns
    assert one_memo(DATA / "person.json", memo).payload == {"marker": True}
    assert first.payload != {"marker": True}
    before = dict(memo)
    one_memo(DATA / "order.json", memo)  # refers to line.json, which may change on its own
    assert memo == before


def test_memo_misses_when_the_file_changes(tmp_path):
    """Same path, new content: checked again, so an edit that breaks the schema is reported, not served stale."""
    memo = DictMemo()
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert one_memo(path, memo).payload["properties"]["a"] == {"type": "integer"}
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))
    assert one_memo(path, memo).payload["properties"]["a"] == {"type": "string"} and len(memo) == 2
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"type": 5}}}))
    assert isinstance(one_memo(path, memo), BadInput)


def one_memo(path, memo):
    items = list(load(path, memo))
    assert len(items) == 1
    return items[0]
