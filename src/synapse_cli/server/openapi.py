"""The OpenAPI document of ``GET /v1/openapi.json``: the whole API, streamed and detached.

FastAPI's generated document is the base (its paths, operation ids and the app's title and
version). The routes read their requests by hand (the body is streamed into the job's folder), so
what FastAPI cannot see is filled in here from the same records everything else derives from:

- one concrete ``POST /v1/jobs/<kind>`` per registered kind (``synapse_cli.jobs.JOBS``), whose
  ``multipart/form-data`` body has the ``spec`` part (the kind's spec dataclass as JSON Schema, via
  pydantic) and one file part per ``INPUTS`` field (an array of files for a list field), plus the
  ``application/json`` form for kinds without inputs; ``?detach=`` and ``?shards=``;
- the NDJSON event stream (``application/x-ndjson``, one event per line: the media type's schema is
  one line's) and its SSE form (``text/event-stream``: the schema is one event's, its ``id``,
  ``event`` and ``data``, the data being the NDJSON line, as OpenAPI 3.1 tools such as schemathesis
  read a stream's schema), the job record, the error shape and the status codes of each route.

Built once per app, on first request: kinds registered later (tests) appear in a new app.
"""

from __future__ import annotations

import os
from typing import Any

from synapse_cli import __version__
from synapse_cli.protocol import NDJSON, SSE

_ERRORS = {
    "400": "bad filename, malformed multipart, a spec that is not JSON, a part that is not an input",
    "401": "missing or wrong API key",
    "403": "a web page's request (Origin) or a non-loopback Host, without the key",
    "404": "unknown job kind, job or artifact",
    "408": "the upload sent nothing for serve.body_timeout_s",
    "409": "the job has already ended (DELETE)",
    "410": "the artifact has expired (its job is still recorded)",
    "413": "the upload is larger than max_upload_mb",
    "415": "a content type other than multipart/form-data, JSON or a urlencoded form",
    "422": "an unknown or mistyped spec field, a bad query parameter, a notify URL the server refuses",
    "429": "every job slot (or the detached queue) is taken, or too many wrong keys (Retry-After)",
    "503": "the server is shutting down, or its work dir is unavailable",
    "507": "the work dir's disk is too full for the upload",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_responses(*codes: str) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": {"application/json": {"schema": _ref("Error")}}} for c in codes}


def _event_schemas() -> dict[str, Any]:
    """One schema per event class (``events.py``), each with its ``type`` constant."""
    from dataclasses import fields

    from pydantic import TypeAdapter

    from synapse_cli.events import _TYPES

    out: dict[str, Any] = {}
    for type_name, cls in _TYPES.items():
        schema = TypeAdapter(cls).json_schema()
        schema.pop("$defs", None)
        props = {"type": {"const": type_name, "type": "string"}, **schema.get("properties", {})}
        required = ["type", *[f.name for f in fields(cls) if f.name in schema.get("required", [])]]
        out[f"{cls.__name__}Event"] = {"title": f"{cls.__name__}Event", "description": (cls.__doc__ or "").strip() or f"a {type_name} event",
                                      "type": "object", "properties": props, "required": required}
    return out


def _spec_schema(cls: type, components: dict[str, Any]) -> dict[str, Any]:
    try:
        from pydantic import TypeAdapter

        schema = TypeAdapter(cls).json_schema(ref_template="#/components/schemas/{model}")
    except Exception:  # noqa: BLE001 - a spec pydantic cannot describe: an object, checked by the server
        return {"type": "object", "title": cls.__name__}
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    if isinstance(schema.get("properties"), dict):  # not a field of the kind: where the job's signed webhooks go (docs/webhooks.md)
        schema["properties"]["notify"] = {"type": ["string", "null"], "format": "uri", "default": None,
                                          "description": "webhook URL the job's events are POSTed to, signed with the server's secret (422 on a refused address)"}
    return schema


def _kind_operation(name: str, components: dict[str, Any]) -> dict[str, Any]:
    from synapse_cli.jobs import get_kind

    kind = get_kind(name)
    spec_name = f"{name.capitalize()}Spec"
    try:
        cls = kind.spec_class()
    except ImportError:
        components[spec_name] = {"type": "object", "title": spec_name, "description": "this kind is not available on this server"}
        inputs: tuple[str, ...] = ()
    else:
        components[spec_name] = spec = _spec_schema(cls, components)
        inputs = tuple(getattr(cls, "INPUTS", ()))
        if spec.get("type") == "object" and "properties" in spec:
            spec["additionalProperties"] = False  # the server refuses a field the spec does not have (422)
            for field, cap in getattr(cls, "SERVER_CAPS", {}).items():  # and a value over this server's cap (422)
                if field in spec["properties"]:
                    spec["properties"][field]["maximum"] = cap
    spec_props = components[spec_name].get("properties", {})
    multipart_props: dict[str, Any] = {"spec": {**_ref(spec_name), "description": "the job's spec as JSON (a form field)"}}
    encoding: dict[str, Any] = {"spec": {"contentType": "application/json"}}
    required_parts = ["spec"]
    for field in inputs:
        file = {"type": "string", "format": "binary",
                "description": f"the file for the spec's {field!r}; a part with Content-Type application/x-synapse-dir+tar is a directory (an uncompressed tar)"}
        listed = spec_props.get(field, {}).get("type") == "array"
        multipart_props[field] = {"type": "array", "items": file, "description": f"one part per path of the spec's {field!r}, in order"} if listed else file
        encoding[field] = {"contentType": "application/octet-stream, application/x-synapse-dir+tar"}
        if field in components[spec_name].get("required", []):
            required_parts.append(field)
    content: dict[str, Any] = {"multipart/form-data": {"schema": {"type": "object", "properties": multipart_props, "required": required_parts,
                                                                  "additionalProperties": False},  # another part is a 400
                                                       "encoding": encoding}}
    if not inputs:
        content["application/json"] = {"schema": _ref(spec_name)}
    return {
        "operationId": f"run_{name}",
        "summary": f"Run a {name} job: stream its events, or (detach=true) start it and answer with its id",
        "tags": ["jobs"],
        "parameters": [
            {"name": "detach", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
             "description": "true: answer 202 at once; the job runs on the server (see /v1/jobs/{job_id})"},
            {"name": "shards", "in": "query", "required": False,
             "schema": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": os.cpu_count() or 1}, {"type": "string", "enum": ["auto"]}]},
             "description": "split the job across this many worker processes of the server (at most one per core)"},
            _REPORT_WEBHOOKS,
        ],
        "requestBody": {"required": True, "content": content},
        "responses": {
            "200": {"description": "the job's events as they happen, one JSON object per line; the last is `finished` or `error`; blank lines are keep-alives",
                    "headers": {"X-Synapse-Job": {"schema": {"type": "string"}, "description": "the job's id"}},
                    "content": {NDJSON: {"schema": _ref("Event")}}},
            "202": {"description": "detach=true: the job is recorded and queued",
                    "headers": {"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"}},
                    "content": {"application/json": {"schema": _ref("DetachedJob")}},
                    "links": _job_links("$response.body#/id")},
            **_error_responses("400", "401", "403", "404", "408", "413", "415", "422", "429", "503", "507"),
        },
    }


