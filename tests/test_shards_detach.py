"""``--detach --shards N`` on Modal, through the fake control plane: one spawned call per shard.

``jobs show`` asks Modal for each shard's state, ``jobs wait`` follows every shard and merges
them here into the output an unsharded run makes (frame count, timestamps, PSNR, audio: as
``tests/test_shards.py`` compares; for infer, an unsharded local run's results, pose frame for
frame, track by distinct ids, ``--annotated`` by frame count), ``jobs cancel`` cancels every
call; whatever happens, nothing is left on the Volume, in the progress Dict or beside the
output. Also: an unreachable Modal costs a detached run ``[modal] connect_timeout_s`` and no
more, ``import modal`` included.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import make_clip, paced_ffmpeg, require, wait_for
from tests.modal_fake.fixtures import synapse_deployed
from tests.test_remote import assert_unreachable_exits_3
from tests.test_shards import OVERLAY, SMALL, _params_file, assert_same_video, export

VOLUME = "synapse-data"
DICT = "synapse-progress"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("detach") / "rally.mp4", size="640x360", seconds=3.0)


@pytest.fixture(scope="module")
def long(tmp_path_factory) -> Path:
    """30 s, small: with ``paced`` each shard of an export runs for as long as its 15 s of video, for little CPU."""
    return make_clip(tmp_path_factory.mktemp("long") / "long.mp4", size="160x90", seconds=30.0)


@pytest.fixture
def paced(tmp_path_factory, monkeypatch):
    """The Modal calls' ``ffmpeg`` (the one on PATH, as in Modal's image) reads its input at the input's own
    frame rate: a shard is still running seconds after it started, whatever this machine's load."""
    folder = tmp_path_factory.mktemp("paced")
    paced_ffmpeg(folder / "ffmpeg")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def deployed(modal_deployment, monkeypatch, db):
    with synapse_deployed(modal_deployment, monkeypatch, reload=True) as fake:
        yield fake


def detached_calls(fake) -> list:
    return [c for c in fake.function_calls if c.function_name.endswith("_detached")]


def status(db: Path, job_id: str) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    finally:
        conn.close()


def nothing_left_on_modal(fake, job_id: str) -> None:
    left = [p for p in fake.volume_files(VOLUME) if p.startswith("outputs/")]
    assert left == []  # the shards' pieces are gone
    try:
        published = fake.dict_contents(DICT)
    except KeyError:  # no call got to publish anything
        published = {}
    assert [k for k in published if str(k).startswith(job_id)] == []  # and what they published


def show(cli, job_id: str) -> dict:
    run = cli("jobs", "show", job_id, "--json")
    assert run.exit_code == 0, run.stderr
    return json.loads(run.stdout)


def test_detach_with_shards_then_show_and_wait(cli, deployed, db, clip, tmp_path):
    out = tmp_path / "d.mp4"
    spawned_at = time.monotonic()
    run = cli("export", clip, "--job", "overlay", "--params", _params_file(out, OVERLAY), "-o", out,
              "--use-modal", "--detach", "--shards", "2", "--json", env={"SYNAPSE_FFMPEG_PRESET": "ultrafast"})  # fmt: skip
    assert run.exit_code == 0, run.stderr
    job_id = json.loads(run.stdout)["job_id"]
    assert [c.function_name for c in deployed.function_calls] == ["export_detached"] * 2
    assert len([c for c in deployed.calls if c.startswith("VolumePutFiles")]) == 1  # the input went up once
    assert not any(p.name.startswith(".synapse-shards") for p in tmp_path.iterdir())  # nothing local until jobs wait

    shown = show(cli, job_id)
    assert shown["status"] == "processing" and [s["shard"] for s in shown["shards"]] == ["1/2", "2/2"]
    assert {s["state"] for s in shown["shards"]} <= {"pending", "running", "finished"}
    wait_for(lambda: all(c.outcome == "ok" for c in detached_calls(deployed)), timeout=60)
    ran_s = time.monotonic() - spawned_at  # each call ran for less than this
    shown = show(cli, job_id)  # both calls ended, nobody merged yet: the job runs on, its shards are done
    assert shown["status"] == "processing"
    assert [s["state"] for s in shown["shards"]] == ["finished", "finished"]
    assert all(s["total"] and s["done"] == s["total"] for s in shown["shards"])
    plain = cli("jobs", "show", job_id)
    assert plain.stdout.splitlines()[0].startswith("shards") and "1/2 finished" in plain.stdout

    time.sleep(2)  # a wait long after the calls ended costs nothing more
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr
    events = waited.events()
    whole = export(cli, clip, tmp_path / "whole.mp4", "overlay", OVERLAY, "--no-modal")
    assert_same_video(out, tmp_path / "whole.mp4")
    # one job's stream, exactly as an attached sharded run: summed progress, never backwards
    assert events[0]["type"] == "started" and events[0]["total"] == whole[0]["total"]
    done = [e["done"] for e in events if e["type"] == "progress"]
    assert done == sorted(done) and done[-1] == events[0]["total"]
    assert {e["shard"] for e in events if e["type"] == "log" and e.get("shard")} == {"1/2", "2/2"}
    assert [e["type"] for e in events].count("artifact") == 1
    result = events[-1]["result"]
    assert [s["index"] for s in result["shards"]] == [0, 1] and result["frames"] == whole[-1]["result"]["frames"]
    assert result["output"] == str(out) and result["modal"]["calls"] == 2 and result["modal"]["seconds"] > 0
    assert result["modal"]["seconds"] < 2 * ran_s  # the jobs' own seconds, summed; not the time since they were spawned

    nothing_left_on_modal(deployed, job_id)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("jobs.sqlite3")) == [
        "d.mp4", "d.params.json", "whole.mp4", "whole.params.json"
    ]  # fmt: skip
    shown = show(cli, job_id)
    assert shown["status"] == "completed"
    assert shown["shards"] == [{"shard": "1/2", "state": "finished"}, {"shard": "2/2", "state": "finished"}]


