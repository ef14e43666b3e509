"""The GitHub Action (action.yml) and synapse's output inside GitHub Actions.

The action's ``run:`` steps are executed by bash under a simulated runner: ``GITHUB_OUTPUT``,
``GITHUB_STEP_SUMMARY`` and ``GITHUB_ACTIONS`` set to temporary files and values, the step's
``env:`` evaluated from the inputs as the runner would. ``action.yml`` is linted against a JSON
Schema of the action metadata written from GitHub's documentation.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "data" / "action-metadata.schema.json").read_text())
EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


@pytest.fixture(scope="module")
def action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def validate(data: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [e.message for e in validator.iter_errors(data)]


# -- the metadata ---------------------------------------------------------------------------


def test_action_yml_is_valid_metadata(action):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert validate(action) == []
    assert set(action["inputs"]) == {"command", "version", "extras", "python-version", "modal-token-id", "modal-token-secret"}
    assert set(action["outputs"]) == {"result", "outputs", "job-id", "seconds", "estimated-cost-usd"}
    assert action["inputs"]["command"]["required"] is True


def test_the_schema_catches_mistakes(action):
    no_shell = copy.deepcopy(action)
    del no_shell["runs"]["steps"][-1]["shell"]
    no_value = copy.deepcopy(action)
    del no_value["outputs"]["result"]["value"]
    bad_key = copy.deepcopy(action)
    bad_key["inputs"]["command"]["type"] = "string"  # inputs have no types
    for broken in (no_shell, no_value, bad_key, {k: v for k, v in action.items() if k != "description"}):
        assert validate(broken), broken


def test_expressions_name_declared_inputs_and_never_reach_a_script(action):
    """Inputs reach scripts through env only (no script injection); tokens never on a command line."""
    steps = action["runs"]["steps"]
    for step in steps:
        assert not EXPR.search(step.get("run", "")), f"expression inside run: {step.get('name')}"
        for value in [*step.get("env", {}).values(), *step.get("with", {}).values()]:
            for expr in EXPR.findall(str(value)):
                for name in re.findall(r"inputs\.([A-Za-z0-9_-]+)", expr):
                    assert name in action["inputs"], name
    for name, output in action["outputs"].items():
        assert EXPR.fullmatch(output["value"]).group(1) == f"steps.run.outputs.{name}"
    run = next(s for s in steps if s.get("id") == "run")
    assert run["env"]["MODAL_TOKEN_SECRET"] == "${{ inputs.modal-token-secret }}"
    assert "modal-token" not in run["run"]


# -- the run steps, under a simulated runner --------------------------------------------------


def _evaluate(value: str, inputs: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        expr = match.group(1)
        if expr.startswith("inputs."):
            return inputs.get(expr[len("inputs."):], "")
        raise AssertionError(f"the simulated runner does not evaluate {expr!r}")

    return EXPR.sub(one, value)


def run_step(action: dict, step_id: str, inputs: dict[str, str], runner: Path) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run one ``run:`` step as the runner would: bash, the step's env from the inputs, GITHUB_* files."""
    declared = {name: spec.get("default", "") for name, spec in action["inputs"].items()}
    step = next(s for s in action["runs"]["steps"] if s.get("id") == step_id)
    assert step["shell"] == "bash"
    files = {"GITHUB_OUTPUT": runner / "output", "GITHUB_STEP_SUMMARY": runner / "summary.md"}
    for f in files.values():
        f.touch()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GITHUB_ACTIONS": "true",
        "GITHUB_ACTION_PATH": str(ROOT),
        **{k: str(v) for k, v in files.items()},
        **{k: _evaluate(str(v), {**declared, **inputs}) for k, v in step.get("env", {}).items()},
    }
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], env=env, capture_output=True, text=True)
    return proc, parse_outputs(files["GITHUB_OUTPUT"].read_text())


