"""Running the model on several frames at once, and tracking in frame order.

On a CPU, torch's own intra-op threads synchronise at every layer: two
threads wait for each other hundreds of times per frame, and when another
process holds a core (a shared machine, our own decode and encode threads)
a waiting thread either spins or sleeps and the frame rate collapses. So
instead each worker thread gets its own model replica running torch with
one thread, and workers take whole frames: no per-layer synchronisation,
and every worker stays runnable. Ultralytics recommends one model per
thread for thread-safe inference, which is what this does.

Tracking (ByteTrack) must see frames in order, so it runs in the job's
thread on the results as they come back in order, doing what ultralytics'
``on_predict_postprocess_end`` callback does for ``model.track``.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

MAX_WORKERS = 8  # model replicas; beyond this, each worker gets more torch threads instead


def plan_workers(threads: int, accelerator: bool) -> tuple[int, int]:
    """(workers, torch threads per worker) for ``threads`` cores. One worker on a GPU."""
    if accelerator:
        return 1, threads
    workers = max(1, min(threads, MAX_WORKERS))
    return workers, max(1, threads // workers)


def has_accelerator() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available()))


class InferencePool:
    """``submit(image) -> Future[Results]``; each worker thread owns one model replica."""

    def __init__(self, model: Any, weights: Path, workers: int, torch_threads: int, predict_args: dict[str, Any]) -> None:
        self.workers = workers
        self._weights = weights
        self._threads = torch_threads
        self._args = predict_args
        self._spare: queue.SimpleQueue = queue.SimpleQueue()
        self._spare.put(model)  # the replica the job already loaded serves the first worker
        self._used = [model]  # every replica this pool ran: the process keeps them for the next job
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synapse-infer")

    def _model(self) -> Any:
        model = getattr(self._local, "model", None)
        if model is None:
            try:
                model = self._spare.get_nowait()
            except queue.Empty:
                from synapse_cli.jobs.infer.runtime import REPLICAS

                model = REPLICAS.take(self._weights)
                self._used.append(model)
            self._local.model = model
        return model

    def _predict(self, image: Any) -> Any:
        model = self._model()
        result = model.predict(image, **self._args)[0]
        if not getattr(self._local, "threads_set", False):
            # the predictor's set-up (select_device) set this thread's torch threads to cores - 1
            from synapse_cli.jobs.infer.runtime import set_threads

            set_threads(self._threads)
            self._local.threads_set = True
        return result

    def submit(self, image: Any) -> Future:
        return self._executor.submit(self._predict, image)

    def close(self) -> None:
        """Stop the workers; once none runs, their replicas go back to the process's idle ones."""
        from synapse_cli.jobs.infer.runtime import REPLICAS

        self._executor.shutdown(wait=True, cancel_futures=True)
        for model in self._used:
            REPLICAS.give_back(self._weights, model)
        self._used.clear()

    def __enter__(self) -> "InferencePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tracker:
    """ByteTrack over results given in frame order; the results come back with track ids."""

    def __init__(self, config: str = "bytetrack.yaml") -> None:
        from ultralytics.trackers.byte_tracker import BYTETracker
        from ultralytics.utils import YAML, IterableSimpleNamespace
        from ultralytics.utils.checks import check_yaml

        self._tracker = BYTETracker(args=IterableSimpleNamespace(**YAML.load(check_yaml(config))))

    def __call__(self, result: Any) -> Any:
        import torch

        tracks = self._tracker.update(result.boxes.cpu().numpy(), result.orig_img)
        if len(tracks) == 0:
            if any(not t.is_activated for t in self._tracker.tracked_stracks):
                return result[:0]  # hide new tracks until they are confirmed
            return result
        tracked = result[tracks[:, -1].astype(int)]
        tracked.update(boxes=torch.as_tensor(tracks[:, :-1], device=result.boxes.data.device))
        return tracked
