"""``synapse compile`` end to end through the typer app: real engines in real worker processes.

Most runs use llguidance, outlines and llama.cpp (xgrammar's import alone takes seconds:
its own tests are marked slow). Each compile spawns worker processes, so each test
costs about a second.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import require

pytest.importorskip("llguidance")
pytest.importorskip("outlines_core")

DATA = Path(__file__).parent / "data" / "compile"
FAST = "llguidance,outlines,llama.cpp"


def _find(events, kind):
    return [e for e in events if e["type"] == kind]


@pytest.fixture(autouse=True)
def patient_engines(clean_environ, monkeypatch):
    """These tests are about artefacts, not timeouts (test_engine_timeout_is_reported_not_hung is): a loaded
    2-core machine can take more than the default 10 s to start the llama.cpp check's engine in a worker."""
    monkeypatch.setenv("SYNAPSE_COMPILE_ENGINE_TIMEOUT_S", "120")


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "in"
    shutil.copytree(DATA, d)
    return d


def test_compile_one_schema_writes_every_artefact_and_report(cli, data):
    run = cli("compile", data / "person.json", "-o", "out", "--engine", FAST, "--check", data / "person.checks.jsonl", "--json")
    assert run.exit_code == 0, run.stderr
    events = run.events()
    assert events[0]["type"] == "started" and events[0]["total"] == 1
    assert events[-1]["type"] == "finished"
    dones = [e["done"] for e in _find(events, "progress")]
    assert dones == sorted(dones)
    out = Path("out")
    assert sorted(p.name for p in out.iterdir()) == ["person.gbnf", "person.lark", "person.regex", "person.report.json", "person.schema.json"]
    assert {e["path"] for e in _find(events, "artifact")} == {str(out / p) for p in ("person.schema.json", "person.lark", "person.regex", "person.gbnf", "person.report.json")}
    report = json.loads((out / "person.report.json").read_text())
    assert report["content_hash"].startswith("sha256:") and report["synapse_version"]
    eng = report["engines"]
    assert set(eng) == {"llguidance", "outlines", "llama.cpp"}
    # llguidance and our GBNF enforce every keyword here: exact on all 14 instances
    for name, suffix in (("llguidance", "lark"), ("outlines", "regex"), ("llama.cpp", "gbnf")):
        assert eng[name]["artefact_bytes"] == (out / f"person.{suffix}").stat().st_size > 0  # each artefact's size
    for name in ("llguidance", "llama.cpp"):
        assert eng[name]["supported"] and eng[name]["ignored_keywords"] == []
        assert eng[name]["check"]["valid_accepted"] == 3 and eng[name]["check"]["invalid_rejected"] == 11
    # outlines ignores the integer bounds, says so, and its wrong accept is explained by that
    o = eng["outlines"]
    assert o["ignored_keywords"] == ["maximum", "minimum"]
    assert o["check"]["invalid_accepted"] == o["check"]["wrong_accepts_explained"] == 1 and o["check"]["ok"]
    result = events[-1]["result"]
    assert result["inputs"][0]["support"] == {"llguidance": True, "outlines": True, "llama.cpp": True}
    assert run.stderr == "" or "Error" not in run.stderr


def test_plain_mode_summary_on_stdout_progress_on_stderr(cli, data):
    run = cli("compile", data / "shapes.json", "-o", "out", "--engine", "llguidance,llama.cpp")
    assert run.exit_code == 0, run.stderr
    assert run.stdout.splitlines()[0] == "compiled 1 of 1 inputs into out"
    assert "shapes: llguidance, llama.cpp" in run.stdout
    assert "compile: started" in run.stderr and "compile:" not in run.stdout


