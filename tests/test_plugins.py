"""A job kind from another installed package: found through the ``synapse_cli.kinds`` entry-point
group, with its command, its Python API shortcut, its settings section and its spec builder, and
without touching synapse. The package is installed the way pip leaves one: a module and a
``.dist-info`` folder with ``METADATA`` and ``entry_points.txt``, on the path of a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''
"""synapse_rev: reverses a text file (a third-party job kind)."""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from synapse_cli.config import Setting, text
from synapse_cli.jobs import JobKind


@dataclass
class RevSpec:
    input: str
    output: str
    suffix: str = ""
    overwrite: bool = False

    INPUTS: ClassVar[tuple] = ("input",)
    OUTPUTS: ClassVar[tuple] = ("output",)
    HOST_FIELDS: ClassVar[tuple] = ()


def reverse(spec):
    from synapse_cli.events import Artifact, Finished, Progress, Started
    from synapse_cli.jobs._files import atomic_output, check_output

    out = Path(spec.output)
    check_output(out, spec.overwrite)
    data = Path(spec.input).read_text()[::-1] + spec.suffix
    yield Started(job="rev", total=1)
    with atomic_output(out, spec.overwrite) as tmp:
        tmp.write_text(data)
    yield Progress(done=1, total=1)
    yield Artifact(path=str(out), bytes=len(data))
    yield Finished(result={"output": str(out), "text": data}, elapsed_s=0.0)


def build_spec(settings, input, *, output=None, overwrite=False, cache=True):
    """Reverse INPUT into OUTPUT (default: INPUT.rev)."""
    from synapse_cli.errors import UsageError

    if not Path(input).is_file():
        raise UsageError(f"input not found: {input}")
    return RevSpec(input=str(input), output=str(output or f"{input}.rev"), suffix=settings["rev.suffix"], overwrite=overwrite)


KIND = JobKind(
    name="rev",
    spec="synapse_rev:RevSpec",
    run="synapse_rev:reverse",
    build="synapse_rev:build_spec",
    options={"suffix": "rev.suffix"},
    command="synapse_rev_cli:rev",
    settings={"suffix": Setting("", text, "appended to the reversed text")},
    remote=False,
)
'''

COMMAND = '''
from pathlib import Path
from typing import Annotated, Optional

import typer

from synapse_cli.cli._options import with_common
from synapse_cli.cli._run import run_command


@with_common(local=True)
def rev(
    input: Annotated[Path, typer.Argument(help="A text file.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output")] = None,
    suffix: Annotated[Optional[str], typer.Option("--suffix")] = None,
    *,
    common,
) -> None:
    """Reverse a text file."""
    run_command("rev", common, input, output=output, suffix=suffix)
'''


def install(site: Path, entry: str = "rev = synapse_rev:KIND") -> Path:
    site.mkdir(parents=True, exist_ok=True)
    (site / "synapse_rev.py").write_text(textwrap.dedent(PLUGIN))
    (site / "synapse_rev_cli.py").write_text(textwrap.dedent(COMMAND))
    info = site / "synapse_rev-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: synapse-rev\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[synapse_cli.kinds]\n{entry}\n")
    (info / "RECORD").write_text("")
    return site


def python(site: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    paths = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full, timeout=120)


@pytest.fixture
def site(tmp_path) -> Path:
    return install(tmp_path / "site")


def test_an_installed_kind_is_a_command(site, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("abc")
    listed = python(site, "-m", "synapse_cli", "--help")
    assert listed.returncode == 0 and " rev " in listed.stdout, listed.stdout + listed.stderr
    run = python(site, "-m", "synapse_cli", "rev", str(src), "--suffix", "!", "--json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert events[-1]["type"] == "finished" and events[-1]["result"]["text"] == "cba!"
    assert (tmp_path / "in.txt.rev").read_text() == "cba!"
    missing = python(site, "-m", "synapse_cli", "rev", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"UsageError: input not found: {tmp_path / 'nope.txt'}"


def test_an_installed_kind_is_in_the_api_and_the_settings(site, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    code = (
        "import json, synapse_cli as s\n"
        f"a = s.run('rev', {str(src)!r}, output={str(tmp_path / 'a.txt')!r})\n"
        f"b = [e for e in s.rev({str(src)!r}, output={str(tmp_path / 'b.txt')!r}, suffix='?')][-1].result\n"
        "shown = s.settings()['settings']['rev.suffix']\n"
        "print(json.dumps([a['text'], b['text'], shown]))\n"
    )
    run = python(site, "-c", code, env={"SYNAPSE_REV_SUFFIX": "."})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == ["olleh.", "olleh?", {"value": ".", "source": "env:SYNAPSE_REV_SUFFIX"}]


def test_a_broken_plugin_is_skipped_with_one_line(tmp_path):
    site = install(tmp_path / "site", entry="rev = synapse_rev:NOT_THERE")
    run = python(site, "-m", "synapse_cli", "--help")
    assert run.returncode == 0
    assert " rev " not in run.stdout
    assert run.stderr.strip().splitlines() == ["synapse: skipping job kind plugin 'rev': AttributeError: module 'synapse_rev' has no attribute 'NOT_THERE'"]


def test_no_plugin_costs_no_metadata_import():
    code = "import sys, synapse_cli.jobs; print('importlib.metadata' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "False", run.stderr
