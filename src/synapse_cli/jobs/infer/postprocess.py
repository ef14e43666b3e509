"""Ultralytics' detect and pose ``postprocess`` for a whole batch: the same detections, fewer syncs and copies.

Ultralytics (``DetectionPredictor.postprocess`` → ``nms.non_max_suppression`` → ``construct_result``) works
image by image: a boolean gather per image (each one a device synchronisation), NMS, box and keypoint
scaling, a ``Results`` on the device, and our job then copied every result back to the host one by one.
Here, for a batch:

1. one candidate gather for the whole batch (``xc.nonzero()``, one sync), rows kept in ultralytics' order
   (image, then anchor);
2. per image, on its slice of the gathered rows, the very steps ``non_max_suppression`` takes (best class,
   confidence and class filters, the ``max_nms`` cut, class offsets, ``torchvision.ops.nms`` or ultralytics'
   ``TorchNMS``, ``max_det``): the same inputs in the same order, so the same detections;
3. box and keypoint scaling with ultralytics' own ``scale_boxes`` / ``scale_coords`` on every kept row of
   the batch at once (per original image shape: one group for a video): elementwise, so the same numbers;
4. one device-to-host copy for the batch, split on the host into ``Results`` (CPU tensors).

``tests/test_infer_postprocess.py`` checks it equal, tensor for tensor, to ultralytics' ``postprocess`` on
a real forward and on crafted predictions (empty images, ``max_det`` overflow, class filters). What it does
not cover (segment and OBB models, end-to-end heads, object features) goes to ultralytics' own
``postprocess``: ``supported`` says which. Unlike ultralytics, there is no NMS time limit (it drops the rest
of a batch when NMS runs past 2 s + 50 ms per image).
"""

from __future__ import annotations

import sys
from typing import Any


def supported(predictor: Any) -> bool:
    """Whether ``batched_postprocess`` gives ``predictor.postprocess``'s results for this model and these args."""
    args = predictor.args
    return (
        args.task in ("detect", "pose")
        and not getattr(predictor.model, "end2end", False)
        and getattr(predictor, "_feats", None) is None
        and not getattr(args, "embed", None)
        and (args.task != "pose" or getattr(predictor.model, "kpt_shape", None) is not None)
    )


def _nms_kept(x: Any, nc: int, extra: int, conf: float, iou: float, classes: Any, agnostic: bool, max_det: int,
              max_nms: int = 30000, max_wh: int = 7680) -> Any:  # fmt: skip
    """``non_max_suppression``'s per-image body (not rotated, one label per box) on one image's candidate rows."""
    import torch

    box, cls, mask = x.split((4, nc, extra), 1)
    best, j = cls.max(1, keepdim=True)
    x = torch.cat((box, best, j.float(), mask), 1)[best.view(-1) > conf]
    if classes is not None:
        x = x[(x[:, 5:6] == classes).any(1)]
    n = x.shape[0]
    if not n:
        return None
    if n > max_nms:
        x = x[x[:, 4].argsort(descending=True)[:max_nms]]
    c = x[:, 5:6] * (0 if agnostic else max_wh)
    scores, boxes = x[:, 4], x[:, :4] + c
    if x.device.type != "xpu" and "torchvision" in sys.modules:
        import torchvision  # type: ignore[import-untyped]

        i = torchvision.ops.nms(boxes, scores, iou)
    else:
        from ultralytics.utils.nms import TorchNMS

        i = TorchNMS.nms(boxes, scores, iou)
    return x[i[:max_det]]


def batched_postprocess(predictor: Any, preds: Any, img: Any, orig_imgs: list[Any], paths: list[str] | None = None) -> list[Any]:
    """``predictor.postprocess(preds, img, orig_imgs)`` for detect and pose (see ``supported``), as CPU ``Results``."""
    import torch
    from ultralytics.engine.results import Results
    from ultralytics.utils import ops

    args, model = predictor.args, predictor.model
    names = model.names
    pose = args.task == "pose"
    prediction = preds[0] if isinstance(preds, (list, tuple)) else preds
    bs = prediction.shape[0]
    nc = len(names) if args.task != "detect" else prediction.shape[1] - 4
    extra = prediction.shape[1] - nc - 4
    conf, iou = float(args.conf), float(args.iou)
    classes = torch.tensor(args.classes, device=prediction.device) if args.classes is not None else None
    paths = paths or [f"image{i}.jpg" for i in range(len(orig_imgs))]

    # 1. the candidates of every image, in one gather: rows ordered by image, then by anchor (as x[xc[i]] is)
    xc = prediction[:, 4 : 4 + nc].amax(1) > conf
    where = xc.nonzero()  # one sync for the batch
    rows = prediction.transpose(-1, -2)[where[:, 0], where[:, 1]]
    rows[:, :4] = ops.xywh2xyxy(rows[:, :4])
    counts = torch.bincount(where[:, 0], minlength=bs).tolist() if len(where) else [0] * bs

    # 2. NMS per image, on its own slice, as non_max_suppression does
    kept: list[Any] = []
    start = 0
    for count in counts:
        part = rows[start : start + count]
        start += count
        kept.append(_nms_kept(part, nc, extra, conf, iou, classes, bool(args.agnostic_nms), int(args.max_det)) if count else None)

    # 3. scaling, for all the kept rows of images of one original shape at once
    width = 6 + extra
    sizes = [0 if k is None else k.shape[0] for k in kept]
    present = [k for k in kept if k is not None]
    if present:
        allrows = torch.cat(present) if len(present) > 1 else present[0]
        in_shape = img.shape[2:]
        shapes = {orig_imgs[i].shape for i in range(bs) if sizes[i]}
        if len(shapes) == 1:  # a video: every kept row of the batch at once
            groups = [(next(iter(shapes)), allrows)]
        else:  # a folder of mixed sizes: image by image, on views of the same rows
            views = torch.split(allrows, [n for n in sizes if n])
            groups = list(zip([orig_imgs[i].shape for i in range(bs) if sizes[i]], views))
        for shape, part in groups:
            ops.scale_boxes(in_shape, part[:, :4], shape)  # in place, as construct_result's assignment to itself
            if pose:
                ops.scale_coords(in_shape, part[:, 6:].view(part.shape[0], *model.kpt_shape), shape)
        # 4. one copy to the host for the batch
        split = list(torch.split(allrows.cpu(), [n for n in sizes if n]))
    else:
        split = []
    results = []
    pieces = iter(split)
    for i, n in enumerate(sizes):
        pred = next(pieces) if n else torch.zeros((0, width))  # ultralytics' empty rows are float32
        result = Results(orig_imgs[i], path=paths[i], names=names, boxes=pred[:, :6])
        if pose:
            result.update(keypoints=pred[:, 6:].view(pred.shape[0], *model.kpt_shape))
        results.append(result)
    return results
