"""The Modal backend: the app definition offline, bodies with .local(), and the real modal client end to end
against the fake control plane in tests/modal_fake (the only fake: it stands where the network ends)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from synapse_cli.backends.modal import ModalBackend, credentials_source
from tests.conftest import bus_image, probe, require, results_header
from tests.modal_fake.fixtures import synapse_deployed

require("modal", reason="modal is not installed (pip install synapse-cli[modal])")  # (the imports above do not import modal)


@pytest.fixture(scope="module")
def modal_app():
    """A freshly defined app: a deploy in an earlier test leaves handles (the Volume) hydrated."""
    import importlib

    require("modal", reason="modal is not installed (pip install synapse-cli[modal])")
    from synapse_cli import modal_app

    return importlib.reload(modal_app)


# -- 1. the app definition, offline --------------------------------------------------------


def test_each_job_kind_has_a_function_with_its_settings(modal_app):
    info = {name: fn.info() for name, fn in modal_app.STREAMING.items()}
    assert set(info) == {"export", "compile", "infer"}
    assert info["infer"].gpus == [("T4", 1)]
    assert info["export"].gpus == [] and info["compile"].gpus == []
    for i in info.values():
        assert i.timeout == 3600
        assert i.volumes["/data"].name == "synapse-data"
        assert i.max_retries is None  # generator functions cannot have retries: the client retries instead
    assert set(modal_app.SHARDED) == {"export", "compile", "infer"}
    for fn in modal_app.SHARDED.values():  # split and merge in a container: they only wait and merge, no GPU
        assert fn.info().gpus == [] and fn.info().volumes["/data"].name == "synapse-data" and fn.info().max_retries is None
    for kind, fn in modal_app.DETACHED.items():  # the spawnable wrappers retry transient failures
        assert fn.info().max_retries == 2
        assert fn.info().gpus == info[kind].gpus
    web = modal_app.serve.info()
    assert web.web_info is not None and web.volumes["/data"].name == "synapse-data"  # the HTTP endpoint, as an ASGI app


def test_app_settings_come_from_config(tmp_path):
    import subprocess
    import sys

    (tmp_path / ".synapse.toml").write_text('[modal]\napp_name = "reels"\ngpu = "A10G"\ntimeout_s = 900\nsecrets = ["hf-token"]\n')
    code = (
        "from synapse_cli import modal_app as m\n"
        "i = m.infer.info()\n"
        "print(m.app.name, i.gpus, i.timeout, i.secrets)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "reels [('A10G', 1)] 900 [\"modal.Secret.from_name('hf-token')\"]"


@pytest.mark.filterwarnings("ignore:The export function is executing locally")  # .local() is the point here
def test_local_body_streams_the_same_events_as_a_local_run(modal_app, clips, tmp_path, monkeypatch):
    from synapse_cli.backends.local import LocalBackend
    from synapse_cli.events import to_dict
    from synapse_cli.jobs.export.job import ExportSpec

    monkeypatch.setenv("SYNAPSE_VOLUME_ROOT", str(tmp_path))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "clip.mp4").write_bytes(clips["silent"].read_bytes())
    spec = {"input": "vol:in/clip.mp4", "output": "vol:out/clip.mp4", "job": "framing", "params": {"output_width": 180, "output_height": 320}, "preset": "ultrafast"}
    remote = list(modal_app.export.local(spec))
    local = [to_dict(e) for e in LocalBackend().run("export", ExportSpec(input=str(tmp_path / "in" / "clip.mp4"), output=str(tmp_path / "local.mp4"), job="framing", params=spec["params"], preset="ultrafast"))]
    # How many progress events an encode yields depends on timing: compare what does not.
    for events in (remote, local):
        types = [e["type"] for e in events]
        assert types == ["started", *["progress"] * (len(types) - 3), "artifact", "finished"] and "progress" in types
        total = events[0]["total"]
        done = [e["done"] for e in events if e["type"] == "progress"]
        assert done == sorted(set(done)) and done[-1] == total  # strictly increasing, ending at the started total
        assert all(e["total"] == total and e["phase"] == "encode" for e in events if e["type"] == "progress")
    assert remote[0] == local[0] == {"type": "started", "job": "export", "total": 60}  # 2 s at 30 fps
    artifact = next(e for e in remote if e["type"] == "artifact")
    assert artifact["path"] == "vol:out/clip.mp4"  # the client knows what to download
    assert artifact["bytes"] == next(e for e in local if e["type"] == "artifact")["bytes"]
    result, local_result = remote[-1]["result"], local[-1]["result"]
    assert (result["input"], result["output"]) == ("vol:in/clip.mp4", "vol:out/clip.mp4")  # paths the client can map back
    assert {**result, "input": local_result["input"], "output": local_result["output"]} == local_result
    assert (probe(tmp_path / "out" / "clip.mp4").width, probe(tmp_path / "local.mp4").width) == (180, 180)


def test_credentials_are_checked_without_network(tmp_path):
    assert credentials_source({"HOME": str(tmp_path)}) is None
    assert credentials_source({"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": "as-1"}) == "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"
    (tmp_path / ".modal.toml").write_text('[work]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\nactive = true\n')
    assert credentials_source({"HOME": str(tmp_path)}).endswith("[work]")


def test_missing_credentials_exit_3_fast(cli, clips, tmp_path):
    start = time.monotonic()
    run = cli("export", clips["silent"], "--use-modal", "-o", tmp_path / "o.mp4")
    assert time.monotonic() - start < 1.0
    assert run.exit_code == 3
    assert run.stderr.strip().splitlines() == [
        "BackendError: no Modal credentials: run `modal token new`, or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (or run with --no-modal)"
    ]


# -- 2. end to end: the real modal client against the fake control plane -------------------------


@pytest.fixture
def deployed(modal_deployment, modal_app, monkeypatch):
    with synapse_deployed(modal_deployment, monkeypatch) as fake:
        yield fake


def test_deploy_command_prints_function_names(cli, modal_fake):
    run = cli("deploy", "--json")
    assert run.exit_code == 0, run.stderr
    functions = [f"{kind}{suffix}" for kind in ("compile", "export", "infer") for suffix in ("", "_detached", "_sharded", "_sharded_detached")]
    assert json.loads(run.stdout) == {"app": "synapse", "functions": sorted([*functions, "serve"])}


# The tests with a fake of their own come before those sharing the module's deployment: each one's teardown
# unhydrates every handle a fake issued, the deployment's too, and the next test sharing it would deploy again.


def test_app_not_deployed_says_deploy(cli, modal_fake, clips, tmp_path):
    run = cli("export", clips["silent"], "--use-modal", "-o", tmp_path / "o.mp4")
    assert run.exit_code == 3
    assert "synapse deploy" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_function_timeout_exits_1(cli, modal_fake, long_clip, tmp_path, monkeypatch):
    import importlib

    require("modal", reason="modal is not installed")
    import synapse_cli.modal_app as modal_app

    monkeypatch.setenv("SYNAPSE_MODAL_TIMEOUT_S", "1")
    short = importlib.reload(modal_app)
    try:
        assert short.export.info().timeout == 1
        short.app.deploy(name="synapse")
        run = cli("export", long_clip, "--use-modal", "-o", tmp_path / "o.mp4", env={"SYNAPSE_FFMPEG_PRESET": "medium"})
        assert run.exit_code == 1, run.stderr
        assert "timed out" in run.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "o.mp4").exists()
    finally:
        monkeypatch.delenv("SYNAPSE_MODAL_TIMEOUT_S")
        importlib.reload(modal_app)


def test_export_use_modal_matches_local(cli, deployed, clips, tmp_path):
    params = ["--set", "output_width=180", "--set", "output_height=320"]
    remote = cli("export", clips["landscape"], "--use-modal", "--json", "-o", tmp_path / "remote.mp4", *params)
    assert remote.exit_code == 0, remote.stderr
    local = cli("export", clips["landscape"], "--no-modal", "--no-cache", "--json", "-o", tmp_path / "local.mp4", *params)
    r, here = remote.events(), local.events()
    for events in (r, here):  # the same stream shape (how many progress lines depends on timing)
        assert events[0]["type"] == "started" and events[-1]["type"] == "finished"
        done = [e["done"] for e in events if e["type"] == "progress"]
        assert done == sorted(done) and done[-1] == events[0]["total"]
    assert r[0] == here[0]
    assert [e["type"] for e in r if e["type"] != "progress"] == [e["type"] for e in here if e["type"] != "progress"]
    assert r[-1]["result"]["output"] == str(tmp_path / "remote.mp4")
    assert r[-1]["result"]["input"] == str(clips["landscape"])
    a, b = probe(tmp_path / "remote.mp4"), probe(tmp_path / "local.mp4")
    assert (a.width, a.height, a.frames, a.has_audio) == (b.width, b.height, b.frames, b.has_audio)
    record = deployed.function_calls[-1]
    assert record.function_name == "export"
    spec = record.args[0]
    assert spec["input"].startswith("vol:inputs/") and spec["output"].startswith("vol:outputs/")  # no bytes in the call
    assert any(p.startswith("inputs/") for p in deployed.volume_files("synapse-data"))


def test_second_upload_of_the_same_input_is_skipped(cli, deployed, clips, tmp_path):
    for n in range(2):
        run = cli("export", clips["silent"], "--use-modal", "--no-cache", "-o", tmp_path / f"o{n}.mp4", "--set", "output_width=180", "--set", "output_height=320")
        assert run.exit_code == 0, run.stderr
    puts = [c for c in deployed.calls if c.startswith("VolumePutFiles")]
    assert len(puts) == 1, deployed.calls
    assert [c.function_name for c in deployed.function_calls] == ["export", "export"]  # both ran


def test_auth_rejected_exit_3(cli, deployed, clips, tmp_path):
    deployed.fail_auth = True
    run = cli("export", clips["silent"], "--use-modal", "-o", tmp_path / "o.mp4")
    assert run.exit_code == 3 and "rejected the credentials" in run.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_job_error_is_not_retried_and_exits_1(cli, deployed, clips, tmp_path):
    bad = tmp_path / "cut.mp4"
    data = clips["landscape"].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    run = cli("export", bad, "--use-modal", "-o", tmp_path / "o.mp4", "--set", "output_width=90", "--set", "output_height=160")
    assert run.exit_code == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("JobError: ffmpeg exited")
    assert [c.function_name for c in deployed.function_calls] == ["export"]  # ran once
    assert not (tmp_path / "o.mp4").exists()


def test_transient_failure_is_retried_then_succeeds(cli, deployed, clips, tmp_path):
    require("modal", reason="modal is not installed")
    import modal.exception

    deployed.fail_next_calls("export", 1, modal.exception.InternalFailure("worker lost"))
    run = cli("export", clips["silent"], "--use-modal", "-o", tmp_path / "o.mp4", "--set", "output_width=180", "--set", "output_height=320",
              env={"SYNAPSE_MODAL_INITIAL_BACKOFF_MS": "10"})
    assert run.exit_code == 0, run.stderr
    assert [c.function_name for c in deployed.function_calls].count("export") == 2
    assert probe(tmp_path / "o.mp4").width == 180


def test_events_stream_incrementally(deployed, clips, tmp_path):
    """The first progress event arrives long before the job ends."""
    from synapse_cli.config import load_settings
    from synapse_cli.events import Finished, Progress
    from synapse_cli.jobs.export.job import ExportSpec
    from tests.conftest import make_clip

    # one thread: the encode lasts as long on a machine of many cores as on two, and these 120 frames (default
    # output size, preset medium) take as long on one core as 180 on two did, for about 60 % of the CPU seconds
    src = make_clip(tmp_path / "long.mp4", size="640x360", seconds=4)
    backend = ModalBackend.from_settings(load_settings({}))
    arrivals = []
    for event in backend.run("export", ExportSpec(input=str(src), output=str(tmp_path / "o.mp4"), params={}, preset="medium", threads=1)):
        arrivals.append((time.monotonic(), event))
    backend.close()
    first = next(t for t, e in arrivals if isinstance(e, Progress))
    last = next(t for t, e in arrivals if isinstance(e, Finished))
    assert last - first > 0.5, last - first
    assert sum(isinstance(e, Progress) for _, e in arrivals) >= 3


def test_ctrl_c_cancels_the_remote_call(deployed, long_clip, tmp_path):
    """SIGINT to `synapse export --use-modal` mid-stream: exit 130, the remote call cancelled, no local output."""
    import os
    import signal
    import subprocess

    from tests.conftest import INTERRUPTIBLE, synapse_cmd

    out = tmp_path / "o.mp4"
    proc = subprocess.Popen(
        [*synapse_cmd(), "export", str(long_clip), "--use-modal", "--json", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SYNAPSE_FFMPEG_PRESET": "medium"}, **INTERRUPTIBLE,
    )
    for line in proc.stdout:
        if json.loads(line)["type"] == "progress":
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "Interrupted: interrupted"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and deployed.function_calls[-1].outcome == "running":
        time.sleep(0.05)
    assert deployed.function_calls[-1].outcome == "cancelled"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- every job kind runs through the Modal backend ------------------------------------------


def test_compile_use_modal_writes_the_artefacts_locally(cli, deployed, tmp_path):
    schema = Path(__file__).parent / "data" / "compile" / "person.json"
    out = tmp_path / "compiled"
    run = cli("compile", schema, "--use-modal", "--json", "-o", out, "--engine", "llguidance,outlines")
    assert run.exit_code == 0, run.stderr
    assert deployed.function_calls[-1].function_name == "compile"
    names = sorted(p.name for p in out.iterdir())
    assert "person.schema.json" in names and "person.report.json" in names and "person.lark" in names
    report = json.loads((out / "person.report.json").read_text())
    assert report["engines"]["llguidance"]["supported"] is True
    artifacts = [e["path"] for e in run.events() if e["type"] == "artifact"]
    assert artifacts and all(p.startswith(str(out)) for p in artifacts)  # local paths, not vol:
    assert report["source"] == str(schema)  # the user's path, not the container's copy on the Volume


def test_compile_use_modal_reports_name_the_users_files_in_a_folder(cli, deployed, tmp_path):
    """A folder input is staged as a Volume copy; the reports and the result name its files by the user's path."""
    import shutil

    folder = tmp_path / "schemas"
    folder.mkdir()
    shutil.copyfile(Path(__file__).parent / "data" / "compile" / "person.json", folder / "person.json")
    out = tmp_path / "compiled"
    run = cli("compile", folder, "--use-modal", "--json", "-o", out, "--engine", "llguidance")
    assert run.exit_code == 0, run.stderr
    assert json.loads((out / "person.report.json").read_text())["source"] == str(folder / "person.json")
    assert [row["source"] for row in run.events()[-1]["result"]["inputs"]] == [str(folder / "person.json")]