def parse_outputs(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT's two forms: ``name=value`` and ``name<<DELIM`` ... ``DELIM``."""
    out, lines = {}, iter(text.splitlines())
    for line in lines:
        if "<<" in line:
            name, delimiter = line.split("<<", 1)
            value = []
            for body in lines:
                if body == delimiter:
                    break
                value.append(body)
            out[name] = "\n".join(value)
        elif "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
    return out


def test_run_step_sets_outputs_and_summary(action, db, tiny, tmp_path):
    out = tmp_path / "o.mp4"
    command = f"export {tiny} --set output_width=90 --set output_height=160 -o {out}"
    proc, outputs = run_step(action, "run", {"command": command}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(outputs) == {"result", "outputs", "job-id", "seconds", "estimated-cost-usd"}
    result = json.loads(outputs["result"])
    assert result["output"] == str(out) and out.is_file()
    assert json.loads(outputs["outputs"]) == [str(out)]
    assert float(outputs["seconds"]) >= 0 and float(outputs["estimated-cost-usd"]) == 0.0
    from synapse_cli.store import JobStore

    store = JobStore(db)
    assert store.get(outputs["job-id"]).status == "completed"
    store.close()
    summary = (tmp_path / "summary.md").read_text()
    assert "| job | backend | status | time | output |" in summary
    assert re.search(r"\| \u2705 \| export \| local \| completed \| [0-9.]+ s \| `" + re.escape(str(out)), summary)
    assert "::group::" in proc.stdout and '"type":"finished"' in proc.stdout


def test_run_step_failure_annotates_and_exits_with_the_code(action, db, tiny, tmp_path):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(tiny.read_bytes()[:3000])
    proc, outputs = run_step(action, "run", {"command": f"export {cut} -o {tmp_path / 'o.mp4'}"}, tmp_path)
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stdout.splitlines() if line.startswith("::error ")]
    assert len(error) == 1
    assert error[0].startswith("::error title=synapse export%3A UsageError,file=")
    assert f"file={cut}::" in error[0]  # the input it names (outside the workspace: as given)
    assert json.loads(outputs["result"])["type"] == "error" and outputs["job-id"]
    assert "| \u274c | export | local | failed |" in (tmp_path / "summary.md").read_text()


def test_modal_token_is_masked_and_never_printed(action, db, tmp_path):
    proc, _ = run_step(action, "run", {"command": "export missing.mp4", "modal-token-id": "ak-123", "modal-token-secret": "as-s3cr3t"}, tmp_path)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).splitlines()
    assert "::add-mask::as-s3cr3t" in lines
    assert [line for line in lines if "as-s3cr3t" in line] == ["::add-mask::as-s3cr3t"]


def test_install_step_requirement(tmp_path):
    script = ROOT / "src" / "synapse_cli" / "ci.py"  # run by path: synapse is not installed yet

    def requirement(**env: str) -> str:
        run = subprocess.run([sys.executable, str(script), "requirement"], env={"PATH": os.environ["PATH"], "GITHUB_ACTION_PATH": str(ROOT), **env},
                             capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert requirement() == f"synapse-cli @ {ROOT.as_uri()}"
    assert requirement(INPUT_EXTRAS="modal, infer") == f"synapse-cli[modal,infer] @ {ROOT.as_uri()}"
    assert requirement(INPUT_VERSION="0.1.0", INPUT_EXTRAS="modal") == "synapse-cli[modal]==0.1.0"
    assert requirement(INPUT_VERSION=">=0.1,<0.2") == "synapse-cli>=0.1,<0.2"


# -- the plain renderer inside GitHub Actions ---------------------------------------------------


def test_github_actions_groups_the_log_and_annotates_failures(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "--set", "output_width=90", "--set", "output_height=160", "-o", tmp_path / "o.mp4", env={"GITHUB_ACTIONS": "true"})
    assert run.exit_code == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines[0] == "export: started" and lines[1] == "::group::export log"
    end = lines.index("::endgroup::")
    assert any("wrote" in line for line in lines[2:end]) and lines[end + 1].startswith("export: finished")
    assert "::" not in run.stdout

    Path("cut.mp4").write_bytes(tiny.read_bytes()[:3000])  # in the workspace: file= is relative to it
    failed = cli("export", "cut.mp4", "-o", tmp_path / "x.mp4", env={"GITHUB_ACTIONS": "true"})
    assert failed.exit_code == 2
    error = failed.stderr.splitlines()[-1]
    assert error.startswith("::error title=synapse%3A UsageError,file=cut.mp4::cut.mp4 is not readable media")


def test_gitlab_and_pipes_keep_plain_lines(cli, db, tiny, tmp_path):
    for env in ({"GITLAB_CI": "true", "CI": "true"}, {}):
        run = cli("export", tiny, "--set", "output_width=90", "--set", "output_height=160", "-o", tmp_path / f"o{len(env)}.mp4", env=env)
        assert run.exit_code == 0, run.stderr
        assert "::" not in run.stderr
        failed = cli("export", tmp_path / "missing.mp4", env=env)
        assert failed.exit_code == 2 and "::error" not in failed.stderr


def test_workflow_command_escaping():
    from synapse_cli.render.plain import error_annotation, workflow_command

    assert workflow_command("error", "a%b\nc", title="x: y, z") == "::error title=x%3A y%2C z::a%25b%0Ac"
    assert error_annotation("t", "no file named here") == "::error title=t::no file named here"
