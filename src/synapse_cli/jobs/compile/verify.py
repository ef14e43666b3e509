"""Parent-side verification: serialisations to try, and whether a wrong accept is explained.

A wrong accept (a labelled-invalid instance the artefact admits) is *explained* when
the instance is valid against the schema with the engine's ignored keywords taken out:
the report already says the engine cannot enforce what makes it invalid.
"""

from __future__ import annotations

import json
from typing import Any

from synapse_cli.jobs.compile.normalize import strip_keywords


def _validator(schema: Any, with_formats: bool = True) -> Any:
    import jsonschema

    cls = jsonschema.Draft202012Validator
    return cls(schema, format_checker=cls.FORMAT_CHECKER if with_formats else None)


def candidates(kind: str, data: Any, schema: Any = None) -> list[str]:
    """The texts an engine may accept for ``data``: compact JSON, as given and in schema key order."""
    if kind != "json_schema":
        return [data] if isinstance(data, str) else []
    forms = [data]
    try:
        ordered = reorder(data, schema, schema, _validator(schema, with_formats=False))
    except Exception:  # a regex Python cannot compile, a deep recursion: keep the given order
        ordered = data
    forms.append(ordered)
    out: list[str] = []
    for form in forms:
        for ascii_only in (False, True):
            text = json.dumps(form, separators=(",", ":"), ensure_ascii=ascii_only)
            if text not in out:
                out.append(text)
    return out


def _applicable(schema: Any, root: Any, validator: Any, data: Any, depth: int = 0) -> list[dict]:
    """The object schemas that apply to ``data`` here: refs followed, allOf flattened, first matching anyOf/oneOf."""
    if not isinstance(schema, dict) or depth > 12:
        return []
    out = [schema]
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(ref, root)
        out += _applicable(target, root, validator, data, depth + 1)
    for part in schema.get("allOf", []) or []:
        out += _applicable(part, root, validator, data, depth + 1)
    for key in ("anyOf", "oneOf"):
        for part in schema.get(key, []) or []:
            if validator.evolve(schema=part).is_valid(data):
                out += _applicable(part, root, validator, data, depth + 1)
                break
    for key in ("then", "else"):
        if isinstance(schema.get(key), dict):
            out += _applicable(schema[key], root, validator, data, depth + 1)
    return out


def _resolve(ref: str, root: Any) -> Any:
    if ref == "#":
        return root
    if ref.startswith("#/$defs/") and isinstance(root, dict):
        return root.get("$defs", {}).get(ref[len("#/$defs/"):].replace("~1", "/").replace("~0", "~"))
    return None


def reorder(data: Any, schema: Any, root: Any, validator: Any, depth: int = 0) -> Any:
    """``data`` with object keys in the order the schema declares them (others after, as given)."""
    if depth > 64:
        return data
    if isinstance(data, dict):
        schemas = _applicable(schema, root, validator, data)
        order: list[str] = []
        subs: dict[str, Any] = {}
        for s in schemas:
            for name, sub in (s.get("properties") or {}).items():
                if name not in subs:
                    order.append(name)
                    subs[name] = sub
        extra = next((s["additionalProperties"] for s in schemas if isinstance(s.get("additionalProperties"), dict)), None)
        keys = [k for k in order if k in data] + [k for k in data if k not in subs]
        return {k: reorder(data[k], subs.get(k, extra), root, validator, depth + 1) for k in keys}
    if isinstance(data, list):
        schemas = _applicable(schema, root, validator, data)
        prefix: list[Any] = next((s["prefixItems"] for s in schemas if isinstance(s.get("prefixItems"), list)), [])
        items = next((s["items"] for s in schemas if isinstance(s.get("items"), dict)), None)
        return [reorder(x, prefix[i] if i < len(prefix) else items, root, validator, depth + 1) for i, x in enumerate(data)]
    return data


def explained(data: Any, schema: Any, ignored: list[str]) -> bool:
    """Is the wrong accept of ``data`` covered by the ignored keywords the report lists?"""
    if not ignored:
        return False
    stripped = strip_keywords(schema, set(ignored))
    try:
        return bool(_validator(stripped, with_formats="format" not in ignored).is_valid(data))
    except Exception:
        return False


def summarize(tests: list[dict], accepted: list[bool], schema: Any, ignored: list[str], kind: str) -> dict[str, Any]:
    """Counts per engine: accepted/rejected valid and invalid instances, wrong verdicts, pass."""
    va = vr = ia = ir = explained_n = 0
    failures: list[str] = []
    for test, ok in zip(tests, accepted):
        label = test.get("description") or json.dumps(test["data"], ensure_ascii=False)[:60]
        if test["valid"]:
            if ok:
                va += 1
            else:
                vr += 1
                failures.append(f"rejected valid: {label}")
        elif ok:
            ia += 1
            if kind == "json_schema" and explained(test["data"], schema, ignored):
                explained_n += 1
            else:
                failures.append(f"accepted invalid: {label}")
        else:
            ir += 1
    return {
        "valid_accepted": va,
        "valid_rejected": vr,
        "invalid_rejected": ir,
        "invalid_accepted": ia,
        "wrong_accepts_explained": explained_n,
        "passed_all": vr == 0 and ia == 0,
        "ok": vr == 0 and ia == explained_n,
        "failures": failures[:5],
    }
