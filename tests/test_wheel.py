"""Packaging: the wheel `pip wheel .` builds carries synapse_cli (its Modal app, synapse_cli/modal_app.py, included) and nothing top-level besides, and works
installed into a fresh venv (no system site-packages), run from outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    (found,) = dist.glob("synapse_cli-*.whl")
    return found


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("synapse_cli/modal_app.py", "synapse_cli/__init__.py", "synapse_cli/api.py",
                 "synapse_cli/ci.py", "synapse_cli/jobs/export/job.py", "synapse_cli/server/jobs.html"):
        assert name in names, name
    assert not any(n.startswith("tests/") for n in names)
    assert {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n} == {"synapse_cli"}  # no top-level package to collide in site-packages
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "synapse = synapse_cli.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path, modal_fake):
    venv = tmp_path / "venv"
    # no --system-site-packages; --without-pip: this pip installs into it (pip --python), so no pip of its own is
    # bootstrapped first (ensurepip took 4 CPU s, and the venv's older pip twice this one's time to install)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, synapse = venv / "bin" / "python", venv / "bin" / "synapse"
    # --no-compile: no .pyc for all of modal's, pydantic's and PyAV's modules up front (a third of the install's
    # CPU time); the few the commands below import are compiled as they are imported
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check", "--no-compile",
                              f"{wheel}[modal]"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # nothing from the checkout

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(synapse), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = subprocess.run([str(python), "-c", "import synapse_cli, synapse_cli.modal_app as m; print(synapse_cli.__file__); print(m.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    assert all(str(venv) in line and str(ROOT) not in line for line in where.stdout.splitlines())

    sample = run("sample", "s.mp4", "--seconds", "1", "--size", "320x240")
    assert sample.returncode == 0, sample.stderr
    export = run("export", "s.mp4", "--set", "output_width=180", "--set", "output_height=320", "--json")
    assert export.returncode == 0, export.stderr
    assert json.loads(export.stdout.splitlines()[-1])["result"]["width"] == 180 and (work / "s.framing.mp4").is_file()
    deploy = run("deploy", "--json")  # the real modal client against the fake control plane
    assert deploy.returncode == 0, deploy.stderr
    assert "export" in json.loads(deploy.stdout)["functions"]
    completion = subprocess.run(["bash", "-c", '"$@"; exit $?', "bash", str(synapse), "--show-completion"], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
    assert completion.returncode == 0 and "_SYNAPSE_COMPLETE" in completion.stdout


def test_shell_completion_and_metavars(cli):
    from tests.conftest import synapse_cmd

    # typer's --show-completion takes no value: it names the shell it runs under (shellingham reads the process
    # tree), so the command runs as a child of bash, whatever runs the tests
    shown = subprocess.run(["bash", "-c", '"$@"; exit $?', "bash", *synapse_cmd(), "--show-completion"], capture_output=True, text=True)
    assert shown.returncode == 0 and "_SYNAPSE_COMPLETE=complete_bash" in shown.stdout, shown.stderr
    completed = subprocess.run(synapse_cmd(), capture_output=True, text=True,
                               env={**os.environ, "_SYNAPSE_COMPLETE": "complete_bash", "COMP_WORDS": "synapse exp", "COMP_CWORD": "1"})
    assert completed.stdout.split() == ["export"]
    assert "--install-completion" in cli("--help").stdout
    help_text = cli("export", "--help").stdout
    assert "--set KEY=VALUE" in help_text and "<list[str]>" not in help_text
    assert "--court X1,Y1,...,X4,Y4" in cli("infer", "--help").stdout