_REPORT_WEBHOOKS = {"name": "report_webhooks", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
                    "description": "true (NDJSON): after the job's last event, once the server's sender is done with its webhooks, "
                                   "one `webhooks` line (a DeliveriesEvent) says what became of each"}


def _components() -> dict[str, Any]:
    events = _event_schemas()
    error_props = {"code": {"type": "integer", "description": "the CLI's exit code: 1 job, 2 usage, 3 backend, 130 interrupted/cancelled"},
                   "message": {"type": "string"}, "error": {"type": "string", "description": "the error class: JobError, UsageError, BackendError, Interrupted"}}
    indexed = {"allOf": [_ref("Event"), {"type": "object", "properties": {"index": {"type": "integer", "minimum": 0}}, "required": ["index"]}]}
    return {
        **events,
        "Event": {"title": "Event", "description": "one line of a job's event stream (synapse_cli.events)",
                  "oneOf": [_ref(n) for n in events], "discriminator": {"propertyName": "type",
                                                                       "mapping": {s["properties"]["type"]["const"]: f"#/components/schemas/{n}" for n, s in events.items()}}},
        "IndexedEvent": {"title": "IndexedEvent", "description": "a stored event as /events sends it: its index (0-based) added", **indexed},
        "ServerSentEvent": {"title": "ServerSentEvent", "type": "object", "required": ["id", "event", "data"],
                            "description": "one Server-Sent Event of /events (Accept: text/event-stream); `: keepalive` comments carry no event",
                            "properties": {
                                "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the event's index (send it back as Last-Event-ID to resume)"},
                                "event": {"type": "string", "enum": sorted(s["properties"]["type"]["const"] for s in events.values()),
                                          "description": "the event's type"},
                                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref("IndexedEvent"),
                                         "description": "the event as one NDJSON line would carry it (an IndexedEvent)"},
                                "retry": {"type": "integer", "minimum": 0}}},
        "Keepalive": {"title": "Keepalive", "type": "object", "properties": {"type": {"const": "keepalive", "type": "string"}}, "required": ["type"],
                      "description": "sent while a job is silent (no index): skip it"},
        "Error": {"title": "Error", "type": "object", "properties": {"type": {"const": "error", "type": "string"}, **error_props},
                  "required": ["type", "code", "message", "error"]},
        "JobError": {"title": "JobError", "type": "object", "properties": error_props, "required": ["code", "message", "error"]},
        "DetachedJob": {"title": "DetachedJob", "type": "object", "required": ["id", "status", "links"], "properties": {
            "id": {"type": "string"}, "status": {"type": "string", "enum": ["pending"]},
            "links": {"type": "object", "required": ["self", "events", "cancel"], "properties": {
                "self": {"type": "string"}, "events": {"type": "string"}, "cancel": {"type": "string"}}}}},
        "Artifact": {"title": "Artifact", "type": "object", "required": ["path", "bytes", "url"], "properties": {
            "path": {"type": ["string", "null"], "description": "where the client saves it (the spec's output path as sent)"},
            "bytes": {"type": ["integer", "null"]}, "url": {"type": "string", "description": "download path, relative to the endpoint"}}},
        "JobRecord": {"title": "JobRecord", "type": "object",
                      "required": ["id", "kind", "status", "progress", "created_at", "started_at", "finished_at", "result", "error", "artifacts"],
                      "properties": {
                          "id": {"type": "string"}, "kind": {"type": "string"},
                          "status": {"type": "string", "enum": ["pending", "processing", "completed", "failed", "cancelled"]},
                          "progress": {"type": "object", "required": ["done", "total"], "properties": {
                              "done": {"type": ["number", "null"]}, "total": {"type": ["number", "null"]}}},
                          "created_at": {"type": ["string", "null"], "format": "date-time"},
                          "started_at": {"type": ["string", "null"], "format": "date-time"},
                          "finished_at": {"type": ["string", "null"], "format": "date-time"},
                          "result": {"type": ["object", "null"], "description": "the finished event's result"},
                          "error": {"anyOf": [_ref("JobError"), {"type": "null"}]},
                          "artifacts": {"type": "array", "items": _ref("Artifact")},
                          "webhooks": {"type": "array", "description": "what became of each webhook message (only for a job with notify)",
                                       "items": _ref("WebhookDelivery")}}},
        "WebhookDelivery": {"title": "WebhookDelivery", "type": "object", "required": ["event", "webhook_id", "outcome", "attempts"], "properties": {
            "event": {"type": "string", "enum": ["started", "progress", "finished", "error", "cancelled"]}, "webhook_id": {"type": "string"},
            "target": {"type": ["string", "null"]}, "outcome": {"type": "string", "enum": ["delivered", "failed", "gone"]},
            "attempts": {"type": "integer"}, "http_status": {"type": ["integer", "null"]}, "detail": {"type": ["string", "null"]},
            "at": {"type": ["string", "null"], "format": "date-time"}}},
        "JobList": {"title": "JobList", "type": "object", "required": ["jobs"], "properties": {"jobs": {"type": "array", "items": _ref("JobRecord")}}},
        "Health": {"title": "Health", "type": "object", "required": ["status", "version", "jobs", "max_upload_mb", "auth"], "properties": {
            "status": {"type": "string"}, "version": {"type": "string"}, "jobs": {"type": "array", "items": {"type": "string"}},
            "max_upload_mb": {"type": "integer"}, "auth": {"type": "string", "enum": ["none", "bearer"]}}},
    }


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _job_links(job_id: str, *operations: str) -> dict[str, Any]:
    """OpenAPI links from a response naming a job to what may follow it: its record, its events, its cancel
    (generated clients and stateful testers such as schemathesis follow them: submit, get, events, delete)."""
    return {op: {"operationId": op, "parameters": {"job_id": job_id}, "description": f"{op} of the job this response names"}
            for op in operations or ("get_job", "job_events", "cancel_job")}


