"""JSON Schema normalisation: one draft (2020-12), every ``$ref`` bundled into ``$defs``.

Engines disagree on drafts (``definitions`` vs ``$defs``, array ``items`` vs
``prefixItems``) and none of them follows file or ``$id`` references, so each
input is rewritten into a single self-contained 2020-12 document whose only
references are ``#`` and ``#/$defs/NAME``. Draft-07 and older ignore the
siblings of ``$ref``; we drop them so the meaning does not change.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urldefrag, urljoin

DIALECT_2020 = "https://json-schema.org/draft/2020-12/schema"

# keywords whose value is one subschema / a map of subschemas / a list of subschemas
SUB_ONE = (
    "additionalProperties", "contains", "propertyNames", "not", "if", "then", "else",
    "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema", "items",
)
SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUB_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")

# keywords that restrict instances (2020-12 validation + applicators); everything else is an annotation
VALIDATION_KEYWORDS = frozenset(
    """type enum const multipleOf maximum exclusiveMaximum minimum exclusiveMinimum maxLength minLength
    pattern maxItems minItems uniqueItems maxContains minContains maxProperties minProperties required
    dependentRequired format allOf anyOf oneOf not if then else dependentSchemas prefixItems items
    contains properties patternProperties additionalProperties propertyNames unevaluatedItems
    unevaluatedProperties $ref $dynamicRef""".split()
)


class InputError(Exception):
    """A bad input: ``pointer`` is the JSON pointer of the offending place in the input document."""

    def __init__(self, pointer: str, message: str) -> None:
        super().__init__(pointer, message)
        self.pointer = pointer
        self.message = message


def escape(token: Any) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer_of(path: Any) -> str:
    return "".join("/" + escape(p) for p in path)


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def detect_draft(schema: Any) -> int:
    """4, 6, 7, 2019 or 2020; without ``$schema``, draft-07 if it uses draft-07-only shapes."""
    declared = schema.get("$schema") if isinstance(schema, dict) else None
    if isinstance(declared, str):
        for tag, draft in (("draft-04", 4), ("draft-03", 4), ("draft-06", 6), ("draft-07", 7), ("2019-09", 2019), ("2020-12", 2020)):
            if tag in declared:
                return draft
    for _, sub in walk(schema):
        if "definitions" in sub or "dependencies" in sub or "additionalItems" in sub or isinstance(sub.get("items"), list):
            return 7
    return 2020


def children(schema: dict, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Direct subschemas of ``schema`` with their paths."""
    for key, value in schema.items():
        if key in SUB_MAP and isinstance(value, dict):
            for name, sub in value.items():
                yield path + (key, name), sub
        elif key in SUB_LIST and isinstance(value, list):
            for i, sub in enumerate(value):
                yield path + (key, i), sub
        elif key in SUB_ONE and isinstance(value, (dict, bool)):
            yield path + (key,), value
        elif key == "dependencies" and isinstance(value, dict):
            for name, sub in value.items():
                if isinstance(sub, (dict, bool)):
                    yield path + (key, name), sub


