"""schemathesis' CLI against a real ``synapse serve`` on loopback: what tests/test_serve_schemathesis.py
(its examples, coverage and fuzzing phases) and tests/test_serve_schemathesis_stateful.py (its stateful
phase) share. The phases run as two tests, each with a server of its own, so that the suite's workers run
them side by side (together they took 2-4 minutes, the suite's longest test).

The run is ``st run`` in a subprocess with a fixed seed and ``--max-examples``, with the checks that hold
the server to its document:

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.http_fixtures import API_KEY, serve_process

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261207
MAX_EXAMPLES = 100
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,unsupported_method,no_traceback,ndjson_items_conform")
RUN_LIMIT_S = 540  # one run; the longer phase takes about a minute and a half on an idle 2-core machine
SERVER_ENV = {
    "SYNAPSE_SERVE_MAX_KEY_FAILURES": "1000000000",  # its negative cases send wrong keys
    "SYNAPSE_SERVE_JOB_TIMEOUT_S": "0.5",
    "SYNAPSE_SERVE_MIN_FREE_MB": "0",
    "SYNAPSE_SERVE_MAX_CONCURRENT_JOBS": "2",
}


@dataclass
class Outcome:
    runs: list[subprocess.CompletedProcess]
    lines: list[dict]  # one per request (tests/schemathesis_hooks.py's after_call)
    elapsed: float
    log: list[str]  # the server's stderr
    server_cpu: tuple[float, float]  # CPU seconds of the server, and of its jobs' processes (ffmpeg) that ended

    def check(self) -> None:
        """Print what ran; every run passed its checks, and no response was a 5xx."""
        statuses: dict[int, int] = {}
        for line in self.lines:
            statuses[line["status"]] = statuses.get(line["status"], 0) + 1
        phases = {p: sum(1 for line in self.lines if line["phase"] == p) for p in sorted({str(line["phase"]) for line in self.lines})}
        print(f"schemathesis: {len(self.lines)} requests in {self.elapsed:.0f} s ({len(self.lines) / max(self.elapsed, 1e-9):.1f}/s), "
              f"{len(self.runs)} run(s); by phase {phases}; by status {dict(sorted(statuses.items()))}; "
              f"server CPU {self.server_cpu[0]:.1f} s, its jobs' {self.server_cpu[1]:.1f} s")
        for run in self.runs:
            print(run.stdout[-6000:])
            assert run.returncode == 0, f"schemathesis failed (exit {run.returncode}):\n{run.stdout[-20000:]}\n{run.stderr[-4000:]}"
        assert not [s for s in statuses if s >= 500]
        logged = sum("Traceback (most recent call last)" in line for line in self.log)
        print(f"tracebacks in the server's log (a job that failed with an unexpected exception, never in a body): {logged}")


def require_schemathesis() -> None:
    """Skip the module without schemathesis (the dev extra). Found, not imported: its CLI is what runs, and
    pytest would rewrite the asserts of its 150-odd modules in every worker that imported it."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("schemathesis") is None:
        pytest.skip("schemathesis is not installed (the dev extra)", allow_module_level=True)


def _st() -> list[str]:
    exe = Path(sys.executable).with_name("st")
    return [str(exe)] if exe.exists() else [shutil.which("st") or "st"]


def run_schemathesis(tmp_path: Path, phases: str, again: Callable[[list[dict]], bool] = lambda lines: False, reruns: int = 0) -> Outcome:
    """``st run`` with ``phases`` against a fresh server; then, while ``again(requests so far)`` and the
    last run passed, up to ``reruns`` more runs with the next seeds."""
    requests_log = tmp_path / "requests.ndjson"
    runs: list[subprocess.CompletedProcess] = []
    with serve_process(tmp_path / "srv", env=SERVER_ENV) as (url, server, log):
        st_env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "SYNAPSE_ST_REQUESTS": str(requests_log),
                  "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "NO_COLOR": "1"}
        cmd = [*_st(), "run", f"{url}/v1/openapi.json", "-H", f"Authorization: Bearer {API_KEY}", "--phases", phases,
               "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--checks", CHECKS,
               "--request-timeout", "20", "--generation-database", "none", "--no-color"]
        started = time.monotonic()
        for extra in range(reruns + 1):
            if runs and (runs[-1].returncode != 0 or not again(read_lines(requests_log))):
                break
            runs.append(subprocess.run([*cmd, "--seed", str(SEED + extra)], cwd=tmp_path, env=st_env, capture_output=True, text=True, timeout=RUN_LIMIT_S))
        elapsed = time.monotonic() - started
        assert server.poll() is None, "the server died during the run"
        times = psutil.Process(server.pid).cpu_times()
        log = list(log)
    return Outcome(runs, read_lines(requests_log), elapsed, log, (times.user + times.system, times.children_user + times.children_system))


def read_lines(requests_log: Path) -> list[dict]:
    return [json.loads(line) for line in requests_log.read_text().splitlines()] if requests_log.exists() else []
