"""Engine-specific schema rewrites: make an engine enforce what it would otherwise drop, and say what it still drops.

outlines-core 0.2.14 (``json_schema/parsing.rs``) turns a schema object into a regex by the
*first* of these keywords it holds, and ignores every other keyword of that object:

    {} | properties | allOf | anyOf | oneOf | prefixItems | enum | const | $ref | type

Measured consequences (each was a wrong accept the report did not explain):

- ``allOf`` branches are concatenated, not intersected (``allOf: [{}, {type: number}]`` accepts
  ``"foo"``), and an ``allOf`` beside ``properties`` is dropped;
- an empty subschema ``{}`` becomes an unparenthesised alternation, so ``prefixItems: [{}, {}]``
  or ``allOf: [{}, X]`` accept almost anything;
- an ``enum`` or ``const`` is enforced while its sibling ``type``, ``maxLength``... are not;
- the siblings of ``$ref`` are dropped (``{$ref: array, maxItems: 2}`` accepts 3 items);
- ``prefixItems`` always means exactly that many items (``items``, ``minItems``, ``maxItems`` unread);
- a string with ``minLength``/``maxLength`` drops its ``pattern`` and ``format``.

``for_outlines`` rewrites the schema into an equivalent one that outlines reads fully where it
can (``allOf`` merged into its parent, siblings distributed into ``anyOf``/``oneOf`` branches,
``$ref`` targets inlined beside their siblings, ``enum`` values that the siblings reject removed,
``{}`` wrapped in ``anyOf``), and ``outlines_dropped`` lists what is still dropped.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from synapse_cli.jobs.compile.normalize import SUB_LIST, SUB_MAP, SUB_ONE, VALIDATION_KEYWORDS, walk

# outlines-core's dispatch order: the first of these keys in an object decides how it is compiled
DISPATCH = ("properties", "allOf", "anyOf", "oneOf", "prefixItems", "enum", "const", "$ref", "type")

_LOWER = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties", "minContains")
_UPPER = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties", "maxContains")
_TYPES = ("null", "boolean", "object", "array", "number", "string", "integer")
_MAX_PASSES = 4


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _types(value: Any) -> set[str] | None:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return set(value)
    return None


def _type_meet(a: Any, b: Any) -> Any:
    """Intersection of two ``type`` values (``integer`` is a ``number``); None when empty or unreadable."""
    ta, tb = _types(a), _types(b)
    if ta is None or tb is None:
        return None
    out = (ta & tb) | ({"integer"} if ("integer" in ta and "number" in tb) or ("number" in ta and "integer" in tb) else set())
    if "number" in out and "integer" in out and not ("number" in ta and "number" in tb):
        out.discard("number")
    if not out:
        return None
    ordered = [t for t in _TYPES if t in out]
    return ordered[0] if len(ordered) == 1 else ordered


def _closed(node: dict) -> bool:
    """Does the node restrict properties beyond those it names (so names from elsewhere change its meaning)?"""
    for key in ("additionalProperties", "unevaluatedProperties"):
        if key in node and node[key] not in (True, {}):
            return True
    return False


def merge(a: Any, b: Any) -> dict | None:
    """One schema meaning ``a`` and ``b`` both hold, when it is plain to build; else None."""
    if b is True or b == {}:
        return dict(a) if isinstance(a, dict) else None
    if a is True or a == {}:
        return dict(b) if isinstance(b, dict) else None
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    a = {k: v for k, v in a.items() if k in VALIDATION_KEYWORDS}
    b = {k: v for k, v in b.items() if k in VALIDATION_KEYWORDS}
    # keywords whose meaning depends on their neighbours in the same object
    for x, y in ((a, b), (b, a)):
        if _closed(x) and (set(y.get("properties") or {}) - set(x.get("properties") or {}) or "patternProperties" in y):
            return None
        if "items" in x and "prefixItems" in y and _canon(x.get("prefixItems")) != _canon(y["prefixItems"]):
            return None
    out = dict(a)
    for key, value in b.items():
        if key not in out or _canon(out[key]) == _canon(value):
            out[key] = value
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = out[key] + [r for r in value if r not in out[key]]
        elif key == "properties" and isinstance(value, dict) and isinstance(out[key], dict):
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = sub if name not in props or _canon(props[name]) == _canon(sub) else {"allOf": [props[name], sub]}
            out[key] = props
        elif key == "type":
            meet = _type_meet(out[key], value)
            if meet is None:
                return None
            out[key] = meet
        elif key in _LOWER and _number(value) and _number(out[key]):
            out[key] = max(out[key], value)
        elif key in _UPPER and _number(value) and _number(out[key]):
            out[key] = min(out[key], value)
        elif key == "enum" and isinstance(value, list) and isinstance(out[key], list):
            theirs = {_canon(v) for v in value}
            out[key] = [v for v in out[key] if _canon(v) in theirs]
        elif key == "allOf" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = out[key] + value
        else:
            return None
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _target(ref: Any, root: Any) -> Any:
    if ref == "#":
        return root
    if isinstance(ref, str) and ref.startswith("#/$defs/") and isinstance(root, dict):
        name = ref[len("#/$defs/"):].replace("~1", "/").replace("~0", "~")
        return (root.get("$defs") or {}).get(name)
    return None


class _Outlines:
    def __init__(self, root: dict) -> None:
        self.root = root
        self._validator: Any = None

    def validator(self) -> Any:
        if self._validator is None:
            import jsonschema

            self._validator = jsonschema.Draft202012Validator(self.root)
        return self._validator

    def holds(self, value: Any, schema: dict) -> bool | None:
        """Is ``value`` valid against ``schema`` (refs resolved in the root)? None when we cannot tell."""
        try:
            return bool(self.validator().evolve(schema=schema).is_valid(value))
        except Exception:  # a pattern Python cannot read, an unresolvable ref
            return None

    def node(self, node: Any, top: bool = False) -> Any:
        if node is True or node == {}:
            return {} if top else {"anyOf": [{}]}  # parenthesised by outlines
        if not isinstance(node, dict):
            return node
        node = {k: v for k, v in node.items() if k in VALIDATION_KEYWORDS or (top and k == "$defs")}
        for _ in range(_MAX_PASSES):
            changed = self._step(node)
            if changed is None:
                break
            node = changed
        if not node and not top:
            return {"anyOf": [{}]}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in SUB_MAP and isinstance(value, dict):
                out[key] = {n: self.node(s) for n, s in value.items()}
            elif key in SUB_LIST and isinstance(value, list):
                out[key] = [self.node(s) for s in value]
            elif key in SUB_ONE and isinstance(value, dict):
                out[key] = self.node(value)
            else:
                out[key] = value
        return out

    def _step(self, node: dict) -> dict | None:
        """One rewrite of this object, or None when there is nothing more to do."""
        defs = {k: node[k] for k in ("$defs",) if k in node}
        body = {k: v for k, v in node.items() if k != "$defs"}
        # allOf: merge every branch into the object
        if isinstance(body.get("allOf"), list):
            merged: Any = {k: v for k, v in body.items() if k != "allOf"}
            for branch in body["allOf"]:
                if isinstance(branch, dict) and set(branch) == {"$ref"}:
                    target = _target(branch["$ref"], self.root)
                    if isinstance(target, dict) and target is not node:
                        branch = target
                merged = merge(merged, branch) if merged is not None else None
            if merged is not None:
                return {**merged, **defs}
        # $ref beside other keywords: inline its target
        if "$ref" in body and len(body) > 1:
            target = _target(body["$ref"], self.root)
            if isinstance(target, dict) and target is not self.root:
                merged = merge({k: v for k, v in target.items() if k != "$defs"}, {k: v for k, v in body.items() if k != "$ref"})
                if merged is not None:
                    return {**merged, **defs}
        # anyOf / oneOf beside other keywords: distribute the siblings into each branch
        for comb in ("anyOf", "oneOf"):
            if isinstance(body.get(comb), list) and len(body) > 1 and not ({"anyOf", "oneOf", "allOf"} - {comb}) & set(body):
                siblings = {k: v for k, v in body.items() if k != comb}
                branches = [merge(siblings, b) for b in body[comb]]
                if all(b is not None for b in branches):
                    return {comb: branches, **defs}
        # enum / const: drop the values that the siblings reject
        if isinstance(body.get("enum"), list) and len(body) > 1:
            rest = {k: v for k, v in body.items() if k != "enum"}
            kept = [v for v in body["enum"] if self.holds(v, rest) is not False]
            if len(kept) < len(body["enum"]) and kept:
                return {**body, "enum": kept, **defs}
        return None


def for_outlines(schema: Any) -> Any:
    """The schema rewritten so that outlines-core enforces as much of it as it can (same meaning)."""
    if not isinstance(schema, dict):
        return schema
    root = copy.deepcopy(schema)
    return _Outlines(root).node(root, top=True)


def outlines_dropped(schema: Any) -> set[str]:
    """Keywords of (the rewritten) ``schema`` that outlines-core's dispatch leaves unread.

    Per object: the first dispatch keyword wins and consumes what its branch reads; the
    other validation keywords of that object are dropped. ``enum``/``const`` whose values all
    satisfy their siblings drop nothing (every value the regex admits is valid).
    """
    if not isinstance(schema, dict):
        return set()
    checker = _Outlines(schema)
    dropped: set[str] = set()
    for _, node in walk(schema):
        keys = {k for k in node if k in VALIDATION_KEYWORDS}
        first = next((k for k in DISPATCH if k in keys), None)
        if first is None:
            continue  # empty, or outlines refuses it (an error, not a silent drop)
        types = _types(node.get("type")) or set()
        consumed = {first}
        if first == "properties":
            consumed |= {"required", "additionalProperties"}  # no other property is ever admitted
            if "object" in types:
                consumed.add("type")
        elif first == "allOf" and len(node["allOf"]) > 1:
            consumed = set()  # branches are concatenated: no intersection
        elif first == "prefixItems":
            n = len(node["prefixItems"]) if isinstance(node["prefixItems"], list) else 0
            consumed |= {"items"}  # exactly n items, never more
            if "array" in types:
                consumed.add("type")
            if _number(node.get("minItems")) and node["minItems"] <= n:
                consumed.add("minItems")
            if _number(node.get("maxItems")) and node["maxItems"] >= n:
                consumed.add("maxItems")
        elif first in ("enum", "const"):
            rest = {k: v for k, v in node.items() if k != first}
            values = node[first] if first == "enum" and isinstance(node[first], list) else [node.get(first)]
            if all(checker.holds(v, rest) for v in values):
                consumed = keys
        elif first == "type":
            consumed |= {"items", "minItems", "maxItems", "additionalProperties"}
            if "minLength" in keys or "maxLength" in keys:
                consumed |= {"minLength", "maxLength"}  # pattern and format are then unread
            elif "pattern" in keys:
                consumed.add("pattern")  # format is then unread
            else:
                consumed.add("format")
        dropped |= keys - consumed
    return dropped


# -- the text outlines-core embeds between quotes ----------------------------------------------
#
# outlines-core writes a string's ``pattern`` (``^``/``$`` stripped) and the regexes of its ``uri`` and
# ``email`` formats between the two quotes of a JSON string as they are: a class such as ``[^\s]`` or ``.``
# also matches ``"``, so the string can run past its closing quote and swallow the rest of the object
# (measured: ``"pattern": "^[^:\\s]+:[^:\\s]+(:[^\\s]+)?$"`` beside ``additionalProperties: false``
# accepted ``{"browserTarget": "a:b:c", "extra": "x"}``). Property names go in regex-escaped but not
# JSON-escaped. ``for_outlines_regex`` hands outlines-core text that already is what it embeds: each
# pattern translated to the JSON-escaped form of the strings it matches (search semantics, as JSON
# Schema means it), and property names written as they appear in JSON text.

# formats whose outlines-core regex can match a quote or a backslash: their shape, as a pattern
_QUOTE_UNSAFE_FORMATS = ("uri", "email")


class _EncodedRegex:
    """A JSON Schema ``pattern`` -> a regex over the JSON-escaped text of the strings it matches.

    Written in the syntax Python's ``re`` and Rust's ``regex`` (outlines-core) read alike: non-capturing
    groups, classes of ``\\uXXXX``/``\\UXXXXXXXX`` escapes, counted repeats. Raises ``gbnf.Unsupported``
    for what it cannot translate (flags, look-around, back-references, anchors inside the pattern).
    """

    def __init__(self, plain: bool = False) -> None:
        # inside a counted repeat ({m,n}) a character is matched only where JSON writes it as itself:
        # outlines-core's index grows exponentially with counted copies of "\"-escape alternatives at
        # the start of a regex (measured: "([^"\\]|\\["\\/bfnrt]){1,20}", outlines' own string regex
        # with a length, as a whole schema, runs for minutes; behind "{" it takes 4 ms)
        self.plain = plain

    def convert(self, pattern: str) -> str:
        from synapse_cli.jobs.compile import gbnf

        try:
            tree = gbnf._p.parse(pattern)
        except Exception as exc:  # re.error: \p{..} classes, ECMAScript-only syntax
            raise gbnf.Unsupported(f"cannot parse regex: {exc}") from None
        flags = tree.state.flags if hasattr(tree, "state") else 0
        if flags & (gbnf._c.SRE_FLAG_IGNORECASE | gbnf._c.SRE_FLAG_MULTILINE | gbnf._c.SRE_FLAG_VERBOSE | gbnf._c.SRE_FLAG_DOTALL):
            raise gbnf.Unsupported("regex flags are not supported")
        items = list(tree)
        if len(items) == 1 and items[0][0] is gbnf._c.BRANCH:
            branches = [list(b) for b in items[0][1][1]]
        else:
            branches = [items]
        anything = self._chars([(0, gbnf.MAX_CP)]) + "*"
        alts = []
        for branch in branches:
            start, end = _anchored(branch, 0), _anchored(branch, -1)
            alts.append(("" if start else anything) + self._seq(branch, start, end) + ("" if end else anything))
        return "(?:" + "|".join(alts) + ")"

    def _seq(self, items: Any, first: bool = False, last: bool = False) -> str:
        """``first``/``last``: the sequence starts/ends the string, so a ``^``/``$`` there is already satisfied."""
        n = len(items)
        return "".join(self._node(op, av, first and i == 0, last and i == n - 1) for i, (op, av) in enumerate(items))

    def _chars(self, ranges: list[tuple[int, int]]) -> str:
        """One character of a JSON string whose decoded value lies in ``ranges``, as ``json.dumps`` writes it."""
        from synapse_cli.jobs.compile import gbnf

        ranges = gbnf._norm_ranges(ranges)
        alts = []
        plain = gbnf._subtract(ranges, gbnf._JSON_SPECIAL + [(0xD800, 0xDFFF)])
        if plain:
            alts.append("[" + "".join(_cls(lo) if lo == hi else f"{_cls(lo)}-{_cls(hi)}" for lo, hi in plain) + "]")
        short: list[str] = []
        coded: dict[Any, Any] = {}  # \" \\ \n ... and \u00XX, grouped by the first hex digit
        for lo, hi in [] if self.plain else ranges:
            for spec_lo, spec_hi in gbnf._JSON_SPECIAL:
                for cp in range(max(lo, spec_lo), min(hi, spec_hi) + 1):
                    escaped = gbnf._json_escape(cp)
                    if len(escaped) == 2:
                        short.append(escaped[1])
                    else:
                        coded.setdefault(escaped[4], []).append(escaped[5])
        if short:
            alts.append("\\\\" + ("[" + "".join(_cls(ord(ch)) for ch in short) + "]" if len(short) > 1 else _text(short[0])))
        if coded:
            tails = [hi_digit + ("[" + "".join(lo_digits) + "]" if len(lo_digits) > 1 else lo_digits[0]) for hi_digit, lo_digits in coded.items()]
            alts.append("\\\\u00" + (tails[0] if len(tails) == 1 else "(?:" + "|".join(tails) + ")"))
        if not alts:
            raise gbnf.Unsupported("empty character class")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    def _node(self, op: Any, av: Any, first: bool = False, last: bool = False) -> str:
        from synapse_cli.jobs.compile import gbnf

        c = gbnf._c
        if op is c.AT and ((first and av in _BEGIN) or (last and av in _END)):
            return ""
        if op is c.LITERAL:
            return _text(gbnf._json_escape(av)) if av not in range(0xD800, 0xE000) else self._chars([])
        if op is c.NOT_LITERAL:
            return self._chars(gbnf._complement([(av, av)]))
        if op is c.ANY:
            return self._chars(gbnf._complement([(0x0A, 0x0A)]))
        if op is c.IN:
            return self._chars(gbnf.RegexToGbnf(json_string=True, char_rule="char")._in_ranges(av))
        if op is c.BRANCH:
            return "(?:" + "|".join(self._seq(b, first, last) for b in av[1]) + ")"
        if op is c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise gbnf.Unsupported("inline regex flags are not supported")
            return "(?:" + self._seq(sub, first, last) + ")"
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):  # lazy or greedy: the same language
            lo, hi, sub = av
            if hi == 0:
                return ""
            counted = (lo, hi) not in ((0, 1), (0, c.MAXREPEAT), (1, c.MAXREPEAT))
            outer, self.plain = self.plain, self.plain or counted
            try:
                inner = "(?:" + self._seq(sub) + ")"
            finally:
                self.plain = outer
            return gbnf.quantified(inner, lo, hi)
        name = getattr(op, "name", str(op))
        raise gbnf.Unsupported(f"regex construct {name} is not supported")


def _anchored(items: list, edge: int) -> bool:
    """Does the sequence begin (edge 0) or end (edge -1) with ``^``/``$`` on every path? Raises when only some paths do."""
    from synapse_cli.jobs.compile import gbnf

    c = gbnf._c
    if not items:
        return False
    op, av = items[edge]
    if op is c.AT:
        return av in (_BEGIN if edge == 0 else _END)
    if op is c.BRANCH:
        found = {_anchored(list(b), edge) for b in av[1]}
        if len(found) > 1:
            raise gbnf.Unsupported("an anchor on some alternatives only")
        return found.pop()
    if op is c.SUBPATTERN:
        return _anchored(list(av[3]), edge)
    return False


def _at(*names: str) -> frozenset:
    from synapse_cli.jobs.compile import gbnf

    return frozenset(getattr(gbnf._c, n) for n in names)


_BEGIN = _at("AT_BEGINNING", "AT_BEGINNING_STRING")
_END = _at("AT_END", "AT_END_STRING")
_RUST_META = set("\\.+*?()|[]{}^$#&-~")


def _text(s: str) -> str:
    """A regex matching ``s`` exactly (only what both Python's ``re`` and Rust's ``regex`` treat as special is escaped)."""
    return "".join("\\" + ch if ch in _RUST_META else ch if 0x20 <= ord(ch) < 0x7F else _esc(ord(ch)) for ch in s)


def _cls(cp: int) -> str:
    ch = chr(cp)
    if ch in "\\]^-[&~|":
        return "\\" + ch
    return ch if 0x20 < cp < 0x7F else _esc(cp)


def _esc(cp: int) -> str:
    return f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"


def _format_shape(fmt: str) -> str | None:
    """outlines-core's own regex for ``format``, as a pattern over the decoded string (None: not known)."""
    from outlines_core.json_schema import build_regex_from_schema

    try:
        text = build_regex_from_schema(json.dumps({"type": "string", "format": fmt}), None)
    except BaseException as exc:  # pyo3 panics are BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    return "^(?:" + text[1:-1] + ")$" if text.startswith('"') and text.endswith('"') else None


