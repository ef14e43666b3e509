"""Frames to the model in batches: on a GPU (CUDA, MPS), or on a CPU with ``--batch N``.

The pipeline, each stage in its own threads and bounded, so the model never
waits for frames and memory does not grow with the video:

    job thread:  submit(frame) ──► open batch ──(full, or flush)──► bounded queue
    prep pool:   letterbox every frame of a batch (the predictor's own
                 ``pre_transform``) and stack them into one uint8 buffer,
                 in pinned host memory on CUDA
    model:       copy to the device (``non_blocking`` from pinned memory),
                 BHWC→BCHW, BGR→RGB, fp16/fp32, /255, forward, NMS, results
                 back on the host; one thread per model replica (on CUDA it hands
                 each call to the device's own long-lived thread: ``gpu_thread``)

Every step after the letterbox is what ultralytics' own ``preprocess``,
``inference`` and ``postprocess`` do for a list of frames, so a batch gives
the batch-1 detections (up to floating-point noise). ``submit`` returns one
future per frame; the job waits on them in frame order, so results and
tracking stay in order whatever the batch size.

On CUDA a partial batch (the video's last) is padded with blank frames to the
full batch, so it runs with the plans already built for that shape, and
``--batch auto`` probes the largest candidate first.

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


def choose_batch(candidates: Sequence[int], fits: Callable[[int], bool]) -> int:
    """The largest of ``candidates`` (ascending) for which ``fits`` holds, trying the largest first; 1 if none.

    Largest first: on a GPU with room (the usual case) one probe settles it, and that probe's input shape is
    the one every full batch has, so the cuDNN plans it builds are the ones the job uses (see ``gpu_thread``).
    """
    for b in sorted(candidates, reverse=True):
        if fits(b):
            return b
    return 1


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's ``OutOfMemoryError``, MPS's and the CPU allocator's ``RuntimeError``s."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


class Engine(Protocol):
    """One model replica: ``letterbox`` a frame, ``run`` a stacked uint8 BHWC batch (plus the original frames)."""

    def letterbox(self, image: Any) -> Any: ...

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

    def __init__(self, model: Any, device: str, half: bool, predict_args: dict[str, Any], probe_shape: tuple[int, int, int]) -> None:
        import numpy as np
        import torch

        self.device = device
        self._torch = torch
        self._gpu = gpu_thread(device) if device.startswith("cuda") else None
        self.pad_to = 0  # CUDA: partial batches are padded to this size, the shape whose plans are built
        # One real predict sets the predictor up exactly as batch 1 would (imgsz, conf, classes, fp16, warm-up).
        self._on_device(lambda: model.predict(np.zeros(probe_shape, dtype=np.uint8), **predict_args, device=device, half=half))
        self.predictor = model.predictor
        backend = self.predictor.model
        self.half = bool(getattr(backend, "fp16", False))
        self.fixed_batch = backend.format != "pt" and not getattr(backend, "dynamic", False)
        self._pin = device.startswith("cuda")
        self._torch_device = self.predictor.device
        # detect and pose: our batched postprocess (postprocess.py), the same detections as ultralytics' own
        self.batched_post = postprocess.supported(self.predictor)

    def letterbox(self, image: Any) -> Any:
        return self.predictor.pre_transform([image])[0]

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

        h, w, c = self.letterbox(np.zeros(shape, dtype=np.uint8)).shape
        dev = self._torch_device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        free, _total = torch.cuda.mem_get_info(dev)
        budget = MEMORY_HEADROOM * (free + torch.cuda.memory_reserved(dev))
        try:
            self.run(torch.zeros((batch, h, w, c), dtype=torch.uint8), [np.zeros(shape, dtype=np.uint8)] * batch)
            self._on_device(lambda: torch.cuda.synchronize(dev))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.release()
            return False
        return torch.cuda.max_memory_allocated(dev) <= budget

    def auto_batch(self, shape: tuple[int, int, int]) -> int:
        if self.device.startswith("cuda"):
            chosen = choose_batch(AUTO_BATCHES, lambda b: self.fits(b, shape))
            self.release()
            self._torch.cuda.reset_peak_memory_stats(self._torch_device)  # report the job's peak, not the probe's
            return chosen
        return MPS_AUTO_BATCH

    def peak_memory_mib(self) -> float | None:
        if not self.device.startswith("cuda"):
            return None
        return round(self._torch.cuda.max_memory_allocated(self._torch_device) / 2**20, 1)


_STOP = object()


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
        self._prep = ThreadPoolExecutor(max_workers=max(1, prep_threads), thread_name_prefix="synapse-prep")
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
        images = [image for image, _ in items]
        job = self._prep.submit(self._collate, images)
        while True:  # blocks while the model threads are busy: memory stays bounded
            if self._stop.is_set():
                raise JobError("inference stopped")
            try:
                self._queue.put((job, items), timeout=0.2)
                return
            except queue.Full:
                continue

    def _collate(self, images: list[Any]) -> list[tuple[Any, list[Any], int]]:
        """Letterbox and stack; a change of letterboxed shape (a folder of mixed sizes) starts a new group."""
        import numpy as np

        boxed = [self._first.letterbox(im) for im in images]
        groups: list[tuple[Any, list[Any], int]] = []
        start = 0
        for i in range(1, len(boxed) + 1):
            if i == len(boxed) or boxed[i].shape != boxed[start].shape:
                part = boxed[start:i]
                buf = self._first.buffer((len(part), *part[0].shape))
                np.stack(part, out=np.asarray(buf))  # a CPU tensor's array shares its memory
                groups.append((buf, images[start:i], start))
                start = i
        return groups

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
                for stacked, images, _start in job.result():
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
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(_STOP)  # room: at most one item per thread can have been added since the drain
        for t in self._threads:
            t.join()
        self._prep.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BatchedPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def yolo_engines(model: Any, weights: Path, device: str, half: bool, predict_args: dict[str, Any], shape: tuple[int, int, int]) -> tuple[YoloEngine, Callable[[int], YoloEngine]]:
    """Replica 0 from the job's loaded model, and a factory for the others (each loads its own copy)."""
    first = YoloEngine(model, device, half, predict_args, shape)

    def more(_index: int) -> YoloEngine:
        from synapse_cli.jobs.infer.runtime import load_model

        return YoloEngine(load_model(weights), device, half, predict_args, shape)

    return first, more
