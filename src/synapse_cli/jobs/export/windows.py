"""An export's output timeline as source pieces ``(index, start, end, speed)``, and a shard's window of it."""

from __future__ import annotations

import math
from typing import Any

from synapse_cli.errors import UsageError
from synapse_cli.jobs._media import MediaInfo
from synapse_cli.jobs.export.graph import Window
from synapse_cli.jobs.export.params import AnnotateParams, FramingParams


def framing_pieces(p: FramingParams, info: MediaInfo, logs: list[str] | None = None) -> list[tuple[int, float, float, float]]:
    """framing's output timeline as source pieces ``(index, start, end, speed)``: its segments, or the whole input."""
    if not p.segments:
        return [(0, 0.0, info.duration, 1.0)]
    pieces = []
    for i, s in enumerate(p.segments):
        end = min(s.end, info.duration)
        if s.start >= info.duration:
            raise UsageError(f"framing: params.segments[{i}] starts at {s.start:g}s, after the end of the input ({info.duration:.2f}s)")
        if end < s.end and logs is not None:
            logs.append(f"segment {i} end {s.end:g}s clamped to the input's end ({info.duration:.2f}s)")
        pieces.append((i, s.start, end, s.speed))
    return pieces


def annotate_pieces(p: AnnotateParams, info: MediaInfo, logs: list[str] | None = None) -> list[tuple[int, float, float, float]]:
    """annotate's output timeline as source pieces ``(index, start, end, 1.0)``: its clips, in order."""
    pieces = []
    for i, c in enumerate(p.clips):
        if c.start >= info.duration:
            raise UsageError(f"annotate: params.clips[{i}] starts at {c.start:g}s, after the end of the input ({info.duration:.2f}s)")
        end = min(c.end, info.duration)
        if end < c.end and logs is not None:
            logs.append(f"clip {i} end {c.end:g}s clamped to the input's end ({info.duration:.2f}s)")
        pieces.append((i, c.start, end, 1.0))
    return pieces


def output_pieces(job: str, params: Any, info: MediaInfo, logs: list[str] | None = None) -> list[tuple[int, float, float, float]]:
    """The output timeline as source pieces ``(index, start, end, speed)``, in output order."""
    if job == "framing":
        return framing_pieces(params, info, logs)
    if job == "annotate":
        return annotate_pieces(params, info, logs)
    return [(0, 0.0, info.duration, 1.0)]


def _window(pieces: list[tuple[int, float, float, float]], start: float, end: float) -> Window:
    """The source window and the pieces that make output seconds ``[start, end)``."""
    chosen: list[tuple[int, float, float, float]] = []
    at = 0.0
    for index, s, e, speed in pieces:
        length = (e - s) / speed
        a, b = max(start, at), min(end, at + length)
        if b - a > 1e-9:
            chosen.append((index, s + (a - at) * speed, s + (b - at) * speed, speed))
        at += length
    if not chosen:
        raise UsageError(f"export part {start:g}..{end:g}s is outside the output ({at:.3f}s)")
    lo, hi = min(c[1] for c in chosen), max(c[2] for c in chosen)
    return Window(lo, hi, tuple((i, s - lo, e - lo, v) for i, s, e, v in chosen))


def _segment_window(pieces: list[tuple[int, float, float, float]], info: MediaInfo, start: float, end: float) -> Window:
    """framing with segments: the window for output seconds ``[start, end)``, in whole output frames
    (``start``/``end`` are frame boundaries, as ``split_export`` makes them) and the source frames they show."""
    from fractions import Fraction

    from synapse_cli.jobs.export._timeline import frame_rate, segments, slices

    rate = frame_rate(info.fps)
    segs = segments(pieces, info.fps)
    first_slot, stop_slot = round(Fraction(start) * rate), round(Fraction(end) * rate)
    parts = slices(segs, first_slot, stop_slot)
    if not parts:
        raise UsageError(f"export part {start:g}..{end:g}s is outside the output ({sum(s.frames for s in segs) / float(rate):.3f}s)")
    last = max(0, info.frames - 1)
    ranges = [sl.sources(rate, last) for sl in parts]
    first, stop = min(a for a, _ in ranges), max(b for _, b in ranges)
    compat = tuple((sl.segment.index, float(sl.segment.start - first / rate), float(sl.segment.end - first / rate), float(sl.segment.speed)) for sl in parts)
    return Window(float(first / rate), float(stop / rate), compat, first, tuple(parts))


def part_window(job: str, params: Any, info: MediaInfo, part: Any) -> Window:
    """The window of a shard's ``spec.part`` (``[start, end]`` output seconds), or a one-line UsageError."""
    if not (isinstance(part, (list, tuple)) and len(part) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in part)):
        raise UsageError(f"export part: expected [start, end] in output seconds, got {str(part)[:60]}")
    pieces = output_pieces(job, params, info)
    if job == "framing" and params.segments:
        return _segment_window(pieces, info, float(part[0]), float(part[1]))
    return _window(pieces, float(part[0]), float(part[1]))