@pytest.mark.parametrize(
    "fname,pointer",
    [("not-json.json", ": not JSON"), ("not-schema.json", "#/type: not a valid JSON Schema"),
     ("bad-ref.json", "#/properties/a/$ref: unresolvable $ref"), ("bad-regex.json", "#/pattern: regex")],
)
def test_single_bad_input_exits_2_with_one_line(cli, data, fname, pointer):
    run = cli("compile", data / fname, "-o", "out", "--engine", FAST)
    assert run.exit_code == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"UsageError: {data / fname}{pointer}")
    assert not Path("out").exists() or not any(Path("out").iterdir())


def test_batch_with_one_broken_file_compiles_the_rest_and_exits_1(cli, data):
    batch = data / "batch"
    batch.mkdir()
    for name in ("person.json", "shapes.json", "bad-ref.json"):
        shutil.copy(data / name, batch / name)
    run = cli("compile", batch, "-o", "out", "--engine", "llguidance", "--json")
    assert run.exit_code == 1
    events = run.events()
    assert events[-1]["type"] == "error" and events[-1]["code"] == 1
    result = _find(events, "finished")[0]["result"]
    status = {r["name"]: r["status"] for r in result["inputs"]}
    assert status == {"person": "ok", "shapes": "ok", "bad-ref": "invalid"}
    assert result["failed"] == 1 and result["compiled"] == 2
    assert (Path("out") / "person.lark").is_file() and not (Path("out") / "bad-ref.lark").exists()
    assert "bad-ref" in run.stderr and "#/properties/a/$ref" in run.stderr


def test_a_batch_that_failed_in_part_is_recorded_failed_and_never_answered_from_the_store(cli, data, db, tmp_path):
    """compile reports failed inputs after its result: the store keeps the result but says failed,
    so the same command runs again (and exits 1 again) and `jobs wait` on a detached one exits 1."""
    batch = data / "batch"
    batch.mkdir()
    for name in ("person.json", "bad-ref.json"):
        shutil.copy(data / name, batch / name)
    first = cli("compile", batch, "-o", "out", "--engine", "llguidance", "--json")
    again = cli("compile", batch, "-o", "out", "--engine", "llguidance", "--json", "--overwrite")
    assert first.exit_code == again.exit_code == 1, again.stderr
    assert not _find(again.events(), "finished")[0]["result"].get("cached_from")
    listed = json.loads(cli("jobs", "list", "--json").stdout)["jobs"]
    assert [j["status"] for j in listed] == ["failed", "failed"]
    shown = json.loads(cli("jobs", "show", listed[0]["id"], "--json").stdout)
    assert shown["result"]["failed"] == 1 and shown["result"]["compiled"] == 1 and shown["error_code"] == 1

    job_id = cli("compile", batch, "-o", "detached", "--engine", "llguidance", "--detach").stdout.strip()
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 1, waited.stdout
    assert [e["type"] for e in waited.events()][-2:] == ["finished", "error"] and "bad-ref" in waited.stderr
    assert (Path("detached") / "person.lark").is_file()
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["status"] == "failed"


def test_cache_hit_is_fast_and_no_cache_recompiles(cli, data):
    first = cli("compile", data / "person.json", "--engine", FAST, "--json", "-o", "out1")
    assert first.exit_code == 0 and _find(first.events(), "finished")[0]["result"]["cache_hits"] == 0
    # not the same job (fewer engines), but the same schema: every engine result comes from the cache
    t0 = time.perf_counter()
    second = cli("compile", data / "person.json", "--engine", "llguidance,llama.cpp", "--json", "-o", "out2")
    elapsed = time.perf_counter() - t0
    result = _find(second.events(), "finished")[0]["result"]
    assert result["cache_hits"] == 1 and result["inputs"][0]["cached"]
    assert elapsed < 1.5  # no worker started, no engine imported
    for suffix in ("gbnf", "lark", "schema.json"):
        assert (Path("out1") / f"person.{suffix}").read_text() == (Path("out2") / f"person.{suffix}").read_text()
    # the identical command again is answered from the job store; --no-cache compiles afresh
    again = cli("compile", data / "person.json", "--engine", "llguidance,llama.cpp", "--json", "-o", "out2")
    assert _find(again.events(), "finished")[0]["result"].get("cached_from")
    third = cli("compile", data / "person.json", "--engine", "llguidance,llama.cpp", "--json", "-o", "out3", "--no-cache")
    assert _find(third.events(), "finished")[0]["result"]["cache_hits"] == 0


