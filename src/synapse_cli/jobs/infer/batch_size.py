"""How many frames a model call takes: the device, ``--batch auto``'s candidates and probe, running out of memory.

Pure decisions (torch imported only by ``pick_device``), so they are tested without a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

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
