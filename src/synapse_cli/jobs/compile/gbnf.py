"""JSON Schema and regex -> GBNF (llama.cpp grammars). Ours: no PyPI package produces GBNF.

llama.cpp's own converter (``examples/json_schema_to_grammar.py``) is a script in
its repository, not a package, so we keep a converter of our own, written to the
same conventions (a ``root`` rule, a bounded ``space`` rule after every token,
properties in schema order) and checked by loading its output back through
llguidance's GBNF reader against labelled instances.

Everything it cannot express is reported, not approximated silently: the
converter collects the keywords it leaves unenforced in ``ignored``. A pattern it
cannot translate (look-around, back-references, Unicode classes) is such a keyword.
"""

from __future__ import annotations

import json
import re
from typing import Any

# The one private API here: CPython's regex parser (``re._parser.parse``) and its opcodes
# (``re._constants``), used to turn a JSON Schema ``pattern`` into grammar rules. CPython may rename or
# reshape them in any release (3.11 moved them from sre_parse/sre_constants); the names used are
# ``PRIVATE_RE_NAMES``, and tests/test_compile_gbnf.py fails when one of them goes.
import re._constants as _c
import re._parser as _p

PRIVATE_RE_NAMES = {
    "re._parser": ("parse",),
    "re._constants": ("ANY", "AT", "AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING", "BRANCH", "CATEGORY", "IN",
                      "LITERAL", "MAXREPEAT", "MAX_REPEAT", "MIN_REPEAT", "NEGATE", "NOT_LITERAL", "RANGE", "SRE_FLAG_DOTALL",
                      "SRE_FLAG_IGNORECASE", "SRE_FLAG_MULTILINE", "SRE_FLAG_VERBOSE", "SUBPATTERN"),
}  # fmt: skip