def walk(schema: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every subschema that is an object, depth first, root included."""
    if not isinstance(schema, dict):
        return
    stack = [(path, schema)]
    while stack:
        p, node = stack.pop()
        yield p, node
        kids = [(cp, c) for cp, c in children(node, p) if isinstance(c, dict)]
        stack.extend(reversed(kids))


def keywords_used(schema: Any) -> set[str]:
    """Validation keywords that occur anywhere in the schema (annotations and unknown keys left out)."""
    used: set[str] = set()
    for _, node in walk(schema):
        used.update(k for k in node if k in VALIDATION_KEYWORDS)
    return used


def strip_keywords(schema: Any, ignored: set[str] | frozenset[str]) -> Any:
    """The schema an engine really enforces when it ignores ``ignored``.

    Ignoring ``oneOf`` means enforcing it as ``anyOf`` (no engine checks exclusivity);
    ignoring ``format`` leaves the format an annotation. Used to tell an explained wrong
    accept from a real one.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ignored and key not in ("oneOf", "$defs"):  # $defs holds ref targets, not a constraint
            continue
        if key == "oneOf" and "oneOf" in ignored and isinstance(value, list):
            alts = [strip_keywords(s, ignored) for s in value]
            if "anyOf" in out or "anyOf" in schema:
                out.setdefault("allOf", []).append({"anyOf": alts})
            else:
                out["anyOf"] = alts
            continue
        if key in SUB_MAP and isinstance(value, dict):
            out[key] = {n: strip_keywords(s, ignored) for n, s in value.items()}
        elif key in SUB_LIST and isinstance(value, list):
            out[key] = [strip_keywords(s, ignored) for s in value]
        elif key in SUB_ONE and isinstance(value, (dict, bool)):
            out[key] = strip_keywords(value, ignored)
        else:
            out[key] = value
    return out


# -- bundling --------------------------------------------------------------------------


def resolve_pointer(doc: Any, pointer: str) -> Any:
    node = doc
    if pointer in ("", "/"):
        return doc if pointer == "" else node.get("") if isinstance(node, dict) else None
    for raw in pointer.lstrip("/").split("/"):
        token = _unescape(raw)
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise KeyError(pointer)
    return node


def _id_of(node: Any, draft: int) -> str | None:
    """The node's base-changing identifier: ``id`` in draft-04, ``$id`` later."""
    if not isinstance(node, dict):
        return None
    own = node.get("id") if draft <= 4 else node.get("$id")
    return own if isinstance(own, str) else None


class _Doc:
    def __init__(self, data: Any, uri: str, draft: int) -> None:
        self.data = data
        self.uri = uri
        self.draft = draft
        self.ids: dict[str, str] = {}  # absolute URI of an embedded resource -> its pointer
        self.anchors: dict[tuple[str, str], str] = {}  # (resource URI, anchor) -> pointer
        self._index(data, "", uri)

    def _index(self, node: Any, ptr: str, base: str) -> None:
        if not isinstance(node, dict):
            return
        own = _id_of(node, self.draft)
        if own is not None:
            if own.startswith("#") and self.draft <= 7:  # draft-07 location-independent id
                self.anchors[(urldefrag(base)[0], own[1:])] = ptr
            else:
                base = urljoin(base, own)
                self.ids.setdefault(urldefrag(base)[0], ptr)
        anchor = node.get("$anchor")
        if isinstance(anchor, str):
            self.anchors[(urldefrag(base)[0], anchor)] = ptr
        for cpath, sub in children(node):
            self._index(sub, ptr + pointer_of(cpath), base)

    def base_at(self, ptr: str) -> str:
        base, node = self.uri, self.data
        own = _id_of(node, self.draft)
        if own and not own.startswith("#"):
            base = urljoin(base, own)
        for raw in [t for t in ptr.split("/")[1:]]:
            token = _unescape(raw)
            if isinstance(node, dict):
                node = node.get(token)
            elif isinstance(node, list) and token.isdigit():
                node = node[int(token)]
            else:
                break
            own = _id_of(node, self.draft)
            if own and not own.startswith("#"):
                base = urljoin(base, own)
        return base


class Bundler:
    """Rewrite ``schema`` (read from ``path``) into one 2020-12 document with local ``$defs``."""

    def __init__(self, schema: Any, path: Path | None, load: Callable[[Path], Any] | None = None) -> None:
        self.root_uri = path.resolve().as_uri() if path else "https://synapse.invalid/input.json"
        self.root = _Doc(schema, self.root_uri, detect_draft(schema))
        self.docs: dict[str, _Doc] = {self.root_uri: self.root}
        self.load = load or (lambda p: json.loads(p.read_text(encoding="utf-8")))
        self.names: dict[tuple[str, str], str] = {}
        self.defs: dict[str, Any] = {}
        self.taken: set[str] = set()

    def run(self) -> Any:
        data = self.root.data
        if isinstance(data, dict):
            for key in ("$defs", "definitions"):
                if isinstance(data.get(key), dict):
                    self.taken.update(data[key])
        out = self._up(data, self.root, "")
        if isinstance(out, dict):
            out = {"$schema": DIALECT_2020, **{k: v for k, v in out.items() if k != "$schema"}}
            if self.defs:
                out["$defs"] = {**out.get("$defs", {}), **self.defs}
        return out

    # -- draft upgrade, refs rewritten on the way -------------------------------------------

    def _up(self, node: Any, doc: _Doc, ptr: str) -> Any:
        if not isinstance(node, dict):
            return copy.deepcopy(node)
        draft = doc.draft
        if "$ref" in node and draft <= 7:  # siblings of $ref are ignored before 2019-09
            keep = {"$ref", "definitions", "$defs", "title", "description", "$comment", "default", "examples"}
            node = {k: v for k, v in node.items() if k in keep}
        out: dict[str, Any] = {}
        items_is_list = isinstance(node.get("items"), list)
        for key, value in node.items():
            here = f"{ptr}/{escape(key)}"
            if key in ("$schema", "$id", "$anchor") or (key == "id" and draft <= 4 and isinstance(value, str)):
                continue
            if key == "$ref" and isinstance(value, str):
                out["$ref"] = self._ref(value, doc, ptr, here)
            elif key == "definitions" and isinstance(value, dict):
                defs = out.setdefault("$defs", {})
                for n, s in value.items():
                    defs.setdefault(n, self._up(s, doc, f"{here}/{escape(n)}"))
            elif key in SUB_MAP and isinstance(value, dict):
                target = out.setdefault(key, {})
                for n, s in value.items():
                    target[n] = self._up(s, doc, f"{here}/{escape(n)}")
            elif key == "items" and items_is_list and draft < 2020:
                out["prefixItems"] = [self._up(s, doc, f"{here}/{i}") for i, s in enumerate(value)]
                if "additionalItems" in node:
                    out["items"] = self._up(node["additionalItems"], doc, f"{ptr}/additionalItems")
            elif key == "additionalItems" and draft < 2020:
                continue  # meaningful only beside an items list (handled there)
            elif key == "dependencies" and isinstance(value, dict):
                for n, d in value.items():
                    if isinstance(d, list):
                        out.setdefault("dependentRequired", {})[n] = list(d)
                    else:
                        out.setdefault("dependentSchemas", {})[n] = self._up(d, doc, f"{here}/{escape(n)}")
            elif key in SUB_LIST and isinstance(value, list):
                out[key] = [self._up(s, doc, f"{here}/{i}") for i, s in enumerate(value)]
            elif key in SUB_ONE and isinstance(value, (dict, bool)):
                out[key] = self._up(value, doc, here)
            elif key in ("exclusiveMaximum", "exclusiveMinimum") and isinstance(value, bool):
                bound = "maximum" if key == "exclusiveMaximum" else "minimum"
                if value and isinstance(node.get(bound), (int, float)):
                    out[key] = node[bound]
            elif key in ("maximum", "minimum") and node.get("exclusive" + key.capitalize()) is True:
                continue  # draft-04: became exclusiveMaximum/exclusiveMinimum
            else:
                out[key] = copy.deepcopy(value)
        return out

    def _ref(self, ref: str, doc: _Doc, ptr: str, where: str) -> str:
        base = doc.base_at(ptr)
        absolute = urljoin(base, ref)
        uri, fragment = urldefrag(absolute)
        fragment = unquote(fragment)
        target_doc, res_ptr = self._resource(uri, doc, where, ref)
        if fragment and not fragment.startswith("/"):
            key = (uri, fragment)
            if key not in target_doc.anchors:
                raise InputError(where, f"unresolvable $ref {ref!r}: no anchor {fragment!r}")
            target_ptr = target_doc.anchors[key]
        else:
            target_ptr = res_ptr + fragment
        try:
            resolve_pointer(target_doc.data, target_ptr)
        except KeyError:
            raise InputError(where, f"unresolvable $ref {ref!r}") from None
        if target_ptr == "" and target_doc is self.root:
            return "#"
        m = re.fullmatch(r"/(definitions|\$defs)/([^/]+)", target_ptr)
        if m and target_doc is self.root:
            return "#/$defs/" + escape(_unescape(m.group(2)))
        return "#/$defs/" + escape(self._copy(target_doc, target_ptr))

    def _resource(self, uri: str, doc: _Doc, where: str, ref: str) -> tuple[_Doc, str]:
        for d in (doc, *self.docs.values()):
            if uri == urldefrag(d.uri)[0]:
                return d, ""
            if uri in d.ids:
                return d, d.ids[uri]
        if uri.startswith("file:"):
            from urllib.parse import urlparse
            from urllib.request import url2pathname

            path = Path(url2pathname(urlparse(uri).path))
            try:
                data = self.load(path)
            except FileNotFoundError:
                raise InputError(where, f"unresolvable $ref {ref!r}: {path} not found") from None
            except (OSError, ValueError) as exc:
                raise InputError(where, f"unresolvable $ref {ref!r}: {path}: {exc}") from None
            new = _Doc(data, uri, detect_draft(data))
            self.docs[uri] = new
            return new, ""
        known = _metaschema(uri)
        if known is not None:  # the JSON Schema meta-schemas ship with jsonschema
            new = _Doc(known, uri, detect_draft(known))
            self.docs[uri] = new
            return new, ""
        raise InputError(where, f"unresolvable $ref {ref!r} (remote references are not fetched)")

    def _copy(self, doc: _Doc, ptr: str) -> str:
        key = (doc.uri, ptr)
        if key in self.names:
            return self.names[key]
        stem = Path(urldefrag(doc.uri)[0]).stem if doc is not self.root else ""
        words = [w for w in re.split(r"[^A-Za-z0-9_]+", stem + "/" + ptr.replace("~1", "_")) if w]
        base = "_".join(words[-3:]) or "root"
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        self.names[key] = name
        self.defs[name] = None  # reserve before recursing (recursive schemas)
        self.defs[name] = self._up(resolve_pointer(doc.data, ptr), doc, ptr)
        return name


def _metaschema(uri: str) -> Any:
    try:
        from jsonschema_specifications import REGISTRY
    except ImportError:  # pragma: no cover - jsonschema always brings it
        return None
    for candidate in (uri, uri + "#", uri.rstrip("#")):
        try:
            return REGISTRY.contents(candidate)
        except Exception:  # referencing raises its own NoSuchResource
            continue
    return None


def normalize(schema: Any, path: Path | None = None) -> Any:
    """The normalized 2020-12 schema; raises InputError for unresolvable references."""
    if isinstance(schema, bool):
        return schema
    return Bundler(schema, path).run()