def _static_operations() -> dict[str, dict[str, Any]]:
    record = {"application/json": {"schema": _ref("JobRecord")}}
    return {
        "/v1/health": {"get": {
            "operationId": "health", "summary": "Status, version, job kinds, upload limit, auth mode (no key needed)", "tags": ["server"], "security": [],
            "responses": {"200": {"description": "the server is up", "content": {"application/json": {"schema": _ref("Health")}}},
                          **_error_responses("403", "429")}}},
        "/v1/jobs": {"get": {
            "operationId": "list_jobs", "summary": "The server's detached jobs, newest first", "tags": ["detached jobs"],
            "parameters": [
                {"name": "status", "in": "query", "required": False, "schema": {"type": "string", "enum": ["pending", "processing", "completed", "failed", "cancelled"]}},
                {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}}],
            "responses": {"200": {"description": "the jobs", "content": {"application/json": {"schema": _ref("JobList")}}},
                          **_error_responses("401", "403", "422", "429")}}},
        "/v1/jobs/{job_id}": {
            "get": {"operationId": "get_job", "summary": "A detached job's record", "tags": ["detached jobs"], "parameters": [_JOB_ID],
                    "responses": {"200": {"description": "the record", "content": record, "links": _job_links("$response.body#/id", "job_events", "cancel_job")},
                                  **_error_responses("401", "403", "404", "429")}},
            "delete": {"operationId": "cancel_job", "summary": "Cancel a detached job: its processes are killed, its outputs removed",
                       "tags": ["detached jobs"], "parameters": [_JOB_ID],
                       "responses": {"200": {"description": "cancelled; the record", "content": record}, **_error_responses("401", "403", "404", "409", "429")}}},
        "/v1/jobs/{job_id}/events": {"get": {
            "operationId": "job_events", "summary": "A detached job's events from index `after`, then live until its last event", "tags": ["detached jobs"],
            "parameters": [_JOB_ID,
                           {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "default": 0},
                            "description": "the first index to send (0-based)"},
                           {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
                            "description": "resume after this index (SSE reconnects); wins over `after`"},
                           {"name": "Accept", "in": "header", "required": False, "schema": {"type": "string", "enum": [NDJSON, SSE]},
                            "description": "text/event-stream: Server-Sent Events"},
                           _REPORT_WEBHOOKS],
            "responses": {"200": {"description": "NDJSON: one IndexedEvent per line, {\"type\":\"keepalive\"} lines while silent. "
                                                 "SSE: `id: <index>`, `event: <type>`, `data: <the NDJSON line>`; `: keepalive` comments",
                                  "content": {NDJSON: {"schema": {"oneOf": [_ref("IndexedEvent"), _ref("Keepalive"), _ref("DeliveriesEvent")]}},
                                              SSE: {"schema": _ref("ServerSentEvent")}}},
                          **_error_responses("401", "403", "404", "422", "429")}}},
        "/v1/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document", "tags": ["server"],
            "responses": {"200": {"description": "the OpenAPI document", "content": {"application/json": {"schema": {"type": "object"}}}},
                          **_error_responses("401", "403", "429")}}},
        "/v1/artifacts/{artifact_id}": {"get": {
            "operationId": "get_artifact", "summary": "An output file of a job", "tags": ["jobs"],
            "parameters": [{"name": "artifact_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,64}\\.[0-9]{1,6}$"}}],
            "responses": {"200": {"description": "the file", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                          **_error_responses("401", "403", "404", "410", "429")}}},
    }


