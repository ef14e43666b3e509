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

The pool is here; the model replica (``YoloEngine``, ``gpu_thread``) is in ``engine``, and the
choice of batch size (``--batch auto``, ``setup_batch``, running out of memory) in ``batch_size``.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from synapse_cli.errors import JobError, one_line
from synapse_cli.jobs.infer.batch_size import (
    AUTO_BATCHES,
    MEMORY_HEADROOM,
    MPS_AUTO_BATCH,
    auto_candidates,
    batch_after_setup,
    choose_batch,
    is_out_of_memory,
    pick_device,
    setup_batch,
)
from synapse_cli.jobs.infer.engine import Engine, YoloEngine, gpu_thread, yolo_engines

# where the job, the tests and the benchmarks import them from: the batch size and the engine have modules of their own
__all__ = ["AUTO_BATCHES", "MEMORY_HEADROOM", "MPS_AUTO_BATCH", "BatchedPool", "Engine", "YoloEngine", "auto_candidates",
           "batch_after_setup", "choose_batch", "gpu_thread", "is_out_of_memory", "pick_device", "setup_batch", "yolo_engines"]


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
                raise JobError(f"out of memory running the model on one frame: {one_line(exc)[:200]}") from None
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
