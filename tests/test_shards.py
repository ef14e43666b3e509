"""Sharding: one job as N shards, merged into one output and one stream of events.

Sharded and unsharded runs of the same export are compared frame by frame with PyAV:
the same number of frames at the same timestamps, every frame within 35 dB PSNR, the
same number of audio samples. Locally the shards run in worker processes; through the
fake Modal control plane each shard is its own ``remote_gen`` call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from synapse_cli.shards import shard_count
from tests.conftest import INTERRUPTIBLE, make_clip, synapse_cmd
from tests.modal_fake.fixtures import synapse_deployed

SMALL = ["--set", "output_width=180", "--set", "output_height=320"]

FRAMING = {
    "keyframes": [{"time": 0, "x": 0, "y": 0, "width": 160, "height": 284}, {"time": 3, "x": 480, "y": 76, "width": 120, "height": 213}],
    "output_width": 180,
    "output_height": 320,
    "segments": [{"start": 0.2, "end": 1.4}, {"start": 1.4, "end": 3.0, "speed": 2.0}],
}
OVERLAY = {  # the fade-in and fade-out both straddle shard boundaries at 3 shards (1 s each)
    "keyframes": [{"time": 0, "x": 100, "y": 100, "radius_x": 60, "radius_y": 40}, {"time": 3, "x": 500, "y": 250, "radius_x": 90, "radius_y": 70}],
    "start": 0.7,
    "end": 2.3,
    "fade_s": 0.6,
    "text": "rally",
}
ANNOTATE = {
    "clips": [
        {"start": 0.0, "end": 0.8, "title": "serve", "rating": "!"},
        {"start": 2.0, "end": 2.9, "title": "smash", "rating": "??"},
        {"start": 1.0, "end": 1.7, "notes": "net cord"},
    ]
}


PARAMS = {"framing": FRAMING, "overlay": OVERLAY, "annotate": ANNOTATE}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("shards") / "rally.mp4", size="640x360", seconds=3.0)


@pytest.fixture(scope="module")
def cut(tmp_path_factory) -> bytes:
    """The first 60 % of a 4 s clip's bytes: its index says 4 s; the last shards' frames are gone."""
    data = make_clip(tmp_path_factory.mktemp("cut") / "full.mp4", size="640x360", seconds=4.0).read_bytes()
    return data[: int(len(data) * 0.6)]


@pytest.fixture(scope="module")
def _whole_exports() -> dict:
    return {}


@pytest.fixture
def whole_export(cli, clip, tmp_path_factory, _whole_exports):
    """``whole_export(job)``: the unsharded local export of ``clip`` with ``PARAMS[job]``, as (path, events), that the
    sharded runs here are compared with; made once per module, by the first test that asks (four tests compare with overlay's)."""

    def get(job: str) -> tuple[Path, list[dict]]:
        if job not in _whole_exports:
            out = tmp_path_factory.mktemp(f"whole-{job}") / "whole.mp4"
            _whole_exports[job] = out, export(cli, clip, out, job, PARAMS[job], "--no-modal")
        return _whole_exports[job]

    return get


def decoded(path: Path):
    import av

    with av.open(str(path)) as c:
        video = [(float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0)) if c.streams.audio else None
    return video, samples


def assert_same_video(sharded: Path, whole: Path) -> float:
    import numpy as np

    a, a_samples = decoded(sharded)
    b, b_samples = decoded(whole)
    assert len(a) == len(b), (len(a), len(b))
    worst = 99.0
    for (ta, fa), (tb, fb) in zip(a, b):
        assert abs(ta - tb) < 1e-3, (ta, tb)
        mse = float(np.mean((fa.astype(np.float64) - fb.astype(np.float64)) ** 2))
        worst = min(worst, 99.0 if mse == 0 else 10 * np.log10(255**2 / mse))
    assert worst >= 35.0, worst
    assert a_samples == b_samples
    return worst


def export(cli, clip: Path, out: Path, job: str, params: dict, *extra: str):
    run = cli("export", clip, "--job", job, "--params", _params_file(out, params), "-o", out, "--json", "--no-cache", *extra,
              env={"SYNAPSE_FFMPEG_PRESET": "ultrafast"})  # fmt: skip
    assert run.exit_code == 0, run.stderr
    return run.events()


def _params_file(out: Path, params: dict) -> Path:
    path = out.with_suffix(".params.json")
    path.write_text(json.dumps(params))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("job", ["framing", "overlay", "annotate"])
def test_sharded_export_equals_the_whole_export(cli, clip, whole_export, tmp_path, job):
    whole_mp4, whole = whole_export(job)
    events = export(cli, clip, tmp_path / "sharded.mp4", job, PARAMS[job], "--shards", "3")
    assert_same_video(tmp_path / "sharded.mp4", whole_mp4)

    # one job's stream: started first, progress summed and never backwards, shard logs, one artifact
    assert events[0]["type"] == "started" and events[0]["total"] == whole[0]["total"]
    done = [e["done"] for e in events if e["type"] == "progress"]
    assert done == sorted(done) and done[-1] == events[0]["total"]
    shard_logs = [e for e in events if e["type"] == "log" and e.get("shard")]
    assert {e["shard"] for e in shard_logs} == {"1/3", "2/3", "3/3"}
    assert [e["type"] for e in events].count("artifact") == 1
    result = events[-1]["result"]
    assert [s["index"] for s in result["shards"]] == [0, 1, 2] and all(s["attempts"] == 1 for s in result["shards"])
    assert result["frames"] == whole[-1]["result"]["frames"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.mp4", "sharded.params.json"]


@pytest.mark.parametrize(
    ("requested", "scales_out", "size", "expected"),
    [
        ("auto", False, 600.0, 1),  # one machine (local): no shards unless asked
        ("auto", True, 600.0, 10),  # a machine per call (Modal): one a minute
        ("auto", True, 30.0, 1),
        ("auto", True, 100_000.0, 32),  # clamped to [shards] max
        (4, False, 10.0, 4),  # asked for: always
        (1, True, 600.0, 1),
    ],
)
def test_how_many_shards(requested, scales_out, size, expected):
    assert shard_count(requested, scales_out, size, 60.0, 32) == expected


def test_a_bad_shards_value_is_a_usage_error(cli, clip, tmp_path):
    run = cli("export", clip, "-o", tmp_path / "o.mp4", "--shards", "zero", *SMALL)
    assert run.exit_code == 2 and "shards" in run.stderr
    assert not (tmp_path / "o.mp4").exists()


def _left_running(marker: str) -> list[str]:
    """Our worker processes, and any process working on the test's files (ffmpeg), still alive."""
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = (entry / "environ").read_bytes().decode("utf-8", "replace")
                state = (entry / "stat").read_text().split(") ")[-1][:1]
            except OSError:
                continue
            if state != "Z" and (marker in cmd or marker in environ):  # workers inherit the job's environment
                left.append(cmd)
    return left


def _no_workers_left(marker: str) -> bool:
    return not _left_running(marker)


@pytest.mark.slow
def test_a_job_error_in_one_shard_cancels_the_others_and_leaves_nothing(cli, cut, tmp_path):
    src = tmp_path / "cut.mp4"
    src.write_bytes(cut)
    run = cli("export", src, "-o", tmp_path / "o.mp4", "--shards", "3", *SMALL)
    assert run.exit_code == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("JobError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4"]
    assert _no_workers_left(str(tmp_path))


@pytest.mark.slow
def test_ctrl_c_stops_every_shard(tmp_path):
    src = make_clip(tmp_path / "long.mp4", size="160x90", seconds=8.0)  # cheap to make; each shard's 810x1440 medium encode takes seconds
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen(
        [*synapse_cmd(), "export", str(src), "--shards", "2", "--json", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SYNAPSE_FFMPEG_PRESET": "medium", "SYNAPSE_JOBS_DB": str(tmp_path / "jobs.db")}, **INTERRUPTIBLE,
    )  # fmt: skip
    for line in proc.stdout:  # type: ignore[union-attr]
        if json.loads(line)["type"] == "progress":
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _no_workers_left(str(tmp_path)):
        time.sleep(0.1)
    assert _left_running(str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("jobs.db")) == ["long.mp4"]


# -- on Modal: each shard its own remote_gen call, through the fake control plane ---------------------


@pytest.fixture
def deployed(modal_deployment, monkeypatch):
    with synapse_deployed(modal_deployment, monkeypatch, reload=True) as fake:
        yield fake


@pytest.mark.slow
def test_sharded_export_on_modal(cli, deployed, clip, whole_export, tmp_path):
    whole_mp4, whole = whole_export("overlay")
    events = export(cli, clip, tmp_path / "remote.mp4", "overlay", OVERLAY, "--use-modal", "--shards", "3")
    assert_same_video(tmp_path / "remote.mp4", whole_mp4)
    assert [c.function_name for c in deployed.function_calls] == ["export"] * 3
    assert len([c for c in deployed.calls if c.startswith("VolumePutFiles")]) == 1  # the input went up once
    assert not any(p.startswith("outputs/") for p in deployed.volume_files("synapse-data"))  # pieces fetched, then gone
    result = events[-1]["result"]
    assert result["modal"]["calls"] == 3 and result["modal"]["seconds"] > 0
    assert events[0]["total"] == whole[0]["total"]


@pytest.mark.slow
def test_a_transient_failure_retries_that_shard_alone(cli, deployed, clip, tmp_path):
    import modal.exception

    deployed.fail_next_calls("export", 1, modal.exception.InternalFailure("worker lost"))
    events = export(cli, clip, tmp_path / "o.mp4", "framing", FRAMING, "--use-modal", "--shards", "2")
    assert [c.function_name for c in deployed.function_calls].count("export") == 3  # 2 shards, one of them twice
    assert events[-1]["type"] == "finished"


@pytest.mark.slow
def test_a_job_error_on_modal_cancels_the_other_calls(cli, deployed, cut, tmp_path):
    src = tmp_path / "cut.mp4"
    src.write_bytes(cut)
    run = cli("export", src, "--use-modal", "--shards", "3", "-o", tmp_path / "o.mp4", *SMALL)
    assert run.exit_code == 1, run.stderr
    assert not (tmp_path / "o.mp4").exists()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(c.outcome == "running" for c in deployed.function_calls):
        time.sleep(0.1)
    assert all(c.outcome != "running" for c in deployed.function_calls)
    assert not any(p.startswith("outputs/") for p in deployed.volume_files("synapse-data"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mp4"]


# -- compile: groups of inputs, one output folder ---------------------------------------------


def _files(folder: Path) -> dict[Path, bytes]:
    """Every file's bytes; in reports, the measured ``compile_ms`` (which differs between any two runs) is blanked."""
    import re

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".report.json"):
                data = re.sub(rb'"compile_ms": [0-9.]+', b'"compile_ms": 0', data)
            out[p.relative_to(folder)] = data
    return out


@pytest.mark.slow
def test_sharded_compile_is_byte_identical(cli, tmp_path, monkeypatch):
    pytest.importorskip("llguidance", reason="the compile extra is not installed")
    # outlines never finishes the sample's o30846 (it times out in both runs, the same way); its slowest
    # other compile here is person.json's, 0.3 s: 3 s rather than the default 10 s spends 14 CPU s less
    monkeypatch.setenv("SYNAPSE_COMPILE_ENGINE_TIMEOUT_S", "3")
    from tests.conftest import ROOT

    data = ROOT / "tests" / "data" / "compile"
    inputs = [data / "maskbench-sample.jsonl", data / "person.json", data / "order.json", data / "bad-ref.json"]
    runs = {}
    for name, extra in (("whole", []), ("sharded", ["--shards", "3"])):
        run = cli("compile", *inputs, "-o", tmp_path / name, "--json", "--no-cache", "--engine", "llguidance,outlines", *extra)
        assert run.exit_code == 1, run.stderr  # bad-ref.json fails, the same way both times
        runs[name] = run
    whole, sharded = _files(tmp_path / "whole"), _files(tmp_path / "sharded")
    assert len(whole) > 10 and sharded == whole
    a, b = runs["whole"].events()[-2]["result"], runs["sharded"].events()[-2]["result"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("output_dir", "inputs", "shards", "cache_hits")}  # noqa: E731
    assert strip(a) == strip(b) and [r["name"] for r in a["inputs"]] == [r["name"] for r in b["inputs"]]
    assert len(b["shards"]) == 3
    assert runs["sharded"].stderr.strip().splitlines()[-1] == runs["whole"].stderr.strip().splitlines()[-1]
    assert not any(p.name.startswith(".synapse-shards") for p in tmp_path.iterdir())


# -- detached ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_detach_with_shards_then_wait(cli, clip, whole_export, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNAPSE_JOBS_DB", str(tmp_path / "jobs.sqlite3"))
    out = tmp_path / "d.mp4"
    run = cli("export", clip, "--job", "overlay", "--params", _params_file(out, OVERLAY), "-o", out, "--detach", "--shards", "2")
    assert run.exit_code == 0, run.stderr
    job_id = run.stdout.strip()
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr
    assert [s["index"] for s in waited.events()[-1]["result"]["shards"]] == [0, 1]
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "completed" and shown["shards"] == [{"shard": "1/2", "state": "finished"}, {"shard": "2/2", "state": "finished"}]
    assert_same_video(out, whole_export("overlay")[0])


# -- infer: frame ranges, track ids stitched ---------------------------------------------------


def _infer(cli, source: Path, out: Path, *extra: str) -> dict:
    run = cli("infer", source, "-o", out, "--imgsz", "320", "--json", "--no-cache", *extra)
    assert run.exit_code == 0, run.stderr
    events = run.events()
    # one progress bar: the shards' totals add up to the video's frames, and done never passes them
    (started,) = [e for e in events if e["type"] == "started"]
    assert started["total"] == 24, started
    assert all(e["total"] == 24 and e["done"] <= 24 for e in events if e["type"] == "progress")
    return events[-1]["result"]


@pytest.mark.slow
def test_sharded_pose_equals_the_whole_run(cli, people, tmp_path):
    _infer(cli, people, tmp_path / "whole.json")
    result = _infer(cli, people, tmp_path / "sharded.json", "--shards", "3", "--annotated", tmp_path / "sharded.mp4")
    whole, sharded = json.loads((tmp_path / "whole.json").read_text()), json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["frames"] == whole["frames"] and len(whole["frames"]) == 24
    assert {k: v for k, v in sharded.items() if k != "frames"} == {k: v for k, v in whole.items() if k != "frames"}
    assert len(result["shards"]) == 3 and result["processed_frames"] == 24
    from tests.conftest import probe

    assert probe(tmp_path / "sharded.mp4").frames == 24


@pytest.mark.slow
def test_sharded_track_keeps_one_id_per_person(cli, people, tmp_path):
    _infer(cli, people, tmp_path / "whole.json", "--task", "track")
    result = _infer(cli, people, tmp_path / "sharded.json", "--task", "track", "--shards", "2")
    whole, sharded = json.loads((tmp_path / "whole.json").read_text()), json.loads((tmp_path / "sharded.json").read_text())
    ids = lambda doc: {d["track_id"] for f in doc["frames"] for d in f["detections"] if "track_id" in d}  # noqa: E731
    assert len(ids(whole)) >= 2 and len(ids(sharded)) == len(ids(whole))
    assert set(sharded["tracks"]) == {str(i) for i in ids(sharded)} and result["tracks"] == len(ids(sharded))
    assert [f["frame"] for f in sharded["frames"]] == list(range(24)) and not any(f.get("lead_in") for f in sharded["frames"])
    # a person seen on both sides of the boundary (frame 12) has one id on both sides
    before = {d["track_id"] for f in sharded["frames"][8:12] for d in f["detections"] if "track_id" in d}
    after = {d["track_id"] for f in sharded["frames"][12:16] for d in f["detections"] if "track_id" in d}
    assert before & after


# -- behind synapse serve: the server splits the job across its own worker processes ------------------


@pytest.mark.slow
def test_sharded_export_through_the_endpoint(cli, clip, whole_export, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import httpx

    from tests.http_fixtures import API_KEY, serve_app

    whole_mp4, _ = whole_export("overlay")
    with serve_app(tmp_path / "srv") as ep:
        env = {"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_JOBS_DB": str(tmp_path / "jobs.db")}
        out = tmp_path / "remote.mp4"
        run = cli("export", clip, "--job", "overlay", "--params", _params_file(out, OVERLAY), "-o", out, "--json", "--no-cache",
                  "--endpoint", ep.url, "--shards", "2", env=env)  # fmt: skip
        assert run.exit_code == 0, run.stderr
        assert [s["index"] for s in run.events()[-1]["result"]["shards"]] == [0, 1]
        assert {e.get("shard") for e in run.events() if e["type"] == "log"} >= {"1/2", "2/2"}
        refused = httpx.post(f"{ep.url}/v1/jobs/export?shards=9999", json={"input": None}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert refused.status_code == 422 and "shards" in refused.json()["message"]
    assert_same_video(out, whole_mp4)
