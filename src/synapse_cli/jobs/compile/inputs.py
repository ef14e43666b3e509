"""Inputs -> compile units, or one-line errors naming the file and the JSON pointer.

An input file is one of:
- a JSON Schema (draft-04 to 2020-12; checked against its draft's meta-schema);
- a schema with labelled instances, ``{"schema": ..., "tests": [{"data", "valid"}]}``
  (the JSONSchemaBench / JSON-Schema-Test-Suite record shape);
- a constraint set, ``{"name", "constraints": [{"name", "kind", "severity", "description",
  "schema"|"pattern"|"grammar"}]}``: each constraint is compiled as ``SET.CONSTRAINT``;
- a ``.jsonl`` file of such records, one input per line (named by its ``id``).
A directory stands for its ``*.json`` and ``*.jsonl`` files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from synapse_cli.errors import one_line
from synapse_cli.jobs.compile.normalize import InputError, detect_draft, normalize, pointer_of, walk

KINDS = ("json_schema", "regex", "grammar")
_PAYLOAD_KEY = {"json_schema": "schema", "regex": "pattern", "grammar": "grammar"}


@dataclass
class Unit:
    """One thing to compile: a schema, a regex or a grammar, with its labelled instances."""

    name: str
    source: str  # "path", "path:LINE" or "path#/constraints/2"
    kind: str
    payload: Any  # normalized schema | pattern | grammar text
    tests: list[dict[str, Any]] = field(default_factory=list)
    severity: str = "error"
    description: str | None = None
    content_hash: str = ""


@dataclass
class BadInput:
    source: str
    name: str
    message: str  # one line: "FILE#POINTER: what is wrong"


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "input"
    return name[:120]


def content_hash(kind: str, payload: Any) -> str:
    blob = json.dumps({"kind": kind, "payload": payload}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def expand(paths: list[str], names: list[str] | None = None) -> list[tuple[Path, str]]:
    """Files named, and the ``*.json``/``*.jsonl`` files of directories named, in order, each with
    its label: the path under the name the user gave its input (``names[i]`` for ``paths[i]``;
    default: the path itself). A remote run reads staged copies and still reports the user's paths."""
    out: list[tuple[Path, str]] = []
    for raw, name in zip(paths, names if names is not None else paths):
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".json", ".jsonl"))
            out.extend((f, name.rstrip("/") + "/" + f.name if "://" in name else str(Path(name) / f.name)) for f in files)
        else:
            out.append((p, name if "://" in name else str(Path(name))))  # a URL keeps its //
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".schema.json", ".json", ".jsonl"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem or name


# Optional memo of checked-and-normalized schemas (the compile cache): the meta-schema check is
# most of a cache hit's time, and an unchanged schema (same bytes, same file) passed it before.
Memo = Any


def load(path: Path, memo: Memo = None, label: str | None = None) -> Iterator[Unit | BadInput]:
    """The units of one input file (several for a constraint set or a JSONL file); ``label`` (default:
    the path) is what their ``source`` and messages call the file."""
    label = str(path) if label is None else label
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        yield BadInput(label, _stem(path), f"{label}: no such file")
        return
    except (OSError, UnicodeDecodeError) as exc:
        yield BadInput(label, _stem(path), f"{label}: cannot read: {getattr(exc, 'strerror', None) or exc}")
        return
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{label}:{lineno}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadInput(where, f"{_stem(path)}-{lineno}", f"{where}: not JSON: {exc.msg} (column {exc.colno})")
                continue
            default = f"{_stem(path)}-{lineno}"
            name = safe_name(doc.get("id", default)) if isinstance(doc, dict) else default
            yield from _document(doc, where, name, path, memo)
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        yield BadInput(label, _stem(path), f"{label}: not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})")
        return
    yield from _document(doc, label, safe_name(_stem(path)), path, memo)


def _document(doc: Any, where: str, name: str, path: Path | None, memo: Memo = None) -> Iterator[Unit | BadInput]:
    try:
        if isinstance(doc, dict) and isinstance(doc.get("constraints"), list) and "type" not in doc:
            units = list(_constraint_set(doc, where, name, path, memo))
        elif isinstance(doc, dict) and "schema" in doc and isinstance(doc.get("tests"), list):
            tests = _tests(doc["tests"], "/tests", "json_schema")
            units = [_schema_unit(doc["schema"], "/schema", where, name, path, tests, memo)]
        else:
            units = [_schema_unit(doc, "", where, name, path, [], memo)]
    except InputError as exc:
        sep = "#" if exc.pointer else ""
        yield BadInput(where, name, f"{where}{sep}{exc.pointer}: {exc.message}")
        return
    yield from units


def _tests(tests: Any, ptr: str, kind: str) -> list[dict[str, Any]]:
    if not isinstance(tests, list):
        raise InputError(ptr, "tests must be a list")
    out = []
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "data" not in t or not isinstance(t.get("valid"), bool):
            raise InputError(f"{ptr}/{i}", 'a test needs "data" and a boolean "valid"')
        if kind != "json_schema" and not isinstance(t["data"], str):
            raise InputError(f"{ptr}/{i}/data", f"a {kind} test's data must be a string")
        out.append({"data": t["data"], "valid": t["valid"], "description": str(t.get("description", ""))})
    return out


_VALIDATORS = None


