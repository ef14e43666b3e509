"""``--court``: four court corners in pixels -> a polygon filter and a pixel-to-metre homography.

Corners go round the court: X1,Y1 and X2,Y2 are the two ends of one
baseline (the far one, seen from a camera behind the court), X3,Y3 and
X4,Y4 the other baseline, right then left. Corner 1 maps to (0, 0) m,
corner 2 to (width, 0), corner 3 to (width, length), corner 4 to (0, length);
``position_m`` is [across, along] in metres from corner 1.
"""

from __future__ import annotations

import math
from typing import Sequence

from synapse_cli.errors import UsageError


def parse_corners(value: str | Sequence[float]) -> list[float]:
    """``"x1,y1,...,x4,y4"`` (or a list) -> 8 floats; anything else is a UsageError."""
    parts: Sequence[object] = [p for p in value.replace(" ", ",").split(",") if p] if isinstance(value, str) else value
    if len(parts) != 8:
        raise UsageError(f"--court needs 8 numbers (x,y of 4 corners), got {len(parts)}")
    try:
        numbers = [float(p) for p in parts]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"--court needs numbers, got {','.join(map(str, parts))}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise UsageError("--court corners must be finite numbers")
    return numbers


class Court:
    """A convex quadrilateral in the image and its mapping to a width x length rectangle in metres."""

    def __init__(self, corners: Sequence[float], width_m: float, length_m: float) -> None:
        numbers = parse_corners(corners)
        self.points = [(numbers[i], numbers[i + 1]) for i in range(0, 8, 2)]
        self.width_m, self.length_m = float(width_m), float(length_m)
        if not (self.width_m > 0 and self.length_m > 0):
            raise UsageError("court width and length must be positive")
        crosses = []
        for i in range(4):
            (ax, ay), (bx, by), (cx, cy) = self.points[i], self.points[(i + 1) % 4], self.points[(i + 2) % 4]
            crosses.append((bx - ax) * (cy - by) - (by - ay) * (cx - bx))
        area = abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(self.points, self.points[1:] + self.points[:1]))) / 2
        if area < 1.0 or not (all(c > 0 for c in crosses) or all(c < 0 for c in crosses)):
            raise UsageError("--court corners must form a convex quadrilateral, given in order around the court")
        self._sign = 1.0 if crosses[0] > 0 else -1.0
        self._h: list[list[float]] | None = None

    @property
    def homography(self) -> list[list[float]]:
        if self._h is None:
            import cv2
            import numpy as np

            src = np.array(self.points, dtype=np.float32)
            w, length = self.width_m, self.length_m
            dst = np.array([[0, 0], [w, 0], [w, length], [0, length]], dtype=np.float32)
            self._h = cv2.getPerspectiveTransform(src, dst).tolist()
        return self._h

    def contains(self, x: float, y: float) -> bool:
        """Inside or on the edge of the polygon."""
        for i in range(4):
            (ax, ay), (bx, by) = self.points[i], self.points[(i + 1) % 4]
            if self._sign * ((bx - ax) * (y - ay) - (by - ay) * (x - ax)) < 0:
                return False
        return True

    def to_metres(self, x: float, y: float) -> tuple[float, float]:
        h = self.homography
        d = h[2][0] * x + h[2][1] * y + h[2][2]
        return (h[0][0] * x + h[0][1] * y + h[0][2]) / d, (h[1][0] * x + h[1][1] * y + h[1][2]) / d
