"""ruff and mypy, as configured in pyproject.toml ([tool.ruff], [tool.mypy]: strict on pipeline/, backends/,
store/), are part of the suite, so README's test command (and .ci/run, which runs it) checks them too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is in the dev extra (bash scripts/install-dev.sh)")
    return found


def test_ruff_is_clean():
    run = subprocess.run([_tool("ruff"), "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean():
    run = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)  # (its cache, .mypy_cache, makes a rerun quick)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
