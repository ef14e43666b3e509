"""An export's output timeline in whole frames, with exact rational arithmetic.

A segment of the output plays source seconds ``[start, end)`` at ``speed``. Its output frame ``k``
shows the source frame nearest to source time ``start + k * speed / fps``: frame
``floor(start * fps + k * speed + 1/2)``. Every quantity is a ``Fraction`` (the frame rate
recovered as ``30000/1001``, speeds and times as the decimals they were written as), so the frame an
output slot shows depends only on the slot and its segment, never on where a shard's window begins:
any split of the timeline picks the same source frames, and each output frame's timestamp is
``slot / fps`` exactly. (Floating point once picked a neighbouring frame at a shard boundary inside
a 2x segment: issue #27.)

ffmpeg is told the same choice in integers: each source frame's timestamp becomes the first output
slot that shows it (``first_slot``), in a time base of ``1/fps``; ffmpeg's ``fps`` filter then shows,
in each slot, the latest frame whose timestamp is not after it, which is exactly ``source_frame``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable

HALF = Fraction(1, 2)


def exact(value: Any) -> Fraction:
    """``value`` as the decimal it was written as (``0.1`` is 1/10, not the binary float's 3602879701896397/36028797018963968)."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, float):
        return Fraction(repr(value))
    return Fraction(value)


def frame_rate(fps: float) -> Fraction:
    """A stream's frame rate as a small fraction: 29.97002997... is 30000/1001, 30.0 is 30."""
    return Fraction(fps).limit_denominator(1001)


@dataclass(frozen=True)
class Segment:
    """One piece of the output timeline: source seconds from ``start`` at ``speed``, ``frames`` output frames long."""

    index: int  # into the params' segments
    start: Fraction  # source seconds
    end: Fraction
    speed: Fraction
    frames: int  # output frames: round(length / speed * fps), at least 1

    def anchor(self, rate: Fraction) -> Fraction:
        """``start * fps + 1/2``: output frame ``k`` shows source frame ``floor(anchor + k * speed)``."""
        return self.start * rate + HALF

    def source_frame(self, k: int, rate: Fraction, last: int) -> int:
        """The source frame output frame ``k`` of this segment shows (never past the input's ``last`` frame)."""
        return min(last, math.floor(self.anchor(rate) + k * self.speed))

    def first_slot(self, j: int, rate: Fraction) -> int:
        """The first output frame of this segment that shows source frame ``j`` or a later one."""
        return math.ceil((j - self.anchor(rate)) / self.speed)


def segments(pieces: Iterable[tuple[int, Any, Any, Any]], fps: float) -> list[Segment]:
    """The output timeline's ``(index, start, end, speed)`` pieces as ``Segment``s of whole frames."""
    rate = frame_rate(fps)
    out = []
    for index, start, end, speed in pieces:
        s, e, v = exact(start), exact(end), exact(speed)
        out.append(Segment(index, s, e, v, max(1, round((e - s) / v * rate))))
    return out


@dataclass(frozen=True)
class Slice:
    """Output frames ``[ka, kb)`` of one segment: what one shard (or the whole export) encodes of it."""

    segment: Segment
    ka: int
    kb: int

    def sources(self, rate: Fraction, last: int) -> tuple[int, int]:
        """The source frames ``[ja, jb)`` this slice shows."""
        return self.segment.source_frame(self.ka, rate, last), self.segment.source_frame(self.kb - 1, rate, last) + 1

    def pts_expr(self, rate: Fraction, last: int) -> str:
        """An ffmpeg ``setpts`` expression, in a time base of ``1/fps``, for the slice's source frames
        ``ja + N`` (N counted from 0 after a trim to ``sources``): the slice's first output frame that
        shows that frame, from 0 (``max(0, first_slot(ja + N) - ka)``). Integers only: exact in doubles."""
        ja, _ = self.sources(rate, last)
        a, v = self.segment.anchor(rate), self.segment.speed
        numerator = f"((N+{ja})*{a.denominator * v.denominator}-{a.numerator * v.denominator})"
        return f"max(0,-floor(-{numerator}/{a.denominator * v.numerator})-{self.ka})"

    def frames(self) -> int:
        return self.kb - self.ka


def total_frames(segs: list[Segment]) -> int:
    return sum(s.frames for s in segs)


def slices(segs: list[Segment], first: int, stop: int) -> list[Slice]:
    """The slices that make output frames ``[first, stop)`` of the timeline, in order."""
    out, at = [], 0
    for seg in segs:
        ka, kb = max(first, at) - at, min(stop, at + seg.frames) - at
        if kb > ka:
            out.append(Slice(seg, ka, kb))
        at += seg.frames
    return out


def frame_map(segs: list[Segment], fps: float, last: int, first: int, stop: int) -> list[tuple[Fraction, int]]:
    """``(timestamp, source frame)`` of each output frame in ``[first, stop)``: what the tests compare across splits."""
    rate = frame_rate(fps)
    out: list[tuple[Fraction, int]] = []
    slot = first
    for sl in slices(segs, first, stop):
        for k in range(sl.ka, sl.kb):
            out.append((slot / rate, sl.segment.source_frame(k, rate, last)))
            slot += 1
    return out


def split_marks(frames: int, n: int) -> list[int]:
    """Output-frame boundaries of ``n`` contiguous shards over ``frames`` frames (fewer when frames are fewer)."""
    return sorted({round(Fraction(frames * k, n)) for k in range(0, n + 1)})
