"""Checks and counters that schemathesis loads for tests/st_run.py's runs (``SCHEMATHESIS_HOOKS``).

- ``no_traceback``: no response body (nor header) carries a Python traceback or a source line of one.
- ``ndjson_items_conform``: every line of an ``application/x-ndjson`` body is JSON that the document's
  schema for that response accepts (schemathesis has no NDJSON deserializer: it would skip these bodies;
  the document gives the schema of one line, as OpenAPI 3.1 tools read a stream's schema).
- ``after_call``: one JSON line per request in ``$SYNAPSE_ST_REQUESTS`` (phase, method, path, status,
  time, and a 202's job id), so the test can count the requests and see the stateful chains.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jsonschema_rs
import schemathesis

NDJSON = "application/x-ndjson"
_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|File "[^"]+\.py", line \d+')
_validators: dict[tuple[str, str, str], Any] = {}


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    path = os.environ.get("SYNAPSE_ST_REQUESTS")
    if not path:
        return
    job = None
    if response.status_code == 202:
        try:
            job = json.loads(response.content)["id"]
        except (ValueError, KeyError, TypeError):
            pass
    phase = case.meta.phase.name.value if case.meta is not None else None
    line = {"phase": phase, "method": case.method, "path": case.formatted_path, "status": response.status_code,
            "elapsed": round(response.elapsed, 4), "job": job, "text": response.content[:160].decode("utf-8", "replace") if response.status_code >= 400 else None}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


@schemathesis.check
def no_traceback(ctx: Any, response: Any, case: Any) -> None:
    text = response.content.decode("utf-8", "replace")
    found = _TRACEBACK.search(text) or any(_TRACEBACK.search(str(v)) for v in response.headers.values())
    if found:
        raise AssertionError(f"a traceback in the response to {case.method} {case.path}: {found.group(0)!r}")


def _validator(case: Any, status: str) -> Any:
    key = (case.method, case.path, status)
    if key not in _validators:
        doc = case.operation.schema.raw_schema
        responses = case.operation.definition.raw.get("responses", {})
        content = (responses.get(status) or responses.get("default") or {}).get("content", {})
        schema = content.get(NDJSON, {}).get("schema")
        _validators[key] = None if schema is None else jsonschema_rs.Draft202012Validator({**schema, "components": doc.get("components", {})})
    return _validators[key]


@schemathesis.check
def ndjson_items_conform(ctx: Any, response: Any, case: Any) -> None:
    if response.headers.get("content-type", [""])[0].split(";")[0].strip() != NDJSON:
        return
    validator = _validator(case, str(response.status_code))
    if validator is None:
        raise AssertionError(f"{case.method} {case.path} answered {response.status_code} with NDJSON, which the document does not describe")
    for number, line in enumerate(response.content.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue  # a keep-alive
        item = json.loads(line)
        errors = [e.message for e in validator.iter_errors(item)]
        if errors:
            raise AssertionError(f"NDJSON line {number} of {case.method} {case.path} does not match the document: {errors[0]}: {line[:300]}")