def test_cancel_stops_every_shard(cli, deployed, db, long, paced, tmp_path):
    out = tmp_path / "o.mp4"
    run = cli("export", long, "-o", out, "--use-modal", "--detach", "--shards", "2", *SMALL)
    assert run.exit_code == 0, run.stderr
    job_id = run.stdout.strip()
    wait_for(lambda: len(detached_calls(deployed)) == 2 and all(c.outcome == "running" for c in detached_calls(deployed)), timeout=60)
    wait_for(lambda: all(s["state"] == "running" for s in show(cli, job_id)["shards"]), timeout=60)

    cancelled = cli("jobs", "cancel", job_id)
    assert cancelled.exit_code == 0, cancelled.stderr
    wait_for(lambda: all(c.outcome == "cancelled" for c in detached_calls(deployed)), timeout=15)
    assert status(db, job_id) == "cancelled"
    assert cli("jobs", "wait", job_id).exit_code == 130
    nothing_left_on_modal(deployed, job_id)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("jobs.sqlite3")) == []


def test_a_job_error_in_one_shard_fails_the_job_and_cancels_the_others(cli, deployed, db, long, paced, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = long.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])  # the index says 30 s; the last 12 s of frames are gone
    out = tmp_path / "o.mp4"
    # paced: the second shard fails about 3 s in (at 18 s), the first would run for 15 s
    run = cli("export", cut, "-o", out, "--use-modal", "--detach", "--shards", "2", *SMALL)
    assert run.exit_code == 0, run.stderr
    job_id = run.stdout.strip()
    wait_for(lambda: any(c.outcome == "ok" and c.args[1].endswith("/1") for c in detached_calls(deployed)), timeout=60)
    assert [s["state"] for s in show(cli, job_id)["shards"]] == ["running", "failed"]  # the second returned its error

    waited = cli("jobs", "wait", job_id)
    assert waited.exit_code == 1, waited.stderr
    assert waited.stderr.strip().splitlines()[-1].startswith("JobError")
    first, second = sorted(detached_calls(deployed), key=lambda c: c.args[1])  # by Dict key: shard 1, shard 2
    assert second.outcome == "ok" and second.args[1].endswith("/1")  # it returned its job's error event
    wait_for(lambda: first.outcome != "running", timeout=15)
    assert first.outcome == "cancelled"  # still encoding its (intact) half when the other failed
    assert status(db, job_id) == "failed"
    nothing_left_on_modal(deployed, job_id)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("jobs.sqlite3")) == ["cut.mp4"]


