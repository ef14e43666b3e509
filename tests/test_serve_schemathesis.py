"""schemathesis against a real ``synapse serve`` on loopback: the OpenAPI document drives the requests.

schemathesis (pinned in the ``dev`` extra) reads ``/v1/openapi.json`` and generates requests from it:
boundary and wrong-type cases for every parameter and body field (its coverage phase), random ones (its
fuzzing phase), and stateful sequences that follow the document's links (a detached submit's 202, then
the job's record, its events, its cancel). Its CLI runs in a subprocess with a fixed seed and
``--max-examples``, with the checks that hold the server to its document:

- ``not_a_server_error``: no 5xx;
- ``status_code_conformance``, ``content_type_conformance``, ``response_headers_conformance``,
  ``response_schema_conformance``: every response as documented (the SSE form of ``/events`` included:
  each event's ``id``, ``event`` and ``data``, the data being a documented event);
- ``unsupported_method``: a method the document does not list is a 405 whose ``Allow`` lists those it does;
- ours (tests/schemathesis_hooks.py): ``no_traceback`` in any body, and ``ndjson_items_conform``: every
  NDJSON line of a streamed job or of ``/events`` is an event the document describes.

Not run: schemathesis' ``positive_data_acceptance`` and ``negative_data_rejection``. The document describes
a spec's fields and types; the server also checks what JSON Schema cannot say (that an upload is a real tar,
that a part names an input, that an output name has a container), and it reads specs as the CLI does
(pydantic's lax mode: ``0`` for ``false``), so both would report the server's designed answers.

The server runs with a raised wrong-key limit (``SYNAPSE_SERVE_MAX_KEY_FAILURES``): schemathesis sends wrong
keys on purpose, and with the default limit the rest of its run would see 429s. Jobs it manages to start are
stopped after half a second (``SYNAPSE_SERVE_JOB_TIMEOUT_S``), two at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.http_fixtures import API_KEY, serve_process

pytest.importorskip("schemathesis")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261207
MAX_EXAMPLES = 100
MIN_REQUESTS = 2000
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,unsupported_method,no_traceback,ndjson_items_conform")
RUN_LIMIT_S = 540  # the whole run; it takes about 2 minutes on an idle 2-core machine
STATEFUL_RERUNS = 3  # stateful-only runs with the next seeds, while the links were not all followed


def _st() -> list[str]:
    exe = Path(sys.executable).with_name("st")
    return [str(exe)] if exe.exists() else [shutil.which("st") or "st"]


def test_schemathesis_finds_nothing_in_2000_requests_driven_by_the_openapi_document(tmp_path):
    work = tmp_path / "srv"
    requests_log = tmp_path / "requests.ndjson"
    env = {
        "SYNAPSE_SERVE_MAX_KEY_FAILURES": "1000000000",  # its negative cases send wrong keys
        "SYNAPSE_SERVE_JOB_TIMEOUT_S": "0.5",
        "SYNAPSE_SERVE_MAX_CONCURRENT_JOBS": "2",
        "SYNAPSE_SERVE_MIN_FREE_MB": "0",
    }
    runs: list[subprocess.CompletedProcess] = []
    with serve_process(work, env=env) as (url, server, log):
        st_env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "SYNAPSE_ST_REQUESTS": str(requests_log),
                  "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "NO_COLOR": "1"}
        cmd = [*_st(), "run", f"{url}/v1/openapi.json", "-H", f"Authorization: Bearer {API_KEY}",
               "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--checks", CHECKS,
               "--request-timeout", "20", "--generation-database", "none", "--no-color"]
        started = time.monotonic()
        runs.append(subprocess.run([*cmd, "--seed", str(SEED)], cwd=tmp_path, env=st_env, capture_output=True, text=True, timeout=RUN_LIMIT_S))
        # The stateful phase draws its steps at random, and which links it can follow depends on what the
        # server answered (a 202, or a 429 when two jobs already run): timing steers it. Where a run never
        # followed a detached submit to its record, events and cancel, it runs again with the next seed.
        for extra in range(1, STATEFUL_RERUNS + 1):
            if not _unfollowed(_lines(requests_log)) or runs[-1].returncode != 0:
                break
            runs.append(subprocess.run([*cmd, "--phases", "stateful", "--seed", str(SEED + extra)], cwd=tmp_path,
                                       env=st_env, capture_output=True, text=True, timeout=RUN_LIMIT_S))
        elapsed = time.monotonic() - started
        assert server.poll() is None, "the server died during the run"
        log = list(log)
    lines = _lines(requests_log)
    statuses: dict[int, int] = {}
    for line in lines:
        statuses[line["status"]] = statuses.get(line["status"], 0) + 1
    phases = {p: sum(1 for line in lines if line["phase"] == p) for p in sorted({str(line["phase"]) for line in lines})}
    print(f"schemathesis: {len(lines)} requests in {elapsed:.0f} s ({len(lines) / max(elapsed, 1e-9):.1f}/s), {len(runs)} run(s); "
          f"by phase {phases}; by status {dict(sorted(statuses.items()))}")
    for run in runs:
        print(run.stdout[-6000:])
        assert run.returncode == 0, f"schemathesis failed (exit {run.returncode}):\n{run.stdout[-20000:]}\n{run.stderr[-4000:]}"
    assert len(lines) >= MIN_REQUESTS
    assert not [s for s in statuses if s >= 500]
    # the stateful phase followed the document's links: a job submitted detached, then its record, its events and its cancel
    unfollowed = _unfollowed(lines)
    assert not unfollowed, f"the stateful phase never followed a submit with {unfollowed} on the same job"
    logged = sum("Traceback (most recent call last)" in line for line in log)
    print(f"tracebacks in the server's log (a job that failed with an unexpected exception, never in a body): {logged}")


def _lines(requests_log: Path) -> list[dict]:
    return [json.loads(line) for line in requests_log.read_text().splitlines()] if requests_log.exists() else []


def _unfollowed(lines: list[dict]) -> list[str]:
    """The links (get, events, delete) that no stateful step followed from a detached submit on the same job."""
    stateful = [line for line in lines if line["phase"] == "stateful"]
    jobs = {line["job"] for line in stateful if line["job"]}
    followed = {op: {line["path"].split("/")[3] for line in stateful if line["method"] == method and line["path"].startswith("/v1/jobs/")
                     and line["path"].endswith(suffix) and line["path"].count("/") == depth}
                for op, method, suffix, depth in (("get", "GET", "", 3), ("events", "GET", "/events", 4), ("delete", "DELETE", "", 3))}
    return [op for op, ids in followed.items() if not jobs & ids]