@pytest.fixture
def bus(tmp_path) -> Path:
    return bus_image(tmp_path / "in" / "bus.jpg")


@pytest.mark.slow
def test_infer_use_modal_matches_local(cli, deployed, bus, tmp_path):
    remote = cli("infer", bus, "--use-modal", "-o", tmp_path / "remote.json", "--json")
    assert remote.exit_code == 0, remote.stderr
    local = cli("infer", bus, "--no-modal", "--no-cache", "-o", tmp_path / "local.json", "--json")
    assert local.exit_code == 0, local.stderr
    assert deployed.function_calls[-1].function_name == "infer"
    r, here = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("remote", "local"))
    assert len(r["frames"][0]["detections"]) == len(here["frames"][0]["detections"]) >= 4
    assert remote.events()[-1]["result"]["modal"]["gpu"] == "T4"
    # the header names the user's path, as a local run's does: not the container's copy on the Volume
    assert r["source"] == str(bus)
    assert results_header(tmp_path / "remote.json") == results_header(tmp_path / "local.json")


@pytest.mark.slow
def test_infer_detached_on_modal_names_the_users_source(cli, deployed, bus, tmp_path):
    """``--detach`` spawns ``infer_detached``; ``jobs wait`` downloads a results file whose header is a local run's."""
    out = tmp_path / "detached.json"
    run = cli("infer", bus, "--use-modal", "--detach", "-o", out)
    assert run.exit_code == 0, run.stderr
    assert [c.function_name for c in deployed.function_calls] == ["infer_detached"]
    waited = cli("jobs", "wait", run.stdout.strip(), "--json")
    assert waited.exit_code == 0, waited.stderr
    assert waited.events()[-1]["result"]["output"] == str(out)
    local = cli("infer", bus, "--no-modal", "--no-cache", "-o", tmp_path / "local.json")
    assert local.exit_code == 0, local.stderr
    assert json.loads(out.read_text())["source"] == str(bus)
    assert results_header(out) == results_header(tmp_path / "local.json")


