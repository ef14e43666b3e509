"""Frames to the model in batches: on a GPU (CUDA, MPS), or on a CPU with ``--batch N``.

The pipeline, each stage in its own threads and bounded, so the model never
waits for frames and memory does not grow with the video:

    job thread:  submit(frame) ──► open batch ──(full, flush, or the source ends)──► bounded queue
    prep pool:   the batch's frames split across the prep threads, each letterboxed
                 (ultralytics' ``LetterBox`` geometry) straight into its slice of one
                 uint8 buffer, in pinned host memory on CUDA
    model:       copy to the device (``non_blocking`` from pinned memory),
                 BHWC→BCHW, BGR→RGB, fp16/fp32, /255, forward, then the batched
                 postprocess (``postprocess.py``: one candidate gather, NMS per
                 image, scaling for the batch, one copy back to the host); one thread
                 per model replica (on CUDA it hands each call to the device's own
                 long-lived thread: ``gpu_thread``)

Every step after the letterbox is what ultralytics' own ``preprocess``,
``inference`` and ``postprocess`` do for a list of frames, so a batch gives
the batch-1 detections (up to floating-point noise). ``submit`` returns one
future per frame; the job waits on them in frame order, so results and
tracking stay in order whatever the batch size.

The predictor is set up at the job's batch shape (``setup_batch``), so the
plans for that shape are built once, during the set-up, on the device's thread;
with ``--batch auto`` on CUDA that set-up is also the memory probe, at the
largest candidate a clip of this length can fill (``auto_candidates``). On
CUDA a partial batch (the video's last) is padded with blank frames to the
full batch, so it runs with those plans; the padding is dropped before NMS.

A batch that runs out of memory is split in half and retried, and later
batches use the smaller size (a warning says so); batch 1 out of memory is a
``JobError``.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from synapse_cli.errors import JobError
from synapse_cli.jobs.infer import postprocess
from synapse_cli.jobs.infer.postprocess import batched_postprocess

AUTO_BATCHES = (8, 16, 32, 64)  # what ``--batch auto`` tries on a GPU, smallest first
MEMORY_HEADROOM = 0.8  # auto batch: the probe's peak must stay under this share of the GPU memory we may use
MPS_AUTO_BATCH = 16  # no reliable peak-memory figure on MPS: a fixed, modest batch


def pick_device() -> str:
    """``cuda:0``, ``mps`` or ``cpu``: where a plain ``model.predict`` would run."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def auto_candidates(frames: int, candidates: Sequence[int] = AUTO_BATCHES) -> tuple[int, ...]:
    """``candidates`` for a job of ``frames`` frames: none larger than the smallest that holds them all.

    A short clip gains nothing from a batch it cannot fill (the padding is run too, and the probe builds plans and
    takes memory for it): 20 frames get at most 32, a 5-frame clip 8. ``frames`` 0 (unknown) leaves them all.
    """
    ordered = sorted(candidates)
    if frames <= 0:
        return tuple(ordered)
    holding = [b for b in ordered if b >= frames]
    return tuple(b for b in ordered if b < frames) + tuple(holding[:1])


def choose_batch(candidates: Sequence[int], fits: Callable[[int], bool]) -> int:
    """The largest of ``candidates`` (ascending) for which ``fits`` holds, trying the largest first; 1 if none.

    Largest first: on a GPU with room (the usual case) one probe settles it, and that probe's input shape is
    the one every full batch has, so the cuDNN plans it builds are the ones the job uses (see ``gpu_thread``).
    """
    for b in sorted(candidates, reverse=True):
        if fits(b):
            return b
    return 1


def batch_after_setup(candidates: Sequence[int], tried: int, tried_fits: bool, fits: Callable[[int], bool]) -> int:
    """``--batch auto`` after a set-up at ``tried``: that batch if it is the largest candidate and its peak fitted
    (the set-up was the probe), else the largest of the others that ``fits``, never probing ``tried`` again."""
    if tried == candidates[-1] and tried_fits:
        return tried
    rest = [b for b in candidates if b < tried] if tried in candidates else list(candidates)
    return choose_batch(rest, fits)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's ``OutOfMemoryError``, MPS's and the CPU allocator's ``RuntimeError``s."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


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


_STOP = object()


class _Prepared:
    """A batch being letterboxed: per group of one letterboxed shape, its buffer, frames and letterbox futures."""

    def __init__(self, groups: list[tuple[Any, list[Any], list[Future]]]) -> None:
        self.groups = groups

    def cancel(self) -> None:
        for _buf, _images, futures in self.groups:
            for f in futures:
                f.cancel()


