"""schemathesis against a real ``synapse serve`` on loopback, its examples, coverage and fuzzing phases:
the OpenAPI document drives the requests.

schemathesis (pinned in the ``dev`` extra) reads ``/v1/openapi.json`` and generates requests from it:
the document's examples, boundary and wrong-type cases for every parameter and body field (its coverage
phase) and random ones (its fuzzing phase). The checks, and why two of schemathesis' are not run, are in
tests/st_run.py; the stateful phase is tests/test_serve_schemathesis_stateful.py. Together they send more
than 2000 requests.
"""

from __future__ import annotations

import pytest

from tests.st_run import require_schemathesis, run_schemathesis

require_schemathesis()
pytestmark = pytest.mark.slow

MIN_REQUESTS = 1500


def test_schemathesis_finds_nothing_in_1500_requests_driven_by_the_openapi_document(tmp_path):
    outcome = run_schemathesis(tmp_path, "examples,coverage,fuzzing")
    outcome.check()
    assert len(outcome.lines) >= MIN_REQUESTS
    assert {line["phase"] for line in outcome.lines} >= {"coverage", "fuzzing"}
