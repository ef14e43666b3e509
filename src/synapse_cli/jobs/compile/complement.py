"""The complement of a schema where the engines' keywords can write one (types, const/enum, required,
simple bounds, patterns of known form), and the shared pieces of ``lower``: ``anyOf``/``allOf`` builders,
``$ref`` resolution and regexes over words. ``complement`` raises ``_GiveUp`` where no complement can be written."""

from __future__ import annotations

import copy
from typing import Any

from synapse_cli.jobs.compile.normalize import VALIDATION_KEYWORDS


ALL_TYPES = ("null", "boolean", "object", "array", "number", "string")


MAX_ONEOF = 6  # oneOf branches made exclusive by complements


_ANNOTATION = frozenset(("title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "contentMediaType", "contentEncoding", "contentSchema", "$anchor",
                         "$dynamicAnchor", "$id", "$schema", "$vocabulary"))


class _GiveUp(Exception):
    """This rewrite does not apply here: the keyword stays as it is."""


def _resolve(ref: Any, root: Any) -> Any:
    if ref == "#":
        return root
    if isinstance(ref, str) and ref.startswith("#/$defs/") and isinstance(root, dict):
        name = ref[len("#/$defs/"):].replace("~1", "/").replace("~0", "~")
        defs = root.get("$defs") or {}
        if name in defs:
            return defs[name]
    raise _GiveUp(f"unresolvable {ref!r}")


def _other_types(*keep: str) -> list[str]:
    return [t for t in ALL_TYPES if t not in keep]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _anyof(alts: list[Any]) -> Any:
    """anyOf with the trivial cases folded."""
    out = []
    for a in alts:
        if a is True or a == {}:
            return True
        if a is False:
            continue
        out.append(a)
    if not out:
        return False
    return out[0] if len(out) == 1 else {"anyOf": out}


def _allof(parts: list[Any]) -> Any:
    out = []
    for p in parts:
        if p is False:
            return False
        if p is True or p == {}:
            continue
        out.append(p)
    if not out:
        return True
    return out[0] if len(out) == 1 else {"allOf": out}


_META = set("\\.+*?()|[]{}^$#&-~")


def _rx_text(s: str) -> str:
    """A regex matching ``s`` exactly, in the syntax Python's ``re`` and Rust's ``regex`` read alike."""
    return "".join("\\" + ch if ch in _META else ch if 0x20 <= ord(ch) < 0x7F else _rx_cp(ord(ch)) for ch in s)


def _rx_cp(cp: int) -> str:
    return f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"


def _rx_class_char(ch: str) -> str:
    return "\\" + ch if ch in "\\]^-[&~|" else ch if 0x20 < ord(ch) < 0x7F else _rx_cp(ord(ch))