def check_schema(schema: Any, ptr: str) -> None:
    """Meta-schema check for the schema's own draft, then every regex in it."""
    import jsonschema
    from jsonschema.exceptions import best_match

    if not isinstance(schema, (dict, bool)):
        raise InputError(ptr, f"not a JSON Schema: expected an object or a boolean, got {type(schema).__name__}")
    if isinstance(schema, bool):
        return
    classes = {4: jsonschema.Draft4Validator, 6: jsonschema.Draft6Validator, 7: jsonschema.Draft7Validator,
               2019: jsonschema.Draft201909Validator, 2020: jsonschema.Draft202012Validator}
    cls = classes[detect_draft(schema)]
    # no format checker: patterns are checked below, by an engine when Python's re cannot read them
    error = best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if error is not None:
        raise InputError(ptr + pointer_of(error.absolute_path), f"not a valid JSON Schema: {one_line(error.message, 160)}")
    for path, node in walk(schema):
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            check_regex(pattern, ptr + pointer_of(path + ("pattern",)))
        for key in node.get("patternProperties", {}) or {}:
            check_regex(key, ptr + pointer_of(path + ("patternProperties", key)))


def check_regex(pattern: str, ptr: str) -> None:
    """Accept a regex that Python's ``re`` or llguidance's Rust regex parser reads; else an InputError."""
    try:
        re.compile(pattern)
        return
    except re.error as exc:
        first = str(exc)
    try:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
        if not llguidance.LLMatcher.validate_grammar(grammar):
            return
    except ImportError:
        pass
    raise InputError(ptr, f"regex {pattern!r} does not parse: {first}")


def _schema_unit(schema: Any, ptr: str, where: str, name: str, path: Path | None, tests: list, memo: Memo = None) -> Unit:
    memo_key = None
    if memo is not None and not _has_file_refs(schema):
        raw = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        memo_key = hashlib.sha256(f"input\0{_code_hash()}\0{path.resolve() if path else ''}\0{raw}".encode()).hexdigest()
        hit = memo.get(memo_key)
        if hit is not None and "normalized" in hit:
            normalized = hit["normalized"]
            return Unit(name, where, "json_schema", normalized, tests, content_hash=content_hash("json_schema", normalized))
    check_schema(schema, ptr)
    try:
        normalized = normalize(schema, path)
    except InputError as exc:
        raise InputError(ptr + exc.pointer, exc.message) from None
    except RecursionError:
        raise InputError(ptr, "schema nests too deeply") from None
    if memo_key is not None:
        memo.put(memo_key, {"normalized": normalized})
    return Unit(name, where, "json_schema", normalized, tests, content_hash=content_hash("json_schema", normalized))


_CODE_HASH: str | None = None


def _code_hash() -> str:
    """Our normalisation code: a change to it invalidates memoized inputs."""
    global _CODE_HASH
    if _CODE_HASH is None:
        h = hashlib.sha256()
        for name in ("normalize.py", "inputs.py"):
            try:
                h.update((Path(__file__).parent / name).read_bytes())
            except OSError:
                pass
        _CODE_HASH = h.hexdigest()[:16]
    return _CODE_HASH


def _has_file_refs(schema: Any) -> bool:
    """A $ref to another file: that file may change while this one does not, so never memoize."""
    for _, node in walk(schema):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return True
    return False


def _constraint_set(doc: dict, where: str, fallback: str, path: Path | None, memo: Memo = None) -> Iterator[Unit]:
    set_name = doc.get("name", fallback)
    if not isinstance(set_name, str) or not set_name:
        raise InputError("/name", "a constraint set needs a non-empty string name")
    seen: set[str] = set()
    units = []
    for i, c in enumerate(doc["constraints"]):
        ptr = f"/constraints/{i}"
        if not isinstance(c, dict):
            raise InputError(ptr, "a constraint must be an object")
        cname = c.get("name")
        if not isinstance(cname, str) or not cname:
            raise InputError(ptr + "/name", "a constraint needs a non-empty string name")
        if safe_name(cname) in seen:
            raise InputError(ptr + "/name", f"duplicate constraint name {cname!r}")
        seen.add(safe_name(cname))
        kind = c.get("kind")
        if kind not in KINDS:
            raise InputError(ptr + "/kind", f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        severity = c.get("severity", "error")
        if severity not in ("error", "warning"):
            raise InputError(ptr + "/severity", f"severity must be error or warning, got {severity!r}")
        key = _PAYLOAD_KEY[kind]
        if key not in c:
            raise InputError(ptr, f"a {kind} constraint needs {key!r}")
        tests = _tests(c.get("tests", []), ptr + "/tests", kind)
        unit_name = f"{safe_name(set_name)}.{safe_name(cname)}"
        desc = c.get("description")
        if kind == "json_schema":
            unit = _schema_unit(c[key], f"{ptr}/{key}", where, unit_name, path, tests, memo)
        else:
            payload = c[key]
            if not isinstance(payload, str) or not payload:
                raise InputError(f"{ptr}/{key}", f"{key} must be a non-empty string")
            if kind == "regex":
                check_regex(payload, f"{ptr}/{key}")
            else:
                _check_grammar(payload, f"{ptr}/{key}")
            unit = Unit(unit_name, where, kind, payload, tests, content_hash=content_hash(kind, payload))
        unit.severity = severity
        unit.description = desc if isinstance(desc, str) else None
        unit.source = f"{where}#{ptr}"
        units.append(unit)
    yield from units


def _check_grammar(text: str, ptr: str) -> None:
    try:
        import llguidance
        from llguidance.gbnf_to_lark import any_to_lark
    except ImportError:
        return
    try:
        lark = any_to_lark(text)
    except Exception as exc:
        raise InputError(ptr, f"grammar does not parse: {one_line(exc, 160)}") from None
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(lark))
    if error:
        raise InputError(ptr, f"grammar does not parse: {one_line(error, 160)}")
