"""Same-meaning rewrites of the keywords no engine enforces, applied before an engine sees the schema.

``lower(schema)`` returns a schema with exactly the same valid instances (under draft 2020-12)
written with keywords the engines hold (``type``, bounds, ``pattern``, ``properties``,
``patternProperties``, ``additionalProperties``, ``required``, ``prefixItems``, ``items``,
``allOf``, ``anyOf``, ``const``/``enum``, ``$ref``):

- ``unevaluatedProperties`` / ``unevaluatedItems``: the in-place subschemas (``allOf``, ``anyOf``,
  ``oneOf``, ``$ref``, ``if``/``then``/``else``, ``dependentSchemas``) are distributed into
  alternatives whose evaluated set is known statically; each alternative gets a closure
  ``{"properties": {name: true...}, "patternProperties": {...}, "additionalProperties": U}``
  (``{"prefixItems": [true] * n, "items": U}`` for items) as one more ``allOf`` branch, where
  ``additionalProperties`` sees only its own branch's names. An ``anyOf`` is distributed over every
  non-empty subset of its branches (annotations come from *every* valid branch; a smaller subset
  only closes more, so the union is exact). ``contains``, ``$dynamicRef``, recursion through the same
  instance location or more than ``MAX_ALTERNATIVES`` alternatives: left as they are.
- ``if``/``then``/``else``: ``anyOf[allOf[if, then], allOf[not-if, else]]``, where not-if is
  written by ``complement``.
- ``not``: by ``complement``.
- ``oneOf``: ``anyOf`` of each branch with the complements of the others (exclusive by construction).
- ``dependentRequired`` / ``dependentSchemas``: ``anyOf`` over the trigger's absence
  (``properties: {trigger: false}``) and its presence with what it requires.
- ``propertyNames`` over strings (``pattern``, ``minLength``/``maxLength``, ``const``/``enum``):
  ``patternProperties`` of the key regex beside ``additionalProperties: false`` in its own branch.

What cannot be rewritten stays in the schema: the engine that gets it still lists it in
``ignored_keywords``. ``complement`` returns None where no complement is written (patterns, formats,
``multipleOf``, ``uniqueItems``, objects or arrays in ``const``/``enum``, non-integer numbers).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from synapse_cli.jobs.compile.normalize import SUB_LIST, SUB_MAP, SUB_ONE, VALIDATION_KEYWORDS, walk
from synapse_cli.jobs.compile.complement import MAX_ONEOF, _Complement, _GiveUp, _allof, _anyof, _resolve, complement, in_words


MAX_ALTERNATIVES = 64  # distributed alternatives per unevaluated* keyword; past it the keyword stays


MAX_ANYOF_SUBSETS = 5  # anyOf branches distributed over their subsets (2^n - 1 alternatives)


MAX_GROWTH, MAX_BYTES = 40, 64_000  # a lowered schema larger than both is not used


_IN_PLACE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "$ref", "$dynamicRef",
             "unevaluatedProperties", "unevaluatedItems")


class _Evaluated:
    """What a conjunction of subschemas evaluates: property names, patterns, all; prefix length, all items."""

    __slots__ = ("names", "patterns", "all_props", "prefix", "all_items")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.patterns: list[str] = []
        self.all_props = False
        self.prefix = 0
        self.all_items = False

    def union(self, other: _Evaluated) -> _Evaluated:
        out = _Evaluated()
        out.names = self.names + [n for n in other.names if n not in self.names]
        out.patterns = self.patterns + [p for p in other.patterns if p not in self.patterns]
        out.all_props = self.all_props or other.all_props
        out.prefix = max(self.prefix, other.prefix)
        out.all_items = self.all_items or other.all_items
        return out


_Alt = tuple  # (pieces: list[schema], evaluated: _Evaluated)


class _Lowering:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.notes: set[str] = set()
        self.comp = _Complement(root)
        self.property_names = True
        self.need = (False, False)  # (properties, items): which evaluated sets the enclosing unevaluated* reads

    # the whole tree, bottom-up
    def node(self, s: Any) -> Any:
        if not isinstance(s, dict):
            return s
        if "unevaluatedProperties" in s or "unevaluatedItems" in s:
            try:
                s = self._unevaluated(s)
            except (_GiveUp, RecursionError) as exc:
                self.notes.add(f"unevaluated: {exc}")
            if not isinstance(s, dict):
                return s
        out: dict[str, Any] = {}
        for key, value in s.items():
            if key in SUB_MAP and isinstance(value, dict):
                out[key] = {n: self.node(v) for n, v in value.items()}
            elif key in SUB_LIST and isinstance(value, list):
                out[key] = [self.node(v) for v in value]
            elif key in SUB_ONE and isinstance(value, (dict, bool)):
                out[key] = self.node(value)
            else:
                out[key] = value
        return self._own(out)

    def _own(self, s: dict) -> Any:
        """Rewrite this object's own keywords (its subschemas are lowered already)."""
        extra: list[Any] = []
        for key in _COUNTS:  # 2.0 means 2; engines refuse a float count
            if isinstance(s.get(key), float) and s[key].is_integer():
                s[key] = int(s[key])
        if "const" in s and isinstance(s["const"], (dict, list)):
            extra.append(structure(s.pop("const")))
        if isinstance(s.get("enum"), list) and any(isinstance(v, (dict, list)) for v in s["enum"]):
            values = s.pop("enum")
            scalars = [v for v in values if not isinstance(v, (dict, list))]
            extra.append(_anyof(([{"enum": scalars}] if scalars else []) + [structure(v) for v in values if isinstance(v, (dict, list))]))
        if "dependentRequired" in s and isinstance(s["dependentRequired"], dict):
            for trigger, needs in s.pop("dependentRequired").items():
                if needs:
                    # properties (true) name the keys: engines that fix the key order take it from there
                    names = list(dict.fromkeys([trigger, *needs]))
                    extra.append({"anyOf": [{"properties": {trigger: False}},
                                            {"properties": dict.fromkeys(names, True), "required": names}]})
        if "dependentSchemas" in s and isinstance(s["dependentSchemas"], dict):
            for trigger, dep in s.pop("dependentSchemas").items():
                if dep is True or dep == {}:
                    continue
                extra.append(_anyof([{"properties": {trigger: False}},
                                     _allof([{"properties": {trigger: True}, "required": [trigger]}, dep])]))
        if "if" in s:
            i, t, e = s.get("if"), s.get("then", True), s.get("else", True)
            neg = complement(i, self.root) if not (e is True or e == {}) or not (t is True or t == {}) else True
            if neg is not None:
                for k in ("if", "then", "else"):
                    s.pop(k, None)
                if not (t is True or t == {}) or not (e is True or e == {}):
                    extra.append(_anyof([_allof([i, t]), _allof([neg, e])]))
        elif "then" in s or "else" in s:  # without if, then and else are ignored
            s.pop("then", None)
            s.pop("else", None)
        if "not" in s:
            neg = complement(s["not"], self.root)
            if neg is not None:
                s.pop("not")
                extra.append(neg)
        if isinstance(s.get("oneOf"), list) and 1 < len(s["oneOf"]) <= MAX_ONEOF:
            branches = s["oneOf"]
            negs = [complement(b, self.root) for b in branches]
            if all(n is not None for n in negs):
                s.pop("oneOf")
                extra.append(_anyof([_allof([b] + [negs[j] for j in range(len(branches)) if j != i])
                                     for i, b in enumerate(branches)]))
        elif isinstance(s.get("oneOf"), list) and len(s["oneOf"]) == 1:
            extra.append(s.pop("oneOf")[0])
        if "propertyNames" in s and self.property_names:
            names = self._property_names(s["propertyNames"])
            if names is not None:
                s.pop("propertyNames")
                if names is not True:
                    extra.append(names)
        if not extra:
            return s
        extra = [self.node(x) if isinstance(x, dict) and _needs_lowering(x) else x for x in extra]
        if extra and any(x is False for x in extra):
            return False if not s or set(s) <= {"$defs"} else {**s, "allOf": [*s.get("allOf", []), False]}
        extra = [x for x in extra if x is not True and x != {}]
        if not extra:
            return s
        return {**s, "allOf": [*s.get("allOf", []), *extra]}

    def _property_names(self, p: Any) -> Any:
        """The key constraint as an object schema (``patternProperties`` + ``additionalProperties: false``)."""
        if p is True or p == {}:
            return True
        if p is False:
            return {"additionalProperties": False}
        if not isinstance(p, dict):
            return None
        body = {k: v for k, v in p.items() if k in VALIDATION_KEYWORDS}
        t = body.pop("type", "string")
        if t != "string" and not (isinstance(t, list) and "string" in t):
            return {"additionalProperties": False}  # no key is of that type: no property at all
        branches = []
        if isinstance(body.get("pattern"), str):
            branches.append(body.pop("pattern"))
        lo, hi = body.pop("minLength", None), body.pop("maxLength", None)
        if lo is not None or hi is not None:
            if not all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in (lo, hi)):
                return None
            branches.append(f"^[\\s\\S]{{{lo or 0},{'' if hi is None else hi}}}$")
        if "const" in body or "enum" in body:
            values = [body.pop("const")] if "const" in body else []
            if "enum" in body:
                values = values + list(body.pop("enum")) if not values else [v for v in values if v in body.pop("enum")]
            branches.append(in_words([v for v in values if isinstance(v, str)]) if any(isinstance(v, str) for v in values) else "^[^\\s\\S]$")
        if body:
            return None  # not, anyOf, format...: stays propertyNames
        return _allof([{"patternProperties": {b: True}, "additionalProperties": False} for b in branches])

    # unevaluatedProperties / unevaluatedItems at this object
    def _unevaluated(self, s: dict) -> Any:
        up = s.get("unevaluatedProperties", True)
        ui = s.get("unevaluatedItems", True)
        base = {k: v for k, v in s.items() if k not in ("unevaluatedProperties", "unevaluatedItems")}
        trivial_p, trivial_i = up is True or up == {}, ui is True or ui == {}
        if trivial_p and trivial_i:
            return base
        defs = base.pop("$defs", None)
        top = {k: base.pop(k) for k in ("$schema", "title", "description", "$comment") if k in base}
        outer = self.need
        self.need = (not trivial_p, not trivial_i)
        try:
            alts = self._expand(base, 0, [])
        finally:
            self.need = outer
        out_alts = []
        for pieces, ev in alts:
            closure: dict[str, Any] = {}
            if not trivial_p and not ev.all_props:
                if ev.names:
                    closure["properties"] = {n: True for n in ev.names}
                if ev.patterns:
                    closure["patternProperties"] = {p: True for p in ev.patterns}
                closure["additionalProperties"] = copy.deepcopy(up)
            if not trivial_i and not ev.all_items:
                if ev.prefix:
                    closure["prefixItems"] = [True] * ev.prefix
                closure["items"] = copy.deepcopy(ui)
            out_alts.append(_allof([*pieces, closure] if closure else pieces))
        result = _anyof(out_alts)
        if isinstance(result, dict) and top:
            result = {**top, **result} if set(result) <= {"anyOf", "allOf"} else {**top, "allOf": [result]}
        if not isinstance(result, dict):
            return result if defs is None else ({"$defs": defs} if result is True else {"allOf": [False], "$defs": defs})
        if defs is not None:
            result = {**result, "$defs": defs} if "anyOf" in result or "allOf" in result else {"allOf": [result], "$defs": defs}
        return result

    def _expand(self, s: Any, depth: int, refs: list) -> list[_Alt]:
        """Alternatives (pieces, evaluated): ``s`` holds exactly where one alternative's pieces all hold,
        and then evaluates at least that alternative's set, and no alternative under-closes a valid value."""
        if depth > 24:
            raise _GiveUp("too deep")
        if s is True or s == {}:
            return [([], _Evaluated())]
        if s is False:
            return [([False], _Evaluated())]
        if not isinstance(s, dict):
            raise _GiveUp("not a schema")
        if "$dynamicRef" in s or "$recursiveRef" in s:
            raise _GiveUp("$dynamicRef")
        need_p, need_i = self.need
        if "contains" in s and need_i:
            raise _GiveUp("contains evaluates items by value")
        if ("unevaluatedProperties" in s and need_p) or ("unevaluatedItems" in s and need_i):
            # lowered on its own: it evaluates every property (item) it allows
            if (need_p and "unevaluatedProperties" not in s) or (need_i and "unevaluatedItems" not in s):
                raise _GiveUp("nested unevaluated of the other kind")  # the other set is its subtree's: not read here
            ev = _Evaluated()
            ev.all_props = ev.all_items = True
            return [([self.node(s)], ev)]
        if "unevaluatedProperties" in s or "unevaluatedItems" in s:
            # an unevaluated* of the kind not read here: the whole node lowered on its own, beside
            # the alternatives of the rest of it (which say what it evaluates of the kind read here)
            rest = {k: v for k, v in s.items() if k not in ("unevaluatedProperties", "unevaluatedItems")}
            whole = self.node(s)
            return [([whole] + p, e) for p, e in self._expand(rest, depth + 1, refs)]
        flat = {k: v for k, v in s.items() if k not in _IN_PLACE and k != "$defs"}
        ev = _Evaluated()
        props = flat.get("properties")
        if isinstance(props, dict):
            ev.names = list(props)
        pats = flat.get("patternProperties")
        if isinstance(pats, dict):
            ev.patterns = list(pats)
        if "additionalProperties" in flat:
            ev.all_props = True
        if isinstance(flat.get("prefixItems"), list):
            ev.prefix = len(flat["prefixItems"])
        if "items" in flat:
            ev.all_items = True
        alts: list[_Alt] = [([flat] if flat else [], ev)]

        def times(more: list[_Alt]) -> None:
            nonlocal alts
            alts = [(p1 + p2, e1.union(e2)) for p1, e1 in alts for p2, e2 in more]
            if len(alts) > MAX_ALTERNATIVES:
                raise _GiveUp("too many alternatives")

        if "$ref" in s:
            ref = s["$ref"]
            if ref in refs:
                raise _GiveUp("recursion at the same instance location")
            times(self._expand(_resolve(ref, self.root), depth + 1, refs + [ref]))
        for b in s.get("allOf") or []:
            times(self._expand(b, depth + 1, refs))
        if isinstance(s.get("anyOf"), list):
            branches = [self._expand(b, depth + 1, refs) for b in s["anyOf"]]
            n = len(branches)
            if n > MAX_ANYOF_SUBSETS:
                raise _GiveUp("anyOf too wide")
            union: list[_Alt] = []
            for mask in range(1, 1 << n):
                chosen: list[_Alt] = [([], _Evaluated())]
                for i in range(n):
                    if mask >> i & 1:
                        chosen = [(p1 + p2, e1.union(e2)) for p1, e1 in chosen for p2, e2 in branches[i]]
                union.extend(chosen)
                if len(union) > MAX_ALTERNATIVES:
                    raise _GiveUp("too many alternatives")
            times(union)
        if isinstance(s.get("oneOf"), list):
            # exactly one branch holds: keep the oneOf itself, and the branch's evaluated set
            whole = {"oneOf": s["oneOf"]}
            union = []
            for b in s["oneOf"]:
                union.extend(self._expand(b, depth + 1, refs))
            times([([whole] + p, e) for p, e in union])
        if "not" in s:
            times([([{"not": s["not"]}], _Evaluated())])
        if "if" in s and s.get("then", True) in (True, {}) and s.get("else", True) in (True, {}):
            # an if alone constrains nothing but evaluates what it holds: where it holds, its set;
            # anywhere, the empty set (which only closes more), so no complement is needed
            times(self._expand(s["if"], depth + 1, refs) + [([], _Evaluated())])
        elif "if" in s:
            i, t, e = s["if"], s.get("then", True), s.get("else", True)
            neg = self.comp.of(self.node(i)) if isinstance(i, (dict, bool)) else None
            if neg is None:
                raise _GiveUp("if without a complement")
            yes = [(p1 + p2, e1.union(e2)) for p1, e1 in self._expand(i, depth + 1, refs) for p2, e2 in self._expand(t, depth + 1, refs)]
            no = [([neg] + p, ev2) for p, ev2 in self._expand(e, depth + 1, refs)]
            times(yes + no)
        deps = s.get("dependentSchemas")
        if isinstance(deps, dict):
            for trigger, dep in deps.items():
                present = [([{"required": [trigger]}] + p, e) for p, e in self._expand(dep, depth + 1, refs)]
                times([([{"properties": {trigger: False}}], _Evaluated())] + present)
        return alts


