"""Keyframe interpolation shared by the export jobs (pure Python, no ffmpeg)."""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

INTERPOLATIONS = ("linear", "catmull-rom")


def _catmull_rom(p0: float, p1: float, p2: float, p3: float, u: float) -> float:
    u2, u3 = u * u, u * u * u
    return 0.5 * (2 * p1 + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u2 + (-p0 + 3 * p1 - 3 * p2 + p3) * u3)


def interpolate(times: Sequence[float], values: Sequence[Sequence[float]], t: float, method: str = "linear") -> list[float]:
    """Value vector at time ``t``; held constant before the first and after the last keyframe."""
    if t <= times[0]:
        return list(values[0])
    if t >= times[-1]:
        return list(values[-1])
    i = bisect_right(times, t) - 1
    u = (t - times[i]) / (times[i + 1] - times[i])
    a, b = values[i], values[i + 1]
    if method == "linear":
        return [x + (y - x) * u for x, y in zip(a, b)]
    before = values[i - 1] if i > 0 else a
    after = values[i + 2] if i + 2 < len(values) else b
    return [_catmull_rom(p0, p1, p2, p3, u) for p0, p1, p2, p3 in zip(before, a, b, after)]
