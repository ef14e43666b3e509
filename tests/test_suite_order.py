"""The suite's own schedule under pytest-xdist: the heaviest files start first, and xdist keeps that order."""

from __future__ import annotations

import shlex
import tomllib

from tests.conftest import HEAVY_FIRST, ROOT


def test_xdist_keeps_the_heavy_first_order():
    addopts = shlex.split(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"])
    # without it xdist re-sorts files by their number of tests, and a one-test file of minutes starts last
    assert "--no-loadscope-reorder" in addopts and addopts[addopts.index("--dist") + 1] == "loadfile"


def test_every_heavy_file_exists_once():
    # a renamed or split file would drop out of the ranking silently and could start last
    assert len(set(HEAVY_FIRST)) == len(HEAVY_FIRST)
    missing = [name for name in HEAVY_FIRST if not (ROOT / "tests" / name).is_file()]
    assert not missing, missing