class BatchedPool:
    """``submit(image) -> Future[Results]`` in batches of ``batch``; ``flush(future)`` sends a partial batch.

    ``engines(i)`` gives model replica ``i`` (called in that replica's thread,
    except replica 0, which the job built to set things up). Each of the
    ``workers`` model threads owns one replica. At most ``workers + 1`` whole
    batches wait between the job thread and the model threads: ``submit``
    blocks beyond that (backpressure).
    """

    def __init__(
        self,
        first: Engine,
        engines: Callable[[int], Engine],
        batch: int,
        workers: int = 1,
        prep_threads: int = 2,
        torch_threads: int | None = None,
    ) -> None:
        self.batch = max(1, int(batch))
        self.workers = max(1, int(workers))
        self.warnings: list[str] = []
        self._first, self._engines, self._torch_threads = first, engines, torch_threads
        self._open: list[tuple[Any, Future]] = []
        self._queue: queue.Queue = queue.Queue(maxsize=self.workers + 1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._prep_threads = max(1, int(prep_threads))
        self._prep = ThreadPoolExecutor(max_workers=self._prep_threads, thread_name_prefix="synapse-prep")
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"synapse-infer-{i}", daemon=True) for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def capacity(self) -> int:
        """Frames the job keeps in flight: a batch per model thread, one being letterboxed, and the open one.

        Enough for the model never to wait; the queue itself would hold more (``workers + 1`` batches).
        """
        return (self.workers + 2) * self.batch

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, image: Any) -> Future:
        future: Future = Future()
        self._open.append((image, future))
        if len(self._open) >= self.batch:
            self._dispatch()
        return future

    def flush(self, future: Future | None = None) -> None:
        """Send the open batch now (if ``future`` is given: only if that frame is in it)."""
        if self._open and (future is None or any(f is future for _, f in self._open)):
            self._dispatch()

    def _dispatch(self) -> None:
        items, self._open = self._open, []
        job = self._prepare([image for image, _ in items])
        while True:  # blocks while the model threads are busy: memory stays bounded
            if self._stop.is_set():
                job.cancel()
                raise JobError("inference stopped")
            try:
                self._queue.put((job, items), timeout=0.2)
                return
            except queue.Full:
                continue

    def _prepare(self, images: list[Any]) -> "_Prepared":
        """Letterbox a batch across the prep threads, each frame resized straight into its slice of the batch's
        (pinned, on CUDA) buffer; a change of letterboxed shape (a folder of mixed sizes) starts a new group."""
        import numpy as np

        shapes = [self._first.letterbox_shape(im.shape) for im in images]
        groups: list[tuple[Any, list[Any], list[Future]]] = []
        start = 0
        for i in range(1, len(images) + 1):
            if i == len(images) or shapes[i] != shapes[start]:
                part = images[start:i]
                buf = self._first.buffer((len(part), *shapes[start]))
                out = np.asarray(buf)  # a CPU tensor's array shares its memory
                step = -(-len(part) // self._prep_threads)
                futures = [self._prep.submit(self._letterbox, part[a : a + step], out[a : a + step]) for a in range(0, len(part), step)]
                groups.append((buf, part, futures))
                start = i
        return _Prepared(groups)

    def _letterbox(self, images: list[Any], out: Any) -> None:
        for image, slot in zip(images, out):
            self._first.letterbox_into(image, slot)

    def _work(self, index: int) -> None:
        engine: Engine | None = None
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, items = item
            futures = [f for _, f in items]
            try:
                if engine is None:
                    engine = self._first if index == 0 else self._engines(index)
                    if self._torch_threads:
                        from synapse_cli.jobs.infer.runtime import set_threads

                        set_threads(self._torch_threads)
                results: list[Any] = []
                for stacked, images, letterboxed in job.groups:
                    for done in letterboxed:
                        done.result()  # this group's frames are all in its buffer (or a letterbox failed: raised here)
                    results += self._run(engine, stacked, images)
                for f, r in zip(futures, results):
                    f.set_result(r)
            except BaseException as exc:  # noqa: BLE001 - handed to the job thread through the futures
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)

    def _run(self, engine: Engine, stacked: Any, images: list[Any]) -> list[Any]:
        if self._stop.is_set():
            raise JobError("inference stopped")
        try:
            return engine.run(stacked, images)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            engine.release()
            n = len(images)
            if n == 1:
                raise JobError(f"out of memory running the model on one frame: {' '.join(str(exc).split())[:200]}") from None
            half = n // 2
            with self._lock:
                if self.batch > half:
                    self.batch = max(1, half)
                    self.warnings.append(f"batch of {n} ran out of memory; continuing with batch {self.batch}")
            return self._run(engine, stacked[:half], images[:half]) + self._run(engine, stacked[half:], images[half:])

    def close(self) -> None:
        """Stop: queued batches are dropped, a batch on the model finishes, every thread is joined."""
        self._stop.set()
        self._open = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[0].cancel()  # letterboxing not yet started is dropped
        for _ in self._threads:
            self._queue.put(_STOP)  # room: at most one item per thread can have been added since the drain
        for t in self._threads:
            t.join()
        self._prep.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BatchedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def setup_batch(device: str, batch: int, frames: int, weights: Path) -> int:
    """The batch to set the predictor up at: the job's (``batch``), or for ``--batch auto`` (0) the largest that auto
    may choose (``auto_candidates``) on CUDA, ``MPS_AUTO_BATCH`` (capped alike) on MPS. An exported model (not .pt)
    may have a fixed batch: set up at 1, as before. So does the CPU, which has no plans to build: a set-up at
    batch 8 would only run 7 blank frames more."""
    if weights.suffix.lower() != ".pt" or device == "cpu":
        return 1
    if batch:
        return batch
    largest = auto_candidates(frames)[-1]
    if device.startswith("cuda"):
        return largest
    return min(MPS_AUTO_BATCH, largest) if device == "mps" else 1


def yolo_engines(
    model: Any, weights: Path, device: str, half: bool, predict_args: dict[str, Any], shape: tuple[int, int, int], batch: int = 1
) -> tuple[YoloEngine, Callable[[int], YoloEngine]]:
    """Replica 0 from the job's loaded model, set up at ``batch``, and a factory for the others (each loads its own copy)."""
    first = YoloEngine(model, device, half, predict_args, shape, batch)

    def more(_index: int) -> YoloEngine:
        from synapse_cli.jobs.infer.runtime import load_model

        return YoloEngine(load_model(weights), device, half, predict_args, shape, batch)

    return first, more