def test_existing_outputs_need_overwrite(cli, data):
    args = ("compile", data / "shapes.json", "-o", "out", "--engine", "llguidance", "--no-cache")
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 2 and "already exists (use --overwrite" in again.stderr
    assert cli(*args, "--overwrite").exit_code == 0


def test_unreported_wrong_accept_fails_the_input(cli, data, tmp_path):
    # oneOf with overlapping branches that no rewrite makes exclusive (an integer type has no complement
    # written): every engine enforces it as anyOf and reports oneOf as ignored, so 3 is an explained wrong accept ...
    schema = tmp_path / "one.json"
    schema.write_text(json.dumps({"oneOf": [{"type": "integer"}, {"minimum": 2}]}))
    checks = tmp_path / "c.jsonl"
    checks.write_text(json.dumps({"data": 3, "valid": False}) + "\n" + json.dumps({"data": 1, "valid": True}) + "\n")
    run = cli("compile", schema, "-o", "out", "--engine", "llguidance,llama.cpp", "--check", checks, "--json")
    assert run.exit_code == 0, run.stderr
    report = json.loads((Path("out") / "one.report.json").read_text())
    assert "oneOf" in report["engines"]["llama.cpp"]["ignored_keywords"]
    # ... while a mislabelled instance (valid data said to be invalid) is an accept nothing explains
    checks.write_text(json.dumps({"data": {"name": "Ada", "role": "admin"}, "valid": False}) + "\n")
    run = cli("compile", data / "person.json", "-o", "out2", "--engine", "llguidance", "--check", checks)
    assert run.exit_code == 1
    assert "accepted invalid" in run.stdout and "JobError: 1 of 1 inputs failed" in run.stderr


@pytest.mark.slow  # the GBNF re-check imports xgrammar (seconds) in the worker
def test_constraint_set_regex_and_grammar(cli, data):
    run = cli("compile", data / "guardrails.json", "-o", "out", "--engine", FAST, "--json")
    assert run.exit_code == 0, run.stderr
    out = Path("out")
    names = sorted(p.name for p in out.iterdir())
    assert "guardrails.answer.schema.json" in names and "guardrails.ticket.regex" in names
    assert "guardrails.yesno.gbnf" in names and "guardrails.yesno.lark" in names
    assert (out / "guardrails.ticket.regex").read_text() == "[A-Z]{2,4}-[0-9]+"
    yesno = json.loads((out / "guardrails.yesno.report.json").read_text())
    assert yesno["engines"]["outlines"]["supported"] is False
    assert "grammars" in yesno["engines"]["outlines"]["error"]
    for name in ("llguidance", "llama.cpp"):
        assert yesno["engines"][name]["check"]["passed_all"]
    ticket = json.loads((out / "guardrails.ticket.report.json").read_text())
    assert ticket["severity"] == "warning" and all(e["check"]["passed_all"] for e in ticket["engines"].values())


def test_engine_timeout_is_reported_not_hung(tmp_path):
    """outlines-core needs seconds (7 s here) to index this schema's regex: killed at the timeout, reported, run goes on."""
    from synapse_cli.events import Finished
    from synapse_cli.jobs.compile.job import CompileSpec, compile_constraints

    spec = CompileSpec(inputs=[str(DATA / "slow-for-outlines.json")], output_dir=str(tmp_path / "o"),
                       engines=["llguidance", "outlines"], use_cache=False, engine_timeout_s=0.5)
    t0 = time.perf_counter()
    events = list(compile_constraints(spec))
    assert time.perf_counter() - t0 < 8
    row = [e for e in events if isinstance(e, Finished)][0].result["inputs"][0]
    assert row["engines"]["outlines"] == {**row["engines"]["outlines"], "supported": False, "error": "timed out after 0.5s"}
    assert row["engines"]["llguidance"]["supported"] and row["status"] == "ok"
    assert not (tmp_path / "o" / "slow-for-outlines.regex").exists()