def for_outlines_regex(schema: Any) -> tuple[Any, set[str]]:
    """``(schema, ignored)``: the (rewritten) schema as outlines-core must receive it to embed its pieces
    in JSON text correctly; ``ignored`` names what had to be taken out (a pattern we cannot translate).

    Only the text outlines-core embeds changes: ``pattern`` (to the JSON-escaped form), ``format: uri``
    and ``email`` where outlines reads them (replaced by their own shape, translated the same way), and
    property names that JSON escapes (with the ``required`` entries that name them).
    """
    if not isinstance(schema, dict):
        return schema, set()
    ignored: set[str] = set()
    out = copy.deepcopy(schema)
    for _, node in walk(out):
        pattern = node.get("pattern")
        fmt = node.get("format")
        shape = False
        if not isinstance(pattern, str) and fmt in _QUOTE_UNSAFE_FORMATS and not ({"minLength", "maxLength"} & set(node)):
            # no URI has a quote, backslash or control character, and matching their escapes makes the
            # index far slower (measured for uri: 2.4 s against 0.03 s): the shape without them
            pattern, shape = _format_shape(fmt), True
            del node["format"]  # reported ignored all the same: checked by shape only
        if isinstance(pattern, str):
            try:
                node["pattern"] = _EncodedRegex(plain=shape).convert(pattern)
            except Exception:  # gbnf.Unsupported, or a pattern past what the translation reads
                node.pop("pattern", None)
                if not shape:
                    ignored.add("pattern")
        props = node.get("properties")
        if isinstance(props, dict) and any(_json_name(n) != n for n in props):
            node["properties"] = {_json_name(n): s for n, s in props.items()}
            if isinstance(node.get("required"), list):
                node["required"] = [_json_name(r) if isinstance(r, str) else r for r in node["required"]]
    return out, ignored


def _json_name(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)[1:-1]
