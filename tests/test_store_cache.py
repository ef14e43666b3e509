"""A detached job is keyed in the result cache like an attached one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


SMALL = ["--set", "output_width=90", "--set", "output_height=160"]


def test_an_identical_job_after_a_detached_one_reuses_its_result(cli, db, tiny, tmp_path):
    job_id = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", *SMALL).stdout.strip()
    assert cli("jobs", "wait", job_id).exit_code == 0
    again = cli("export", tiny, "-o", tmp_path / "a.mp4", "--json", *SMALL)
    assert again.exit_code == 0, again.stderr
    assert any(e["type"] == "log" and f"reusing the result of job {job_id}" in e["message"] for e in again.events())
    assert not any(e["type"] == "progress" for e in again.events())  # nothing was encoded
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "d.mp4").read_bytes()


def test_a_detached_no_cache_job_has_no_key(cli, db, tiny, tmp_path):
    job_id = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", "--no-cache", *SMALL).stdout.strip()
    assert cli("jobs", "wait", job_id).exit_code == 0
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["cache_key"] is None