MAX_CP = 0x10FFFF
SPACE = r'space ::= | " " | "\n" [ \t]{0,20}'
PRIMITIVES = {
    "space": SPACE,
    "boolean": 'boolean ::= ("true" | "false") space',
    "null": 'null ::= "null" space',
    "integral-part": 'integral-part ::= "0" | [1-9] [0-9]*',
    "number": 'number ::= "-"? integral-part ("." [0-9]+)? ([eE] [-+]? [0-9]+)? space',
    "integer": 'integer ::= "-"? integral-part ("." "0"+)? space',  # 1.0 is an integer in JSON Schema
    # no \uD800-\uDFFF escapes: a surrogate pair would count as two characters against minLength/maxLength
    # (one code point in JSON Schema); such characters are written as raw UTF-8, one character each
    "char": r'char ::= [^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}))',
    "string": r'string ::= "\"" char* "\"" space',
    "value": "value ::= object | array | string | number | boolean | null",
    "object": 'object ::= "{" space (string ":" space value ("," space string ":" space value)*)? "}" space',
    "array": 'array ::= "[" space (value ("," space value)*)? "]" space',
}
_DEPS = {
    "boolean": ["space"], "null": ["space"], "number": ["integral-part", "space"], "integer": ["integral-part", "space"],
    "string": ["char", "space"], "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["space", "string", "value"], "array": ["space", "value"],
}
_FORMATS = {
    "date": r'[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])',
    "time": r'([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]+)? ([Zz] | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "uuid": r'[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
}
_FORMATS["date-time"] = _FORMATS["date"] + " [Tt] " + _FORMATS["time"]
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def quantified(inner: str, lo: int, hi: int) -> str:
    """``inner`` repeated ``lo`` to ``hi`` times (``hi`` ``sre_constants.MAXREPEAT``: unbounded), in the
    quantifier syntax GBNF, Lark, Python's ``re`` and Rust's ``regex`` share."""
    if hi == _c.MAXREPEAT:
        return f"{inner}*" if lo == 0 else f"{inner}+" if lo == 1 else f"{inner}{{{lo},}}"
    if (lo, hi) == (0, 1):
        return f"{inner}?"
    return f"{inner}{{{lo},{hi}}}" if lo != hi else f"{inner}{{{lo}}}"


class Unsupported(Exception):
    """The converter cannot produce a grammar at all (not merely ignore a keyword)."""


# -- GBNF text helpers -------------------------------------------------------------------


def literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    out = []
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _class_char(cp: int) -> str:
    ch = chr(cp)
    if ch in "]\\^-[" or cp < 0x20 or cp == 0x7F:  # GBNF classes know \\x escapes, not \\^ or \\-
        return f"\\x{cp:02x}"
    return ch


def char_class(ranges: list[tuple[int, int]]) -> str:
    """``[...]`` for a non-empty list of inclusive code point ranges (surrogates left out)."""
    parts = []
    for lo, hi in _subtract(ranges, [(0xD800, 0xDFFF)]):
        parts.append(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + "".join(parts) + "]"


def _norm_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, start = [], 0
    for lo, hi in _norm_ranges(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CP:
        out.append((start, MAX_CP))
    return out


def _subtract(ranges: list[tuple[int, int]], remove: list[tuple[int, int]]) -> list[tuple[int, int]]:
    keep = _complement(remove)
    out = []
    for lo, hi in _norm_ranges(ranges):
        for klo, khi in keep:
            a, b = max(lo, klo), min(hi, khi)
            if a <= b:
                out.append((a, b))
    return out


# JSON strings: these code points must be written escaped
_JSON_SPECIAL = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]


def _json_escape(cp: int) -> str:
    return json.dumps(chr(cp), ensure_ascii=False)[1:-1]


def json_chars(ranges: list[tuple[int, int]]) -> str:
    """A GBNF expression for one character of a JSON string whose decoded value lies in ``ranges``."""
    ranges = _norm_ranges(ranges)
    alts = []
    plain = _subtract(ranges, _JSON_SPECIAL)
    if plain:
        alts.append(char_class(plain))
    for lo, hi in ranges:
        for spec_lo, spec_hi in _JSON_SPECIAL:
            for cp in range(max(lo, spec_lo), min(hi, spec_hi) + 1):
                alts.append(literal(_json_escape(cp)))
    if not alts:
        raise Unsupported("empty character class")
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


# -- regex -> GBNF -------------------------------------------------------------------------

_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE_CPS = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
              (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
_CATEGORIES = {
    "CATEGORY_DIGIT": _DIGIT, "CATEGORY_NOT_DIGIT": _complement(_DIGIT),
    "CATEGORY_WORD": _WORD, "CATEGORY_NOT_WORD": _complement(_WORD),
    "CATEGORY_SPACE": _SPACE_CPS, "CATEGORY_NOT_SPACE": _complement(_SPACE_CPS),
}


class RegexToGbnf:
    """Translate a regex (Python/ECMAScript common subset) into a GBNF expression.

    ``json_string``: the expression matches the JSON-escaped form of the text (inside quotes).
    ``search``: JSON Schema ``pattern`` semantics (unanchored unless ``^``/``$``); otherwise full match.
    """

    def __init__(self, json_string: bool, char_rule: str) -> None:
        self.json_string = json_string
        self.char_rule = char_rule  # rule matching any one character (in the chosen encoding)

    def convert(self, pattern: str, search: bool) -> str:
        try:
            tree = _p.parse(pattern)
        except Exception as exc:  # re.error and friends
            raise Unsupported(f"cannot parse regex: {exc}") from None
        flags = tree.state.flags if hasattr(tree, "state") else 0
        if flags & (_c.SRE_FLAG_IGNORECASE | _c.SRE_FLAG_MULTILINE | _c.SRE_FLAG_VERBOSE):
            raise Unsupported("regex flags are not supported")
        self.dotall = bool(flags & _c.SRE_FLAG_DOTALL)
        items = list(tree)
        if len(items) == 1 and items[0][0] is _c.BRANCH:
            branches = [list(b) for b in items[0][1][1]]
        else:
            branches = [items]
        alts = [self._anchored(b, search) for b in branches]
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    def _anchored(self, items: list, search: bool) -> str:
        begin = {_c.AT_BEGINNING, _c.AT_BEGINNING_STRING}
        end = {_c.AT_END, _c.AT_END_STRING}
        start_anchor = bool(items) and items[0][0] is _c.AT and items[0][1] in begin
        if start_anchor:
            items = items[1:]
        end_anchor = bool(items) and items[-1][0] is _c.AT and items[-1][1] in end
        if end_anchor:
            items = items[:-1]
        body = self._seq(items)
        anyc = f"{self.char_rule}*"
        if search and not start_anchor:
            body = f"{anyc} {body}"
        if search and not end_anchor:
            body = f"{body} {anyc}"
        return "(" + body.strip() + ")" if body.strip() else '""'

    def _seq(self, items: Any) -> str:
        return " ".join(self._node(op, av) for op, av in items) or '""'

    def _chars(self, ranges: list[tuple[int, int]]) -> str:
        if self.json_string:
            return json_chars(ranges)
        if not ranges:
            raise Unsupported("empty character class")
        return char_class(_norm_ranges(ranges))

    def _node(self, op: Any, av: Any) -> str:
        if op is _c.LITERAL:
            return literal(_json_escape(av)) if self.json_string else literal(chr(av))
        if op is _c.NOT_LITERAL:
            return self._chars(_complement([(av, av)]))
        if op is _c.ANY:
            return self._chars([(0, MAX_CP)] if self.dotall else _complement([(0x0A, 0x0A)]))
        if op is _c.IN:
            return self._chars(self._in_ranges(av))
        if op is _c.BRANCH:
            return "(" + " | ".join(self._seq(b) for b in av[1]) + ")"
        if op is _c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise Unsupported("inline regex flags are not supported")
            return "(" + self._seq(sub) + ")"
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, sub = av
            if hi == 0:
                return '""'
            body = self._seq(sub)
            # llguidance's GBNF reader drops the parentheses of a group that holds one quantified
            # item, and "x+?" is not Lark: a trailing "" keeps the group a group
            inner = "(" + body + (' ""' if re.search(r'[*+?}]\)*$', body.rstrip()) else "") + ")"
            return quantified(inner, lo, hi)
        name = getattr(op, "name", str(op))
        raise Unsupported(f"regex construct {name} is not supported")

    def _in_ranges(self, items: Any) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        negate = False
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                ranges.append((av, av))
            elif op is _c.RANGE:
                ranges.append((av[0], av[1]))
            elif op is _c.CATEGORY:
                key = getattr(av, "name", str(av))
                if key not in _CATEGORIES:
                    raise Unsupported(f"regex class {key} is not supported")
                ranges.extend(_CATEGORIES[key])
            else:
                raise Unsupported(f"regex class item {getattr(op, 'name', op)} is not supported")
        return _complement(ranges) if negate else _norm_ranges(ranges)


# -- integer ranges ------------------------------------------------------------------------


def _same_len(lo: str, hi: str) -> list[str]:
    """Alternatives matching the decimal numbers in [lo, hi], both of the same length."""
    if lo == hi:
        return [literal(lo)]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    n = len(lo) - 1
    if lo[0] == hi[0]:
        return [f"{literal(lo[0])} ({' | '.join(_same_len(lo[1:], hi[1:]))})"]
    out = []
    lo_full, hi_full = lo[1:] == "0" * n, hi[1:] == "9" * n
    first = int(lo[0]) + (0 if lo_full else 1)
    last = int(hi[0]) - (0 if hi_full else 1)
    if not lo_full:
        out.append(f"{literal(lo[0])} ({' | '.join(_same_len(lo[1:], '9' * n))})")
    if first <= last:
        head = literal(str(first)) if first == last else f"[{first}-{last}]"
        out.append(f"{head} [0-9]{{{n}}}")
    if not hi_full:
        out.append(f"{literal(hi[0])} ({' | '.join(_same_len('0' * n, hi[1:]))})")
    return out


def _uint_range(lo: int, hi: int | None) -> list[str]:
    """Alternatives matching canonical decimal integers in [lo, hi] (hi None: unbounded), lo >= 0."""
    out: list[str] = []
    length = len(str(lo))
    while True:
        floor = 10 ** (length - 1) if length > 1 else 0
        top = 10**length - 1
        a = max(lo, floor)
        b = top if hi is None else min(hi, top)
        if a <= b:
            out.extend(_same_len(str(a), str(b)))
        if hi is not None and top >= hi:
            break
        if hi is None:
            out.append(f"[1-9] [0-9]{{{length},}}")
            break
        length += 1
    return out


def int_range(lo: int | None, hi: int | None) -> str:
    """A GBNF expression for the JSON integers in [lo, hi] (None: unbounded)."""
    alts: list[str] = []
    if lo is None or lo < 0:  # negative part: magnitudes in [max(1, -hi), -lo]
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        mag_hi = None if lo is None else -lo
        if mag_hi is None or mag_lo <= mag_hi:
            alts.append('"-" (' + " | ".join(_uint_range(mag_lo, mag_hi)) + ")")
    if hi is None or hi >= 0:
        alts.extend(_uint_range(max(lo or 0, 0) if lo is not None else 0, hi))
    if not alts:
        raise Unsupported("empty integer range")
    return "(" + " | ".join(alts) + ")"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_ANY_FRAC = '("." [0-9]+)?'
_ZERO_FRAC = '("." "0"+)?'
_NONZERO_FRAC = '"." [0-9]* [1-9] [0-9]*'


def _magnitudes(a: int, a_strict: bool, b: int | None, b_strict: bool) -> list[str]:
    """Unsigned decimals without exponent whose value m lies between a and b (a >= 0; b None: unbounded)."""
    if b is not None and (b < a or (b == a and (a_strict or b_strict))):
        return []
    alts = []
    first, last = (a + 1 if a_strict else a), (None if b is None else b - 1)
    if last is None or first <= last:
        alts.append(f"({' | '.join(_uint_range(first, last))}) {_ANY_FRAC}")
    if a_strict and (b is None or a < b):
        alts.append(f"{literal(str(a))} {_NONZERO_FRAC}")
    if b is not None and not b_strict and (first <= b):
        alts.append(f"{literal(str(b))} {_ZERO_FRAC}")
    return alts


def number_range(lo: Any, xlo: Any, hi: Any, xhi: Any) -> str | None:
    """The JSON numbers (no exponent) within integer bounds, as one GBNF expression; None when empty."""
    lows = [(int(lo), False)] if lo is not None else []
    if xlo is not None:
        lows.append((int(xlo), True))
    highs = [(int(hi), False)] if hi is not None else []
    if xhi is not None:
        highs.append((int(xhi), True))
    low = max(lows, key=lambda t: (t[0], t[1])) if lows else None  # the tighter: larger, strict on a tie
    high = min(highs, key=lambda t: (t[0], not t[1])) if highs else None
    alts: list[str] = []
    # x >= 0, written without a sign: magnitude x
    if high is None or high[0] > 0 or (high[0] == 0 and not high[1]):
        a, a_strict = (0, False) if low is None or low[0] < 0 else low
        alts += _magnitudes(a, a_strict, None if high is None else high[0], False if high is None else high[1])
    # x <= 0, written with "-": magnitude -x
    if low is None or low[0] < 0 or (low[0] == 0 and not low[1]):
        a, a_strict = (0, False) if high is None or high[0] > 0 else (-high[0], high[1])
        neg = _magnitudes(a, a_strict, None if low is None else -low[0], False if low is None else low[1])
        if neg:
            alts.append('"-" (' + " | ".join(neg) + ")")
    return "(" + " | ".join(alts) + ")" if alts else None


# -- JSON Schema -> GBNF --------------------------------------------------------------------

_OBJECT_KW = {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
              "maxProperties", "propertyNames", "dependentRequired", "dependentSchemas", "unevaluatedProperties"}
_ARRAY_KW = {"items", "prefixItems", "minItems", "maxItems", "contains", "minContains", "maxContains",
             "uniqueItems", "unevaluatedItems"}
_STRING_KW = {"minLength", "maxLength", "pattern", "format"}
_NUMBER_KW = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_KIND_KW = {"object": _OBJECT_KW, "array": _ARRAY_KW, "string": _STRING_KW, "number": _NUMBER_KW, "integer": _NUMBER_KW}
_IGNORED_ALWAYS = {"not", "if", "then", "else", "minProperties", "maxProperties", "propertyNames",
                   "dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems",
                   "uniqueItems", "multipleOf", "$dynamicRef"}
_CONTAINS = ("contains", "minContains", "maxContains")  # counted in _array, else ignored


class SchemaToGbnf:
    """Convert a normalized (bundled, 2020-12) schema; ``ignored`` collects unenforced keywords."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.rules: dict[str, str] = {"root": "root ::= <written by convert>"}
        self.bodies: dict[str, str] = {}
        self.ignored: set[str] = set()
        self.refs: dict[str, str] = {}
        self._validator: Any = None

    # rules
    def _need(self, name: str) -> str:  # a primitive rule, added with what it uses
        if name not in self.rules and name in PRIMITIVES:
            self.rules[name] = PRIMITIVES[name]
            for dep in _DEPS.get(name, []):
                self._need(dep)
        return name

    def _rule(self, hint: str, body: str) -> str:
        if body in self.bodies:
            return self.bodies[body]
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower() or "r"
        name, n = base, 1
        while name in self.rules or name in PRIMITIVES:
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = f"{name} ::= {body}"
        self.bodies[body] = name
        return name

    def convert(self) -> str:
        self._need("space")
        body = self.visit(self.root, "root")
        if body is None:
            raise Unsupported("the schema admits no value")
        lines = [f"root ::= {body}"]
        lines += [r for n, r in self.rules.items() if n != "root"]
        return "\n".join(lines) + "\n"

    # schema helpers
    def _resolve(self, ref: str) -> Any:
        if ref == "#":
            return self.root
        if ref.startswith("#/$defs/"):
            name = ref[len("#/$defs/"):].replace("~1", "/").replace("~0", "~")
            defs = self.root.get("$defs", {}) if isinstance(self.root, dict) else {}
            if name in defs:
                return defs[name]
        raise Unsupported(f"unresolvable $ref {ref!r}")

    def _valid(self, instance: Any, schema: Any) -> bool:
        if self._validator is None:
            import jsonschema

            self._validator = jsonschema.Draft202012Validator(self.root if isinstance(self.root, dict) else {})
        try:
            return self._validator.evolve(schema=schema).is_valid(instance)
        except Exception:  # a pattern Python's re cannot compile: keep the value
            return True

    def _literal(self, value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        alts = [literal(text)]
        if isinstance(value, float) and value.is_integer():
            alts.append(literal(str(int(value))))
        elif isinstance(value, int) and not isinstance(value, bool):
            alts.append(literal(f"{value}.0"))
        return "(" + " | ".join(alts) + ")" if len(alts) > 1 else alts[0]

    def visit(self, schema: Any, hint: str) -> str | None:
        """A GBNF expression matching the JSON values valid under ``schema`` (followed by space), or None."""
        if schema is True or schema == {}:
            return self._need("value")
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise Unsupported("a schema must be an object or a boolean")
        schema = {k: v for k, v in schema.items() if k != "$defs"}
        self.ignored.update(k for k in schema if k in _IGNORED_ALWAYS)
        if "$ref" in schema:
            ref = schema["$ref"]
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            if not any(k in rest for k in _SIGNIFICANT):
                return self._ref_rule(ref)
            return self.visit({"allOf": [{"$ref": ref}, rest]}, hint)
        if "allOf" in schema:
            merged = self._merge_all(schema)
            return self.visit(merged, hint)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = schema[key]
                rest = {k: v for k, v in schema.items() if k != key}
                if key == "oneOf" and len(branches) > 1:
                    self.ignored.add("oneOf")
                sig = any(k in rest for k in _SIGNIFICANT)
                alts = []
                for i, b in enumerate(branches):
                    sub = {"allOf": [rest, b]} if sig else b
                    expr = self.visit(sub, f"{hint}-{i}")
                    if expr is not None:
                        alts.append(expr)
                if not alts:
                    return None
                return self._rule(hint, " | ".join(alts)) if len(alts) > 1 else alts[0]
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else list(schema["enum"])
            rest = {k: v for k, v in schema.items() if k not in ("const", "enum")}
            if "const" in schema and "enum" in schema:
                values = [v for v in values if v in schema["enum"]]
            if any(k in rest for k in _SIGNIFICANT):
                values = [v for v in values if self._valid(v, rest)]
            if not values:
                return None
            body = " | ".join(self._literal(v) for v in values)
            return self._rule(hint, f"({body}) space")
        types = schema.get("type")
        if types is None:
            types = [t for t in TYPES if t != "integer"] if any(
                k in schema for kws in _KIND_KW.values() for k in kws) else None
            if types is None:
                return self._need("value")
        elif isinstance(types, str):
            types = [types]
        if "number" in types and "integer" in types:
            types = [t for t in types if t != "integer"]
        alts = []
        for t in types:
            expr = self._typed(t, schema, f"{hint}-{t}" if len(types) > 1 else hint)
            if expr is not None:
                alts.append(expr)
        if not alts:
            return None
        return alts[0] if len(alts) == 1 else self._rule(hint, " | ".join(alts))

    def _ref_rule(self, ref: str) -> str:
        if ref not in self.refs:
            name = "root" if ref == "#" else "def-" + ref.rsplit("/", 1)[-1]
            name = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-").lower()
            base, n = name, 1
            while name in self.rules or name in PRIMITIVES or name in self.refs.values():
                n += 1
                name = f"{base}-{n}"
            self.refs[ref] = name
            if ref == "#":
                return name  # root is written by convert()
            self.rules[name] = f"{name} ::= <pending>"
            body = self.visit(self._resolve(ref), name)
            if body is None:
                raise Unsupported(f"{ref} admits no value")
            self.rules[name] = f"{name} ::= {body}"
        return self.refs[ref]

    def _merge_all(self, schema: dict) -> dict:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            seen = 0
            while isinstance(part, dict) and "$ref" in part and seen < 20:
                rest = {k: v for k, v in part.items() if k != "$ref"}
                target = self._resolve(part["$ref"])
                if target is False:
                    part = False
                    break
                base = dict(target) if isinstance(target, dict) else {}
                if rest:
                    base["allOf"] = list(base.get("allOf", [])) + [rest]
                part = base
                seen += 1
            if part is True:
                continue
            if part is False or not isinstance(part, dict):
                self.ignored.add("allOf")
                continue
            if "allOf" in part:
                part = self._merge_all(part)
            merged = _merge(merged, part, self.ignored)
        return merged

    # typed productions
    def _typed(self, t: str, schema: dict, hint: str) -> str | None:
        if t == "null":
            return self._need("null")
        if t == "boolean":
            return self._need("boolean")
        if t in ("integer", "number"):
            return self._number(t, schema, hint)
        if t == "string":
            return self._string(schema, hint)
        if t == "array":
            return self._array(schema, hint)
        if t == "object":
            return self._object(schema, hint)
        raise Unsupported(f"unknown type {t!r}")

    def _number(self, t: str, schema: dict, hint: str) -> str | None:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if t == "integer":
            import math

            bounds_lo = [math.ceil(lo)] if isinstance(lo, (int, float)) else []
            if isinstance(xlo, (int, float)):
                bounds_lo.append(math.floor(xlo) + 1)
            bounds_hi = [math.floor(hi)] if isinstance(hi, (int, float)) else []
            if isinstance(xhi, (int, float)):
                bounds_hi.append(math.ceil(xhi) - 1)
            if not bounds_lo and not bounds_hi:
                return self._need("integer")
            a = max(bounds_lo) if bounds_lo else None
            b = min(bounds_hi) if bounds_hi else None
            if a is not None and b is not None and a > b:
                return None
            self._need("space")
            return self._rule(hint, f"{int_range(a, b)} space")
        # number: a lower bound of 0 alone keeps every JSON form (exponents too): no minus sign, but for zero
        if lo is None and hi is None and xlo is None and xhi is None:
            return self._need("number")
        if lo == 0 and hi is None and xlo is None and xhi is None:
            self._need("integral-part")
            self._need("space")
            return self._rule(hint, '(integral-part ("." [0-9]+)? | "-0" ("." "0"+)?) ([eE] [-+]? [0-9]+)? space')
        bounds = [b for b in (lo, hi, xlo, xhi) if b is not None]
        if all(_number(b) and float(b).is_integer() and abs(b) < 10**15 for b in bounds):
            body = number_range(lo, xlo, hi, xhi)
            if body is None:
                return None
            self._need("space")
            return self._rule(hint, f"{body} space")
        self.ignored.update(k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema)
        return self._need("number")

    def _string(self, schema: dict, hint: str) -> str:
        self._need("char")
        self._need("space")
        fmt, pattern = schema.get("format"), schema.get("pattern")
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if fmt is not None and fmt not in _FORMATS:
            self.ignored.add("format")
            fmt = None
        if fmt is not None:
            self.ignored.update(k for k in ("pattern", "minLength", "maxLength") if k in schema)
            if fmt != "uuid":  # dates and times by shape: 2024-02-31 passes, a leap second does not
                self.ignored.add("format")
            return self._rule(hint, f'"\\"" {_FORMATS[fmt]} "\\"" space')
        if isinstance(pattern, str):
            try:
                body = RegexToGbnf(json_string=True, char_rule="char").convert(pattern, search=True)
                self.ignored.update(k for k in ("minLength", "maxLength") if k in schema)
                return self._rule(hint, f'"\\"" {body} "\\"" space')
            except (Unsupported, RecursionError):
                self.ignored.add("pattern")
        if lo is None and hi is None:
            return self._need("string")
        lo = int(lo or 0)
        if hi is not None and int(hi) == 0:
            return self._rule(hint, '"\\"" "\\"" space')
        rep = f"{{{lo},{int(hi)}}}" if hi is not None else (f"{{{lo},}}" if lo else "*")
        return self._rule(hint, f'"\\"" char{rep} "\\"" space')

    def _array(self, schema: dict, hint: str) -> str | None:
        self._need("space")
        if any(k in schema for k in _CONTAINS):
            counted = self._contains(schema, hint)
            if counted is not NotImplemented:
                return counted
            self.ignored.update(k for k in _CONTAINS if k in schema)
        prefix = schema.get("prefixItems", []) or []
        items = schema.get("items", True)
        lo = int(schema.get("minItems", 0) or 0)
        hi = schema.get("maxItems")
        hi = None if hi is None else int(hi)
        elems = []
        for i, p in enumerate(prefix):
            e = self.visit(p, f"{hint}-{i}")
            if e is None:  # this position must stay empty: the array ends before it
                hi = i if hi is None else min(hi, i)
                break
            elems.append(e)
        k = len(elems)
        item = None if items is False else self.visit(items, f"{hint}-item")
        if item is None:
            hi = k if hi is None else min(hi, k)
        if hi is not None and lo > hi:
            return None

        def tail(i: int) -> str:
            if hi is not None and i >= hi:
                return ""
            if i >= k:
                if item is None:
                    return ""
                a = max(0, lo - i)
                b = None if hi is None else hi - i
                unit = f'("," space {item})'
                if b is None:
                    return f"{unit}*" if a == 0 else (f"{unit}+" if a == 1 else f"{unit}{{{a},}}")
                return f"{unit}?" if (a, b) == (0, 1) else f"{unit}{{{a},{b}}}"
            nxt = f'"," space {elems[i]} {tail(i + 1)}'.strip()
            return f"({nxt})?" if i >= lo else nxt

        if hi == 0 or (k == 0 and item is None):
            return self._rule(hint, '"[" space "]" space')
        first = elems[0] if k else item
        inner = f"{first} {tail(1)}".strip()
        body = f'"[" space ({inner})? "]" space' if lo == 0 else f'"[" space {inner} "]" space'
        return self._rule(hint, body)

    def _contains(self, schema: dict, hint: str) -> Any:
        """``contains`` with ``minContains``/``maxContains`` as a counted alternation over the items:
        fillers (any item; with a maximum, items that do not match), then the matching items, each
        followed by fillers. NotImplemented where that is not exact (beside prefixItems or
        minItems/maxItems, a maximum whose complement is not written, a piece we would approximate)."""
        if "contains" not in schema:  # minContains/maxContains mean nothing without it
            return self._plain_array(schema, hint)
        if schema.get("prefixItems") or "minItems" in schema or "maxItems" in schema:
            return NotImplemented
        lo, hi = schema.get("minContains", 1), schema.get("maxContains")
        if not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer() and x >= 0)
                   for x in (lo, hi)) or (hi is not None and hi > _MAX_CONTAINS) or lo > _MAX_CONTAINS:
            return NotImplemented
        lo, hi = int(lo), None if hi is None else int(hi)
        if lo == 0 and hi is None:  # always satisfied
            return self._plain_array(schema, hint)
        items = schema.get("items", True)
        cond = schema["contains"]
        before = set(self.ignored)
        if cond is False or items is False:
            match = None
        else:
            match = self.visit(items if cond is True or cond == {} else cond if items is True or items == {}
                               else {"allOf": [items, cond]}, f"{hint}-match")
        filler = None if items is False else self.visit(items, f"{hint}-item")
        if hi is not None:
            from synapse_cli.jobs.compile.complement import complement

            neg = complement(cond, self.root)
            if neg is None:
                self.ignored = before
                return NotImplemented
            filler = None if neg is False or items is False else self.visit(
                neg if items is True or items == {} else {"allOf": [items, neg]}, f"{hint}-other")
        if self.ignored - before:  # a piece is approximated: so is the count
            self.ignored = before
            return NotImplemented
        if hi is not None and hi < lo:
            return None
        fillers = self._rule(f"{hint}-others", f'{filler} ("," space {filler})*') if filler else None
        empty = '"[" space "]" space'
        only_fillers = f'"[" space {fillers} "]" space | {empty}' if fillers else empty
        if match is None or hi == 0:
            return self._rule(hint, only_fillers) if lo == 0 else None
        lead = f'({filler} "," space)* ' if filler else ""
        trail = f' ("," space {filler})*' if filler else ""
        group = self._rule(f"{hint}-group", f"{match}{trail}")
        more_lo, more_hi = max(lo, 1) - 1, None if hi is None else hi - 1
        more = ""
        if more_hi is None or more_hi > 0:
            more = " " + quantified(f'("," space {group})', more_lo, _c.MAXREPEAT if more_hi is None else more_hi)
        body = f'"[" space {lead}{group}{more} "]" space'
        return self._rule(hint, body if lo >= 1 else f"{body} | {only_fillers}")

    def _plain_array(self, schema: dict, hint: str) -> str | None:
        return self._array({k: v for k, v in schema.items() if k not in _CONTAINS}, hint)

    def _object(self, schema: dict, hint: str) -> str | None:
        self._need("space")
        props = dict(schema.get("properties", {}) or {})
        required = [r for r in schema.get("required", []) or [] if isinstance(r, str)]
        for r in required:
            props.setdefault(r, True)
        extra = schema.get("additionalProperties", True)
        if schema.get("patternProperties"):
            self.ignored.add("patternProperties")
            if "additionalProperties" in schema:
                self.ignored.add("additionalProperties")
            extra = True
        kvs = []
        for name, sub in props.items():
            value = self.visit(sub, f"{hint}-{name}")
            if value is None:
                if name in required:
                    return None
                continue
            key = literal(json.dumps(name, ensure_ascii=False))
            kvs.append((f'{key} space ":" space {value}', name in required))
        extra_kv = None
        if extra is not False:
            value = self.visit(extra, f"{hint}-additional")
            if value is not None:
                key = self._key_not_in(list(props), hint)
                extra_kv = self._rule(f"{hint}-additional-kv", f'{key} ":" space {value}')
        n = len(kvs)
        rest: dict[int, str] = {}
        first: dict[int, str] = {}
        rest[n] = f'("," space {extra_kv})*' if extra_kv else ""
        first[n] = f'({extra_kv} ("," space {extra_kv})*)?' if extra_kv else ""
        for i in range(n - 1, -1, -1):
            kv, req = kvs[i]
            r_next, f_next = rest[i + 1], first[i + 1]
            rest[i] = f'"," space {kv} {r_next}' if req else f'("," space {kv})? {r_next}'
            if req:
                first[i] = f"{kv} {r_next}"
            else:
                alt = f_next if f_next else '""'
                first[i] = f"{kv} {r_next} | {alt}"
            # name the pieces so that the grammar stays linear in the number of properties
            if i > 0:
                rest[i] = self._rule(f"{hint}-rest-{i}", rest[i].strip() or '""')
            first[i] = self._rule(f"{hint}-from-{i}", first[i].strip() or '""')
        inner = first[0] if n else first[n]
        return self._rule(hint, f'"{{" space {inner} "}}" space'.replace("  ", " "))

    def _key_not_in(self, names: list[str], hint: str) -> str:
        """A JSON string (with quotes and trailing space) that is none of ``names``."""
        self._need("char")
        self._need("space")
        if not names:
            return self._need("string")
        trie: dict = {}
        for name in names:
            node = trie
            for ch in name:
                node = node.setdefault(ch, {})
            node[None] = True

        def other(node: dict) -> str:
            taken = [(ord(c), ord(c)) for c in node if c is not None]
            return f"{json_chars(_complement(taken))} char*"

        counter = [0]

        def build(node: dict) -> str:
            # one rule per trie node: llguidance refuses deeply nested groups
            alts = [] if None in node else ['""']
            for ch, child in node.items():
                if ch is None:
                    continue
                alts.append(f"{json_chars([(ord(ch), ord(ch))])} {build(child)}")
            alts.append(other(node))
            counter[0] += 1
            return self._rule(f"{hint}-key-{counter[0]}", " | ".join(alts))

        body = build(trie)
        return self._rule(f"{hint}-key", f'"\\"" {body} "\\"" space')


_MAX_CONTAINS = 16  # counted repeats past this are left to the report (grammar size)

_SIGNIFICANT = (
    {"type", "enum", "const", "allOf", "anyOf", "oneOf", "$ref", "not", "if"}
    | _OBJECT_KW | _ARRAY_KW | _STRING_KW | _NUMBER_KW
)


def _merge(a: dict, b: dict, ignored: set[str]) -> dict:
    """Conjunction of two schemas for the common cases; what it cannot intersect goes to ``ignored``."""
    for x, y in ((a, b), (b, a)):
        # additionalProperties sees only its own object's properties: merged, it would see both
        if "additionalProperties" in x and ("properties" in y or "patternProperties" in y):
            ignored.add("additionalProperties")
    a, b = _align_items(a, b)
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
            continue
        mine = out[key]
        if mine == value:
            continue
        if key == "properties":
            props = dict(mine)
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key == "required":
            out[key] = list(dict.fromkeys(list(mine) + list(value)))
        elif key == "prefixItems" and isinstance(mine, list) and isinstance(value, list) and len(mine) == len(value):
            out[key] = [x if x == y else False if x is False or y is False else {"allOf": [x, y]} for x, y in zip(mine, value)]
        elif key == "type":
            ta = {mine} if isinstance(mine, str) else set(mine)
            tb = {value} if isinstance(value, str) else set(value)
            if "number" in ta:
                ta.add("integer")
            if "number" in tb:
                tb.add("integer")
            both = ta & tb
            if "number" in both:
                both.discard("integer")
            out[key] = sorted(both)
            if not both:
                out["enum"] = []  # no type satisfies both: no value
        elif key == "enum":
            out[key] = [v for v in mine if v in value]
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            out[key] = max(mine, value)
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            out[key] = min(mine, value)
        elif key in ("items", "additionalProperties", "contains", "propertyNames"):
            if mine is False or value is False:
                out[key] = False
            else:
                out[key] = {"allOf": [mine, value]}
        elif key in ("anyOf", "oneOf") and len(mine) * len(value) <= 16:
            out[key] = [{"allOf": [x, y]} for x in mine for y in value]  # distribute: exact
            if key == "oneOf":
                ignored.add("oneOf")
        elif key in ("anyOf", "oneOf"):
            ignored.add("allOf")  # keep the first alternative list only: a relaxation
        elif key in ("title", "description", "default", "examples", "$comment"):
            continue
        else:
            ignored.add(key)
    return out


def _align_items(a: dict, b: dict) -> tuple[dict, dict]:
    """``items`` applies past its own object's ``prefixItems`` only: before merging two objects whose
    prefixes differ, each is written with the longer prefix (its ``items``, or any value, at the added
    positions), and the prefixes are then intersected position by position."""
    pa, pb = a.get("prefixItems") or [], b.get("prefixItems") or []
    if not isinstance(pa, list) or not isinstance(pb, list) or len(pa) == len(pb):
        return a, b
    n = max(len(pa), len(pb))

    def widen(x: dict, p: list) -> dict:
        if len(p) == n:
            return x
        fill = x.get("items", True)
        return {**x, "prefixItems": list(p) + [fill] * (n - len(p))}

    return widen(a, pa), widen(b, pb)


def schema_to_gbnf(schema: Any) -> tuple[str, list[str]]:
    """``(grammar, ignored_keywords)`` for a normalized schema; raises Unsupported."""
    conv = SchemaToGbnf(schema)
    try:
        text = conv.convert()
    except RecursionError:
        raise Unsupported("schema too deeply nested for the GBNF converter") from None
    return text, sorted(conv.ignored)


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF grammar whose language is the full matches of ``pattern`` (raw text, not JSON)."""
    conv = RegexToGbnf(json_string=False, char_rule="any-char")
    body = conv.convert(pattern, search=False)
    # one named rule: llguidance, reading GBNF, lexes a terminal-only rule as one regex
    # (as llama.cpp matches it, character by character) rather than as competing lexemes
    rules = ["root ::= pattern", f"pattern ::= {body}"]
    if "any-char" in body:
        rules.append("any-char ::= " + char_class([(0, MAX_CP)]))
    return "\n".join(rules) + "\n"
