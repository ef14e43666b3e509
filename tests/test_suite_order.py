"""The suite's own schedule under pytest-xdist: the heaviest files start first, and xdist keeps that order."""

from __future__ import annotations

import shlex
import tomllib

from tests.conftest import HEAVY_FIRST, ROOT, WAITING, schedule


def test_xdist_keeps_the_heavy_first_order():
    addopts = shlex.split(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"])
    # without it xdist re-sorts files by their number of tests, and a one-test file of minutes starts last
    assert "--no-loadscope-reorder" in addopts and addopts[addopts.index("--dist") + 1] == "loadfile"


def test_every_ranked_file_exists_once():
    # a renamed or split file would drop out of the ranking silently and could start last
    ranked = HEAVY_FIRST + WAITING
    assert len(set(ranked)) == len(ranked)
    missing = [name for name in ranked if not (ROOT / "tests" / name).is_file()]
    assert not missing, missing


def test_the_schedule_hands_out_every_file_once_heavy_first_with_the_waiting_ones_between():
    files = sorted(path.name for path in (ROOT / "tests").glob("test_*.py"))
    order = schedule(files)
    assert sorted(order) == files
    ranked = order[: len(HEAVY_FIRST) + len(WAITING)]
    assert [name for name in ranked if name in HEAVY_FIRST] == list(HEAVY_FIRST)
    assert ranked[:4] == list(HEAVY_FIRST[:4])
    spots = [order.index(name) for name in WAITING]
    assert all(b - a == 2 for a, b in zip(spots, spots[1:]))  # never two waiting files side by side