def build(app: Any) -> dict[str, Any]:
    """The document for ``app``: FastAPI's, with every synapse route described."""
    from fastapi.openapi.utils import get_openapi

    from synapse_cli.jobs import JOBS

    doc = get_openapi(title="synapse", version=__version__, openapi_version="3.1.0", routes=app.routes,
                      description="Every synapse job kind over HTTP: streamed (NDJSON) or detached (poll, follow, cancel). See docs/http.md.")
    components: dict[str, Any] = {**doc.get("components", {}).get("schemas", {}), **_components()}
    paths: dict[str, Any] = {}
    for path, ops in doc.get("paths", {}).items():  # routes we do not describe (added by others) keep FastAPI's description
        if path != "/v1/jobs/{kind}":
            paths[path] = {m: op for m, op in ops.items() if not (path == "/v1/jobs/{job_id}" and m == "post")}
    for path, ops in _static_operations().items():
        paths[path] = {**paths.get(path, {}), **ops}
    for name in JOBS:
        paths[f"/v1/jobs/{name}"] = {"post": _kind_operation(name, components)}
    for path, ops in paths.items():  # every operation says its errors in our shape, not FastAPI's default 422
        for op in ops.values():
            responses = op.get("responses", {})
            if "422" in responses and "HTTPValidationError" in str(responses["422"]):
                responses["422"] = _error_responses("422")["422"]
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    doc["paths"] = dict(sorted(paths.items()))
    doc["components"] = {
        "schemas": components,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "the server's API key (SYNAPSE_API_KEY)"},
            "session": {"type": "apiKey", "in": "cookie", "name": "synapse_session", "description": "the jobs page's session (POST /v1/session)"},
        },
    }
    doc["security"] = [{"bearer": []}, {"session": []}]
    return doc
