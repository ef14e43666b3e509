"""schemathesis' stateful phase against a real ``synapse serve`` on loopback: sequences of requests that
follow the OpenAPI document's links (a detached submit's 202, then the job's record, its events, its
cancel), with the checks of tests/st_run.py. The other phases are tests/test_serve_schemathesis.py.
"""

from __future__ import annotations

import pytest

from tests.st_run import require_schemathesis, run_schemathesis

require_schemathesis()
pytestmark = pytest.mark.slow

MIN_REQUESTS = 500
RERUNS = 3  # stateful runs with the next seeds, while the links were not all followed


def test_the_stateful_phase_follows_every_link_of_a_submitted_job_and_finds_nothing(tmp_path):
    # The stateful phase draws its steps at random, and which links it can follow depends on what the
    # server answered (a 202, or a 429 when two jobs already run): timing steers it. Where a run never
    # followed a detached submit to its record, events and cancel, it runs again with the next seed.
    outcome = run_schemathesis(tmp_path, "stateful", again=lambda lines: bool(unfollowed(lines)), reruns=RERUNS)
    outcome.check()
    assert len(outcome.lines) >= MIN_REQUESTS
    missing = unfollowed(outcome.lines)
    assert not missing, f"the stateful phase never followed a submit with {missing} on the same job"


def unfollowed(lines: list[dict]) -> list[str]:
    """The links (get, events, delete) that no stateful step followed from a detached submit on the same job."""
    stateful = [line for line in lines if line["phase"] == "stateful"]
    jobs = {line["job"] for line in stateful if line["job"]}
    followed = {op: {line["path"].split("/")[3] for line in stateful if line["method"] == method and line["path"].startswith("/v1/jobs/")
                     and line["path"].endswith(suffix) and line["path"].count("/") == depth}
                for op, method, suffix, depth in (("get", "GET", "", 3), ("events", "GET", "/events", 4), ("delete", "DELETE", "", 3))}
    return [op for op, ids in followed.items() if not jobs & ids]