def not_in_words(words: list[str]) -> str:
    """A full-match regex (``^...$``) for every string that is none of ``words``."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def other(node: dict) -> str:
        alts = []
        if "" not in node:
            alts.append("")
        kids = [c for c in node if c]
        for c in kids:
            alts.append(_rx_text(c) + other(node[c]))
        if kids:
            alts.append("[^" + "".join(_rx_class_char(c) for c in kids) + "][\\s\\S]*")
        else:
            alts.append("[\\s\\S]+")
        return "(?:" + "|".join(alts) + ")"

    return "^" + other(trie) + "$"


def in_words(words: list[str]) -> str:
    return "^(?:" + "|".join(_rx_text(w) for w in words) + ")$"


class _Complement:
    def __init__(self, root: Any) -> None:
        self.root = root

    def of(self, s: Any, depth: int = 0) -> Any:
        """A schema valid exactly where ``s`` is not; raises _GiveUp when none is written."""
        if depth > 16:
            raise _GiveUp("too deep")
        if s is True or s == {}:
            return False
        if s is False:
            return True
        if not isinstance(s, dict):
            raise _GiveUp("not a schema")
        body = {k: v for k, v in s.items() if k in VALIDATION_KEYWORDS or k not in _ANNOTATION | {"$defs"}}
        unknown = [k for k in body if k not in VALIDATION_KEYWORDS]
        body = {k: v for k, v in body.items() if k not in unknown}  # unknown keywords are annotations
        if not body:
            return False
        alts = []
        obj = {k: body.pop(k) for k in ("properties", "patternProperties", "additionalProperties") if k in body}
        if obj:
            alts.append(self._object(obj, depth))
        arr = {k: body.pop(k) for k in ("prefixItems", "items") if k in body}
        if arr:
            alts.append(self._array(arr, depth))
        cont = {k: body.pop(k) for k in ("contains", "minContains", "maxContains") if k in body}
        if cont:
            alts.append(self._contains(cont, depth))
        cond = {k: body.pop(k) for k in ("if", "then", "else") if k in body}
        if "if" in cond:
            i, t, e = cond["if"], cond.get("then", True), cond.get("else", True)
            # not((I and T) or (not I and E)) = (I and not T) or (not I and not E)
            alts.append(_anyof([_allof([i, self.of(t, depth + 1)]), _allof([self.of(i, depth + 1), self.of(e, depth + 1)])]))
        for key, value in body.items():
            alts.append(self._keyword(key, value, body, depth))
        return _anyof(alts)

    def _keyword(self, key: str, value: Any, body: dict, depth: int) -> Any:
        if key == "type":
            types = {value} if isinstance(value, str) else set(value) if isinstance(value, list) else None
            if types is None:
                raise _GiveUp("type")
            if "integer" in types and "number" not in types:
                raise _GiveUp("non-integer numbers")
            rest = _other_types(*types, *(("number",) if "number" in types else ()))
            return {"type": rest} if rest else False
        if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and _number(value):
            flip = {"minimum": "exclusiveMaximum", "maximum": "exclusiveMinimum",
                    "exclusiveMinimum": "maximum", "exclusiveMaximum": "minimum"}[key]
            return {"type": "number", flip: value}  # other types satisfy the bound
        for kind, lo, hi in (("string", "minLength", "maxLength"), ("array", "minItems", "maxItems"),
                             ("object", "minProperties", "maxProperties")):
            if key in (lo, hi) and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                if key == lo:
                    return False if value == 0 else {"type": kind, hi: value - 1}
                return {"type": kind, lo: value + 1}
        if key == "required" and isinstance(value, list):
            names = [n for n in value if isinstance(n, str)]
            if not names:
                return False
            return _anyof([{"type": "object", "properties": {n: False}} for n in names])
        if key == "dependentRequired" and isinstance(value, dict):
            alts = []
            for trigger, needs in value.items():
                for n in needs:
                    alts.append({"type": "object", "required": [trigger], "properties": {n: False}})
            return _anyof(alts)
        if key == "dependentSchemas" and isinstance(value, dict):
            return _anyof([_allof([{"type": "object", "required": [t]}, self.of(d, depth + 1)]) for t, d in value.items()])
        if key == "const":
            return self._values([value])
        if key == "enum" and isinstance(value, list):
            return self._values(value)
        if key == "allOf" and isinstance(value, list):
            return _anyof([self.of(b, depth + 1) for b in value])
        if key == "anyOf" and isinstance(value, list):
            return _allof([self.of(b, depth + 1) for b in value])
        if key == "not":
            return copy.deepcopy(value)
        if key == "$ref":
            return self.of(_resolve(value, self.root), depth + 1)
        if key == "oneOf" and isinstance(value, list) and len(value) <= MAX_ONEOF:
            # not exactly one: none, or two at once
            negs = [self.of(b, depth + 1) for b in value]
            pairs = [_allof([value[i], value[j]]) for i in range(len(value)) for j in range(i + 1, len(value))]
            return _anyof([_allof(negs)] + pairs)
        raise _GiveUp(key)

    def _values(self, values: list) -> Any:
        """Every value that is none of ``values`` (numbers by value)."""
        by_type: dict[str, list] = {}
        for v in values:
            t = ("null" if v is None else "boolean" if isinstance(v, bool) else "number" if _number(v)
                 else "string" if isinstance(v, str) else "other")
            if t == "other":
                raise _GiveUp("object or array value")
            by_type.setdefault(t, []).append(v)
        alts: list[Any] = [{"type": _other_types(*by_type, *(("integer",) if "number" in by_type else ()))}]
        if "boolean" in by_type:
            left = [b for b in (False, True) if b not in by_type["boolean"]]
            if left:
                alts.append({"const": left[0]})
        if "string" in by_type:
            alts.append({"type": "string", "pattern": not_in_words(sorted(set(by_type["string"])))})
        if "number" in by_type:
            points = sorted(set(by_type["number"]))
            alts.append({"type": "number", "exclusiveMaximum": points[0]})
            alts.append({"type": "number", "exclusiveMinimum": points[-1]})
            for a, b in zip(points, points[1:]):
                alts.append({"type": "number", "exclusiveMinimum": a, "exclusiveMaximum": b})
        if alts[0]["type"] == []:
            alts = alts[1:]
        return _anyof(alts)

    def _object(self, obj: dict, depth: int) -> Any:
        if set(obj) != {"properties"} or not isinstance(obj["properties"], dict):
            raise _GiveUp("patternProperties or additionalProperties")
        alts: list[Any] = []
        for name, sub in obj["properties"].items():
            neg = self.of(sub, depth + 1)
            if neg is not False:
                alts.append({"type": "object", "required": [name], "properties": {name: neg}})
        return _anyof(alts)

    def _array(self, arr: dict, depth: int) -> Any:
        raise _GiveUp("items")

    def _contains(self, cont: dict, depth: int) -> Any:
        if set(cont) != {"contains"}:
            raise _GiveUp("minContains/maxContains")
        return {"type": "array", "items": self.of(cont["contains"], depth + 1)}


def complement(schema: Any, root: Any = None) -> Any:
    """A schema whose valid instances are exactly the instances ``schema`` rejects, or None."""
    try:
        return _Complement(root if root is not None else schema).of(schema)
    except (_GiveUp, RecursionError):
        return None