# -- what the user reads names the user's files, never their staged copies on the Volume ----------


def assert_names_no_staged_path(run, fake) -> None:
    """Neither stream names the Volume (the fake keeps it under its root, as Modal mounts it at /data) nor a ``vol:`` key."""
    text = run.stdout + run.stderr
    assert str(fake.root) not in text and "vol:" not in text and "inputs/" not in text and "outputs/" not in text, text


@pytest.mark.parametrize("name", ["o.xyz", "o" * 240 + ".mp4"])
def test_an_output_name_ffmpeg_cannot_write_is_refused_before_anything_reaches_modal(cli, deployed, clips, tmp_path, name):
    """``-o o.xyz`` (no muxer) and a name whose temporary sibling the filesystem cannot hold once reached the
    container and failed inside ffmpeg (or Python); both are now refused here, exit 2, before any upload."""
    out = tmp_path / name
    run = cli("export", clips["silent"], "--use-modal", "--json", "-o", out, "--set", "output_width=90", "--set", "output_height=160")
    assert run.exit_code == 2, run.stderr
    last = run.events()[-1]
    assert last["type"] == "error" and last["error"] == "UsageError"
    assert ("no container synapse writes is a .xyz file" if name == "o.xyz" else "is too long") in last["message"]
    assert run.stderr.strip().splitlines()[-1].startswith("UsageError: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def schemas_and_a_bad_check(tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    folder = tmp_path / "schemas"
    folder.mkdir()
    for name in ("a.json", "b.json"):  # two inputs: --shards 2 makes two calls
        shutil.copyfile(Path(__file__).parent / "data" / "compile" / "person.json", folder / name)
    check = tmp_path / "check.jsonl"
    check.write_text("{nope\n")  # read on the Volume, inside the job
    return folder, check


@pytest.mark.parametrize("shards", [1, 2])
def test_a_job_error_names_the_users_file(cli, deployed, tmp_path, shards):
    """compile reads --check from its copy on the Volume; the error names the user's file, from one call or from a shard's."""
    folder, check = schemas_and_a_bad_check(tmp_path)
    run = cli("compile", folder, "--use-modal", "--json", "-o", tmp_path / "out", "--engine", "llguidance", "--check", check, "--shards", str(shards))
    assert run.exit_code == 2, run.stderr
    assert [c.function_name for c in deployed.function_calls] == ["compile"] * shards
    assert run.events()[-1]["message"] == f"{check}:1: not JSON: Expecting property name enclosed in double quotes (column 2)"
    assert_names_no_staged_path(run, deployed)


@pytest.mark.parametrize("shards", [1, 2])
def test_a_detached_job_error_names_the_users_file(cli, deployed, tmp_path, shards):
    """The same through ``--detach`` and ``jobs wait``: the job store keeps what each call staged."""
    folder, check = schemas_and_a_bad_check(tmp_path)
    run = cli("compile", folder, "--use-modal", "--detach", "-o", tmp_path / "out", "--engine", "llguidance", "--check", check, "--shards", str(shards))
    assert run.exit_code == 0, run.stderr
    assert [c.function_name for c in deployed.function_calls] == ["compile_detached"] * shards
    waited = cli("jobs", "wait", run.stdout.strip(), "--json")
    assert waited.exit_code == 2, waited.stderr
    assert waited.events()[-1]["message"].startswith(f"{check}:1: not JSON")
    assert_names_no_staged_path(waited, deployed)


@pytest.mark.parametrize("shards", [1, 2])
def test_a_detached_batch_that_failed_in_part_downloads_the_rest_and_exits_1(cli, deployed, tmp_path, shards):
    """compile reports failed inputs after its result: ``jobs wait`` reads on past ``finished`` to that error, as an attached run does."""
    import shutil

    folder = tmp_path / "schemas"
    folder.mkdir()
    for name in ("person.json", "bad-ref.json"):
        shutil.copyfile(Path(__file__).parent / "data" / "compile" / name, folder / name)
    run = cli("compile", folder, "--use-modal", "--detach", "-o", tmp_path / "out", "--engine", "llguidance", "--shards", str(shards))
    assert run.exit_code == 0, run.stderr
    waited = cli("jobs", "wait", run.stdout.strip(), "--json")
    assert waited.exit_code == 1, waited.stdout
    assert [e["type"] for e in waited.events()][-2:] == ["finished", "error"] and "bad-ref" in waited.stderr
    assert (tmp_path / "out" / "person.lark").is_file() and not (tmp_path / "out" / "bad-ref.lark").exists()


@pytest.mark.slow
def test_log_lines_name_the_users_files(cli, deployed, bus, tmp_path):
    """infer skips an unreadable image of a folder with a warning: it names the user's file, not the Volume copy of the folder."""
    broken = bus.parent / "broken.jpg"
    broken.write_text("not an image")
    run = cli("infer", bus.parent, "--use-modal", "--json", "-o", tmp_path / "r.json")
    assert run.exit_code == 0, run.stderr
    assert [e for e in run.events() if e["type"] == "log"] == [{"type": "log", "message": f"{broken} is not a readable image; skipped", "level": "warning"}]
    assert_names_no_staged_path(run, deployed)


def test_the_images_install_pyprojects_own_requirements(tmp_path):
    """The Modal images' package lists are pyproject's (the core, the compile, infer and serve extras),
    read from the checkout or, for a wheel, from the installed metadata: they cannot drift from a local install."""
    import re
    import tomllib

    from synapse_cli import modal_app

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert modal_app.requirements() == tuple(project["dependencies"])
    for extra in ("compile", "infer", "serve"):
        assert modal_app.requirements(extra) == tuple(project["optional-dependencies"][extra])

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    no_checkout = tmp_path / "pyproject.toml"  # absent: the installed distribution's metadata is read instead
    assert names(modal_app.requirements(pyproject=no_checkout)) == names(project["dependencies"])
    assert names(modal_app.requirements("compile", pyproject=no_checkout)) == names(project["optional-dependencies"]["compile"])