def test_a_shard_that_cannot_be_spawned_leaves_no_call_running_and_no_pending_row(cli, deployed, db, clip, tmp_path):
    from grpclib import GRPCError, Status

    # the first shard's call starts (its first attempt fails; Modal retries it a second later); the second's is refused
    deployed.fail_next_calls("export_detached", 1, ConnectionError("fake modal: lost the worker"))
    deployed.fail_next_calls("export_detached", 1, GRPCError(Status.INVALID_ARGUMENT, "refused"))
    run = cli("export", clip, "-o", tmp_path / "o.mp4", "--use-modal", "--detach", "--shards", "2", *SMALL)
    assert run.exit_code != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    (job_id, state), = sqlite3.connect(db).execute("SELECT id, status FROM jobs").fetchall()
    assert state == "failed"
    assert show(cli, job_id)["error_message"].startswith("could not start")
    calls = list(deployed.servicer.calls.values())
    assert len(calls) == 1 and calls[0].cancelled
    wait_for(lambda: all(c.outcome != "running" for c in detached_calls(deployed)), timeout=15)
    nothing_left_on_modal(deployed, job_id)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("jobs.sqlite3")) == []


# -- an unreachable Modal: the detached twin of test_remote's test ---------------------------------

# A fresh process (the modal client goes on retrying in the thread we stopped waiting for). Everything
# but modal is imported before the clock starts; ``import modal`` is made 3 s slow (a cold disk, a
# network home), so an import outside the connect deadline shows: 3 s + the deadline.
UNREACHABLE = """
import importlib.abc, json, sys, time
import av, typer
from typer.testing import CliRunner
from synapse_cli.cli import app
import synapse_cli.backends.modal, synapse_cli.jobs.export.job, synapse_cli.render.plain, synapse_cli.store.recording, synapse_cli.shards

class SlowModal(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modal":
            time.sleep(3)
        return None

sys.meta_path.insert(0, SlowModal())
start = time.monotonic()
result = CliRunner().invoke(app, sys.argv[1:], catch_exceptions=False)
print(json.dumps({"exit_code": result.exit_code, "stderr": result.stderr, "seconds": time.monotonic() - start}))
"""


@pytest.mark.parametrize("shards", ["1", "2"])
def test_unreachable_modal_exits_3_within_connect_timeout_when_detached(clip, db, tmp_path, shards):
    require("modal", reason="modal is not installed")
    assert_unreachable_exits_3(UNREACHABLE, ["export", str(clip), "--use-modal", "--detach", "--shards", shards, *SMALL], tmp_path / "o.mp4")
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT status FROM jobs")] == ["failed"]  # no pending row left behind
    conn.close()
    assert not any(p.name.startswith(".synapse-shards") for p in tmp_path.iterdir())


def test_detached_sharded_compile_fills_the_one_output_folder(cli, deployed, db, tmp_path):
    pytest.importorskip("llguidance", reason="the compile extra is not installed")
    from tests.conftest import ROOT
    from tests.test_shards import _files

    data = ROOT / "tests" / "data" / "compile"
    inputs = [data / "person.json", data / "guardrails.json", data / "line.json"]  # no $ref across files: each is uploaded alone
    whole = cli("compile", *inputs, "-o", tmp_path / "whole", "--engine", "llguidance", "--no-cache", "--no-modal", "--json")
    assert whole.exit_code == 0, whole.stderr
    run = cli("compile", *inputs, "-o", tmp_path / "out", "--engine", "llguidance", "--use-modal", "--detach", "--shards", "2")
    assert run.exit_code == 0, run.stderr
    job_id = run.stdout.strip()
    assert [c.function_name for c in deployed.function_calls] == ["compile_detached"] * 2
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr
    result = waited.events()[-1]["result"]
    assert len(result["shards"]) == 2 and result["total"] == whole.events()[-1]["result"]["total"]
    got, expected = _files(tmp_path / "out"), _files(tmp_path / "whole")
    assert sorted(got) == sorted(expected) and len(got) > 5  # each shard's folder merged into the one
    # the artefacts byte for byte (a report names its source: on Modal, the input's Volume path)
    assert {k: v for k, v in got.items() if not k.name.endswith(".report.json")} == {
        k: v for k, v in expected.items() if not k.name.endswith(".report.json")
    }
    nothing_left_on_modal(deployed, job_id)


# -- infer: frame ranges on spawned calls, merged (and track ids stitched) by jobs wait --------------


