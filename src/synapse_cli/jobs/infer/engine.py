"""One model replica for ``BatchedPool``: the ``Engine`` protocol, and ``YoloEngine``, an ultralytics predictor
driven a batch at a time on the device's own thread (``gpu_thread``), with the set-up at the job's batch shape
that is also ``--batch auto``'s memory probe on CUDA."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

from synapse_cli.jobs.infer import postprocess
from synapse_cli.jobs.infer.batch_size import MEMORY_HEADROOM, MPS_AUTO_BATCH, auto_candidates, batch_after_setup, is_out_of_memory
from synapse_cli.jobs.infer.postprocess import batched_postprocess


class Engine(Protocol):
    """One model replica: ``letterbox_into`` a batch's slice, ``run`` a stacked uint8 BHWC batch (plus the original frames).

    ``letterbox_shape`` is the letterboxed shape of a frame of ``shape``; ``letterbox_into`` may run in any thread.
    """

    def letterbox_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def letterbox_into(self, image: Any, out: Any) -> None: ...

    def buffer(self, shape: tuple[int, ...]) -> Any: ...

    def run(self, stacked: Any, images: list[Any]) -> list[Any]: ...

    def release(self) -> None: ...


_GPU_THREADS: dict[str, ThreadPoolExecutor] = {}
_GPU_THREADS_LOCK = threading.Lock()


def gpu_thread(device: str) -> ThreadPoolExecutor:
    """The one long-lived thread that makes every model call on ``device`` (CUDA), for every job in this process.

    PyTorch caches cuDNN execution plans per thread (``thread_local`` in ATen's ``Conv_v8.cpp``): a plan built
    for an input shape on one thread is built again on the next. Profiled on an H200 (docs/infer.md), a fresh
    model thread spent ~1.5 s per new batch shape doing that (yolo11n-pose has about 100 convolutions), which
    is most of a 20 s clip's time on the GPU. On one thread per device, the set-up, the batch probe and every
    batch of every job share their plans.
    """
    with _GPU_THREADS_LOCK:
        executor = _GPU_THREADS.get(device)
        if executor is None:
            executor = _GPU_THREADS[device] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"synapse-gpu-{device}")
        return executor


class YoloEngine:
    """An ultralytics predictor driven one batch at a time (its ``preprocess`` split so the letterbox runs elsewhere)."""

    def __init__(
        self, model: Any, device: str, half: bool, predict_args: dict[str, Any], probe_shape: tuple[int, int, int], setup_batch: int = 1
    ) -> None:
        import torch

        self.device = device
        self._torch = torch
        self._gpu = gpu_thread(device) if device.startswith("cuda") else None
        self.pad_to = 0  # CUDA: partial batches are padded to this size, the shape whose plans are built
        self._shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._set_up(model, half, predict_args, probe_shape, max(1, int(setup_batch)))
        self.predictor = model.predictor
        backend = self.predictor.model
        self.half = bool(getattr(backend, "fp16", False))
        self.fixed_batch = backend.format != "pt" and not getattr(backend, "dynamic", False)
        self._pin = device.startswith("cuda")
        self._torch_device = self.predictor.device
        # detect and pose: our batched postprocess (postprocess.py), the same detections as ultralytics' own
        self.batched_post = postprocess.supported(self.predictor)

    def _set_up(self, model: Any, half: bool, predict_args: dict[str, Any], shape: tuple[int, int, int], batch: int) -> None:
        """One real predict on ``batch`` blank frames: the predictor set up as batch 1 would set it up (imgsz, conf,
        classes, fp16, warm-up), and the model run once at the job's batch shape, so the cuDNN plans for that shape
        are built here, on the device's thread, rather than by the first batch and again after a batch-1 set-up.

        On CUDA the same call is the memory probe: ``setup_fits`` says whether its peak stayed within the budget
        (``fits``). A set-up batch that runs out of memory is retried at batch 1 (``setup_fits`` False).
        """
        import numpy as np

        frames = [np.zeros(shape, dtype=np.uint8)] * batch
        cuda = self.device.startswith("cuda")
        budget = self._memory_budget() if cuda else 0.0

        def predict(n: int) -> None:
            model.predict(frames[:n] if n > 1 else frames[0], **predict_args, device=self.device, half=half)
            if cuda:
                self._torch.cuda.synchronize()

        self.setup_requested = self.setup_batch = batch
        self.setup_fits = True
        try:
            self._on_device(lambda: predict(batch))
        except Exception as exc:
            if batch == 1 or not is_out_of_memory(exc):
                raise
            if cuda:
                self._torch.cuda.empty_cache()
            self.setup_batch, self.setup_fits = 1, False
            self._on_device(lambda: predict(1))
            return
        if cuda:
            self.setup_fits = self._torch.cuda.max_memory_allocated(self._torch.device(self.device)) <= budget

    def _memory_budget(self) -> float:
        """``MEMORY_HEADROOM`` of the GPU memory this process may use (free, plus what torch holds); peak stats reset."""
        torch = self._torch
        dev = torch.device(self.device)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        free, _total = torch.cuda.mem_get_info(dev)
        return MEMORY_HEADROOM * (free + torch.cuda.memory_reserved(dev))

    def letterbox(self, image: Any) -> Any:
        return self.predictor.pre_transform([image])[0]

    def letterbox_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The letterboxed shape of a frame of ``shape`` (computed once per shape, on a blank frame)."""
        out = self._shapes.get(tuple(shape))
        if out is None:
            import numpy as np

            out = self._shapes[tuple(shape)] = tuple(self.letterbox(np.zeros(shape, dtype=np.uint8)).shape)
        return out

    def letterbox_into(self, image: Any, out: Any) -> None:
        """``pre_transform``'s letterbox, resized straight into ``out`` (a slice of the batch's pinned buffer).

        The geometry is ultralytics' own ``LetterBox.get_params``, built as ``pre_transform`` builds it for one
        frame; the resize and the 114 padding are ``apply_image``'s. ``tests/test_infer_fixed.py`` checks the pixels
        equal to ``pre_transform``'s (and fails if ultralytics changes either). Anything but a 3-channel frame
        takes ``pre_transform`` and a copy.
        """
        import cv2
        import numpy as np

        if image.ndim != 3 or image.shape[2] != 3:
            out[...] = self.letterbox(image)
            return
        lb = self._letterboxer()
        params = lb.get_params({"img": image})
        w, h = params["new_unpad"]
        top, left = params["top"], params["left"]
        region = out[top : top + h, left : left + w]
        if image.shape[:2] == (h, w):
            region[...] = image
        else:
            resized = cv2.resize(image, (w, h), dst=region, interpolation=lb.interpolation)
            if not np.shares_memory(resized, region):  # an OpenCV that would not write into the view
                region[...] = resized
        fill = lb.padding_value
        out[:top] = fill
        out[top + h :] = fill
        out[top : top + h, :left] = fill
        out[top : top + h, left + w :] = fill

    def _letterboxer(self) -> Any:
        lb = getattr(self, "_lb", None)
        if lb is None:
            from ultralytics.data.augment import LetterBox

            p = self.predictor
            model = p.model
            auto = p.args.rect and not p.scale_fill and (model.format == "pt" or (getattr(model, "dynamic", False) and model.format != "imx"))
            lb = self._lb = LetterBox(p.imgsz, auto=auto, scale_fill=p.scale_fill, stride=model.stride)
        return lb

    def buffer(self, shape: tuple[int, ...]) -> Any:
        """A uint8 host tensor to stack a batch into: page-locked on CUDA, so the copy to the GPU is asynchronous.

        torch's caching host allocator keeps a pinned block until the copies that read it are done, so a buffer
        can be dropped as soon as its copy is queued.
        """
        return self._torch.empty(shape, dtype=self._torch.uint8, pin_memory=self._pin)

    def _on_device(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the device's own thread (CUDA), or here."""
        return fn() if self._gpu is None else self._gpu.submit(fn).result()

    def run(self, stacked: Any, images: list[Any]) -> list[Any]:
        return self._on_device(lambda: self._run(stacked, images))

    def _run(self, stacked: Any, images: list[Any]) -> list[Any]:
        torch, p = self._torch, self.predictor
        n = len(images)
        with torch.inference_mode():
            im = stacked.to(self._torch_device, non_blocking=self._pin)
            if self.pad_to > n:  # the last, partial batch: blank frames up to the shape the plans were built for
                im = torch.cat([im, im.new_zeros((self.pad_to - n, *im.shape[1:]))])
                images = images + [images[-1]] * (self.pad_to - n)
            im = im.permute(0, 3, 1, 2).contiguous()  # the same steps as BasePredictor.preprocess
            if im.shape[1] == 3:
                im = im.flip(1)
            im = (im.half() if p.model.fp16 else im.float()).div_(255)
            preds = p.inference(im)
            if self.batched_post:  # padding trimmed before NMS; one copy to the host for the batch
                first = preds[0] if isinstance(preds, (list, tuple)) else preds
                return batched_postprocess(p, first[:n], im[:n], images[:n])
            p.batch = ([f"image{i}.jpg" for i in range(len(images))], images, [""] * len(images))
            results = p.postprocess(preds, im, images)[:n]
        if self.device != "cpu":
            results = [r.cpu() for r in results]  # off the GPU here, not in the job thread, one result at a time
        return results

    def release(self) -> None:
        """After running out of memory (or the probe): give cached blocks back, and stop padding partial batches."""
        self.pad_to = 0
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    # -- GPU memory -----------------------------------------------------------------------

    def fits(self, batch: int, shape: tuple[int, int, int]) -> bool:
        """Run one dummy batch; does its peak stay within ``MEMORY_HEADROOM`` of what this process may use?"""
        torch = self._torch
        import numpy as np

        h, w, c = self.letterbox_shape(shape)
        dev = self._torch_device
        budget = self._on_device(self._memory_budget)
        try:
            self.run(torch.zeros((batch, h, w, c), dtype=torch.uint8), [np.zeros(shape, dtype=np.uint8)] * batch)
            self._on_device(lambda: torch.cuda.synchronize(dev))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.release()
            return False
        return torch.cuda.max_memory_allocated(dev) <= budget

    def auto_batch(self, shape: tuple[int, int, int], frames: int = 0) -> int:
        """The batch for ``--batch auto``: on CUDA the largest candidate (``auto_candidates``) that fits. The set-up
        ran the largest one already (``yolo_engines``): when its peak fitted, that call was the probe."""
        candidates = auto_candidates(frames)
        if self.device.startswith("cuda"):
            chosen = batch_after_setup(candidates, self.setup_requested, self.setup_fits, lambda b: self.fits(b, shape))
            self.release()
            self._torch.cuda.reset_peak_memory_stats(self._torch_device)  # report the job's peak, not the probe's
            return chosen
        return min(MPS_AUTO_BATCH, candidates[-1])

    def peak_memory_mib(self) -> float | None:
        if not self.device.startswith("cuda"):
            return None
        return round(self._torch.cuda.max_memory_allocated(self._torch_device) / 2**20, 1)



def yolo_engines(
    model: Any, weights: Path, device: str, half: bool, predict_args: dict[str, Any], shape: tuple[int, int, int], batch: int = 1
) -> tuple[YoloEngine, Callable[[int], YoloEngine]]:
    """Replica 0 from the job's loaded model, set up at ``batch``, and a factory for the others (each loads its own copy)."""
    first = YoloEngine(model, device, half, predict_args, shape, batch)

    def more(_index: int) -> YoloEngine:
        from synapse_cli.jobs.infer.runtime import load_model

        return YoloEngine(load_model(weights), device, half, predict_args, shape, batch)

    return first, more