_LOWERED = ("unevaluatedProperties", "unevaluatedItems", "if", "then", "else", "not", "oneOf",
            "dependentRequired", "dependentSchemas", "propertyNames")


_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")


def structure(value: Any) -> Any:
    """A ``const`` object or array as the schema of its structure: every key required and no other, each
    item in place, the leaves ``const`` (JSON Schema compares numbers by value, and so do these)."""
    if isinstance(value, dict):
        return {"type": "object", "properties": {k: structure(v) for k, v in value.items()},
                "required": list(value), "additionalProperties": False}
    if isinstance(value, list):
        out: dict[str, Any] = {"type": "array", "prefixItems": [structure(v) for v in value], "items": False}
        if value:
            out["minItems"] = len(value)
        return out
    return {"const": value}


def _needs_lowering(s: Any) -> bool:
    for _, node in walk(s):
        if any(k in node for k in _LOWERED):
            return True
        if any(isinstance(node.get(k), float) for k in _COUNTS):
            return True
        if isinstance(node.get("const"), (dict, list)) or (
                isinstance(node.get("enum"), list) and any(isinstance(v, (dict, list)) for v in node["enum"])):
            return True
    return False


def lower(schema: Any, property_names: bool = True, limit: int | None = None) -> Any:
    """The schema with the same valid instances, in keywords the engines enforce where a rewrite exists.

    ``property_names=False`` leaves ``propertyNames`` as it is (for our GBNF, which holds neither it
    nor the ``patternProperties`` it becomes). A rewrite longer than ``limit`` characters of JSON
    (default: the larger of ``MAX_GROWTH`` times the input and ``MAX_BYTES``) is not used.
    """
    if not isinstance(schema, dict) or not _needs_lowering(schema):
        return schema
    root = copy.deepcopy(schema)
    low = _Lowering(root)
    low.property_names = property_names
    try:
        out = low.node(root)
    except RecursionError:
        return schema
    if any(k in node for _, node in walk(out) for k in ("unevaluatedProperties", "unevaluatedItems")):
        # an unevaluated* left as it is reads the annotations of its in-place subschemas (an if without
        # then, a not, ...) that the other rewrites change: all or nothing
        return schema
    if limit is None:
        limit = max(MAX_GROWTH * len(json.dumps(schema)), MAX_BYTES)
    if len(json.dumps(out)) > limit:
        return schema  # the rewrite would grow the grammars past the bound: the keywords stay, listed
    if isinstance(out, dict) and "$defs" in root and "$defs" not in out:
        out = {**out, "$defs": root["$defs"]}
    return out