def detached_infer(cli, deployed, source: Path, out: Path, *extra: str) -> tuple[str, list[dict]]:
    """``infer --use-modal --detach --shards 2``, each shard's state through ``jobs show``, then ``jobs wait``'s events."""
    run = cli("infer", source, "-o", out, "--imgsz", "320", "--use-modal", "--detach", "--shards", "2", *extra)
    assert run.exit_code == 0, run.stderr
    job_id = run.stdout.strip()
    assert [c.function_name for c in deployed.function_calls] == ["infer_detached"] * 2
    assert not out.exists() and not any(p.name.startswith(".synapse-shards") for p in out.parent.iterdir())
    shown = show(cli, job_id)
    assert shown["status"] == "processing" and [s["shard"] for s in shown["shards"]] == ["1/2", "2/2"]
    assert {s["state"] for s in shown["shards"]} <= {"pending", "running", "finished"}
    wait_for(lambda: all(c.outcome == "ok" for c in detached_calls(deployed)), timeout=120)
    shown = show(cli, job_id)  # both calls ended; nobody has merged them yet
    assert shown["status"] == "processing" and [s["state"] for s in shown["shards"]] == ["finished", "finished"]
    assert all(s["total"] and s["done"] == s["total"] for s in shown["shards"])
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr
    shown = show(cli, job_id)
    assert shown["status"] == "completed"
    assert shown["shards"] == [{"shard": "1/2", "state": "finished"}, {"shard": "2/2", "state": "finished"}]
    nothing_left_on_modal(deployed, job_id)
    assert not any(p.name.startswith(".synapse-shards") for p in out.parent.iterdir())
    return job_id, waited.events()


def whole_infer(cli, source: Path, out: Path, *extra: str) -> dict:
    run = cli("infer", source, "-o", out, "--imgsz", "320", "--no-modal", "--no-cache", "--json", *extra)
    assert run.exit_code == 0, run.stderr
    return run.events()[-1]["result"]


def track_ids(doc: dict) -> set[int]:
    return {d["track_id"] for f in doc["frames"] for d in f["detections"] if "track_id" in d}


@pytest.mark.slow
def test_detached_sharded_pose_equals_the_whole_run(cli, deployed, db, people, tmp_path):
    _, events = detached_infer(cli, deployed, people, tmp_path / "sharded.json", "--task", "pose")
    whole_infer(cli, people, tmp_path / "whole.json", "--task", "pose")
    whole, sharded = json.loads((tmp_path / "whole.json").read_text()), json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["frames"] == whole["frames"] and len(whole["frames"]) == 24  # frame for frame, keypoints included
    assert {k: v for k, v in sharded.items() if k != "frames"} == {k: v for k, v in whole.items() if k != "frames"}
    assert events[0]["type"] == "started" and [e["type"] for e in events].count("artifact") == 1
    result = events[-1]["result"]
    assert [s["index"] for s in result["shards"]] == [0, 1] and result["processed_frames"] == 24
    assert result["output"] == str(tmp_path / "sharded.json") and result["modal"]["calls"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("jobs.sqlite3")) == [
        "sharded.json", "whole.json"
    ]  # fmt: skip


@pytest.mark.slow
def test_detached_sharded_track_keeps_one_id_per_person(cli, deployed, db, people, tmp_path):
    _, events = detached_infer(cli, deployed, people, tmp_path / "sharded.json", "--task", "track")
    whole_infer(cli, people, tmp_path / "whole.json", "--task", "track")
    whole, sharded = json.loads((tmp_path / "whole.json").read_text()), json.loads((tmp_path / "sharded.json").read_text())
    assert len(track_ids(whole)) >= 2 and len(track_ids(sharded)) == len(track_ids(whole))
    header = lambda doc: {k: v for k, v in doc.items() if k not in ("frames", "tracks")}  # noqa: E731
    assert header(sharded) == header(whole)
    assert set(sharded["tracks"]) == {str(i) for i in track_ids(sharded)} and events[-1]["result"]["tracks"] == len(track_ids(sharded))
    assert [f["frame"] for f in sharded["frames"]] == list(range(24)) and not any(f.get("lead_in") for f in sharded["frames"])
    # a person seen on both sides of the boundary (frame 12) keeps one id on both sides
    before = {d["track_id"] for f in sharded["frames"][8:12] for d in f["detections"] if "track_id" in d}
    after = {d["track_id"] for f in sharded["frames"][12:16] for d in f["detections"] if "track_id" in d}
    assert before & after


@pytest.mark.slow
def test_detached_sharded_annotated_video_has_every_frame(cli, deployed, db, people, tmp_path):
    from tests.conftest import probe

    _, events = detached_infer(cli, deployed, people, tmp_path / "sharded.json", "--annotated", tmp_path / "sharded.mp4")
    assert [e["path"] for e in events if e["type"] == "artifact"] == [str(tmp_path / "sharded.json"), str(tmp_path / "sharded.mp4")]
    assert probe(tmp_path / "sharded.mp4").frames == probe(people).frames == 24  # the pieces joined, none lost or doubled
    assert events[-1]["result"]["annotated"] == str(tmp_path / "sharded.mp4")