def test_bad_flags_are_usage_errors(cli, data):
    run = cli("compile", data / "person.json", "--engine", "llguidance,vllm")
    assert run.exit_code == 2 and "unknown engine 'vllm'" in run.stderr
    run = cli("compile", data / "person.json", "--check", data / "nope.jsonl")
    assert run.exit_code == 2 and "--check file not found" in run.stderr


def test_engines_and_output_dir_from_config(cli, data):
    Path(".synapse.toml").write_text('[compile]\nengines = ["llguidance"]\noutput_dir = "from-config"\n')
    run = cli("compile", data / "shapes.json", "--json")
    assert run.exit_code == 0, run.stderr
    assert sorted(p.name for p in Path("from-config").iterdir()) == ["shapes.lark", "shapes.report.json", "shapes.schema.json"]


@pytest.mark.slow
def test_xgrammar_compiles_and_verifies(cli, data):
    require("xgrammar")
    run = cli("compile", data / "person.json", "-o", "out", "--engine", "xgrammar", "--check", data / "person.checks.jsonl", "--json")
    assert run.exit_code == 0, run.stderr
    x = json.loads((Path("out") / "person.report.json").read_text())["engines"]["xgrammar"]
    assert x["supported"] and x["artefact"] == "person.schema.json" and x["version"] == "0.2.8"
    assert x["check"]["valid_accepted"] == 3 and x["check"]["invalid_rejected"] == 11


@pytest.mark.slow
def test_every_engine_claim_holds_on_maskbench_sample(cli, data, monkeypatch):
    """Six JSONSchemaBench schemas with labelled instances: no engine accepts an invalid instance unexplained."""
    # outlines never finishes Github_medium---o30846 (measured here: "timed out" at 10 s, 30 s and 120 s alike);
    # every other compile of the sample takes under 0.1 s (20 times less than this timeout), and workers start
    # outside the timeout (forked warm)
    monkeypatch.setenv("SYNAPSE_COMPILE_ENGINE_TIMEOUT_S", "2")
    run = cli("compile", data / "maskbench-sample.jsonl", "-o", "out", "--json")
    assert run.exit_code == 0, run.stderr
    result = _find(run.events(), "finished")[0]["result"]
    assert result["total"] == 6
    labelled = {}
    for line in (data / "maskbench-sample.jsonl").read_text().splitlines():
        record = json.loads(line)
        labelled[record["id"]] = (sum(t["valid"] for t in record["tests"]), sum(not t["valid"] for t in record["tests"]))
    assert sorted(row["name"] for row in result["inputs"]) == sorted(labelled)
    for row in result["inputs"]:
        valid, invalid = labelled[row["name"]]
        assert valid and invalid, row["name"]  # the sample labels both kinds for every schema
        assert row["support"]["llguidance"], row["name"]
        claimed = [engine for engine, e in row["engines"].items() if e["supported"]]
        assert claimed == [engine for engine, ok in row["support"].items() if ok], row["name"]
        for engine in claimed:  # an engine that claims the schema ran every labelled instance through its artefact
            check = row["engines"][engine].get("check")
            assert check is not None, (row["name"], engine)
            assert check["valid_accepted"] + check["valid_rejected"] == valid, (row["name"], engine, check)
            assert check["invalid_rejected"] + check["invalid_accepted"] == invalid, (row["name"], engine, check)
            assert check["invalid_accepted"] == check["wrong_accepts_explained"], (row["name"], engine, check)
        assert row["engines"]["llguidance"]["check"]["ok"], row["name"]
