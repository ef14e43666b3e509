"""From ultralytics ``Results`` to the documented JSON: detections, per-track motion, streaming writers.

Everything is written as it is produced: a ``.jsonl`` file gets its header
line, then one line per processed frame, then a summary line; a ``.json`` file
is the same stream wrapped in one object (frames inside ``"frames": [...]``,
``processed_frames`` and ``tracks`` after them). Either way memory does not
grow with the length of the video.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import IO, Any, Sequence

# The 17 COCO keypoints, in the order YOLO pose models emit them.
COCO_KEYPOINTS = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)


def keypoint_names(count: int) -> tuple[str, ...]:
    return COCO_KEYPOINTS if count == len(COCO_KEYPOINTS) else tuple(f"k{i}" for i in range(count))


def _r(x: float, digits: int = 1) -> float:
    return round(float(x), digits)


def ground_point(box: Sequence[float]) -> tuple[float, float]:
    """Where a person stands: the bottom centre of the box (used for --court and speeds)."""
    return (box[0] + box[2]) / 2.0, box[3]


def detections_from(result: Any, names: dict[int, str], keypoints: bool) -> list[dict[str, Any]]:
    """One ultralytics ``Results`` -> our detection dicts (boxes in source-image pixels)."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy = boxes.xyxy.tolist()
    conf = boxes.conf.tolist()
    cls = boxes.cls.tolist()
    ids = boxes.id.tolist() if boxes.id is not None else None
    kps = result.keypoints.data.tolist() if keypoints and result.keypoints is not None else None
    kp_names = keypoint_names(len(kps[0])) if kps else ()
    out: list[dict[str, Any]] = []
    for i, box in enumerate(xyxy):
        det: dict[str, Any] = {
            "class": names.get(int(cls[i]), str(int(cls[i]))),
            "confidence": _r(conf[i], 3),
            "box": [_r(v) for v in box],
        }
        if ids is not None:
            det["track_id"] = int(ids[i])
        if kps is not None:
            det["keypoints"] = [
                {"name": name, "x": _r(p[0]), "y": _r(p[1]), "conf": _r(p[2], 3) if len(p) > 2 else None}
                for name, p in zip(kp_names, kps[i])
            ]
        out.append(det)
    return out


class Motion:
    """Per-track speeds and the ``tracks`` summary.

    A detection's speed is the distance its ground point moved over the last
    ``window_s`` seconds of its track, divided by that time, so single-frame
    jitter averages out. A track unseen for more than ``gap_s`` starts a new
    window. Only per-track sums are kept, never per-frame history.
    """

    def __init__(self, window_s: float = 0.5, gap_s: float = 1.0) -> None:
        self.window_s = window_s
        self.gap_s = gap_s
        self._recent: dict[int, deque[tuple[float, float, float, tuple[float, float] | None]]] = {}
        self._stats: dict[int, dict[str, Any]] = {}

    def update(self, det: dict[str, Any], frame: int, t: float | None, metres: tuple[float, float] | None = None) -> None:
        """Add ``speed_px_s`` (and ``speed_m_s`` when given the unrounded court position ``metres``) to ``det``."""
        tid = det.get("track_id")
        if tid is None:
            return
        s = self._stats.get(tid)
        if s is None:
            s = self._stats[tid] = {"first_frame": frame, "last_frame": frame, "frames": 0, "px": [0.0, 0], "m": [0.0, 0]}
        s["last_frame"] = frame
        s["frames"] += 1
        if t is None:
            return
        x, y = ground_point(det["box"])
        pos_m = metres
        recent = self._recent.setdefault(tid, deque())
        if recent and t - recent[-1][0] > self.gap_s:
            recent.clear()
        while len(recent) > 1 and t - recent[1][0] >= self.window_s:
            recent.popleft()
        if recent and t > recent[0][0]:
            t0, x0, y0, m0 = recent[0]
            dt = t - t0
            speed = math.hypot(x - x0, y - y0) / dt
            det["speed_px_s"] = _r(speed)
            s["px"][0] += speed
            s["px"][1] += 1
            if pos_m is not None and m0 is not None:
                speed_m = math.hypot(pos_m[0] - m0[0], pos_m[1] - m0[1]) / dt
                det["speed_m_s"] = _r(speed_m, 2)
                s["m"][0] += speed_m
                s["m"][1] += 1
        recent.append((t, x, y, pos_m))  # type: ignore[arg-type]

    def summary(self, metres: bool) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for tid in sorted(self._stats):
            s = self._stats[tid]
            row: dict[str, Any] = {
                "first_frame": s["first_frame"],
                "last_frame": s["last_frame"],
                "frames": s["frames"],
                "mean_speed_px_s": _r(s["px"][0] / s["px"][1]) if s["px"][1] else None,
            }
            if metres:
                row["mean_speed_m_s"] = _r(s["m"][0] / s["m"][1], 2) if s["m"][1] else None
            out[str(tid)] = row
        return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class ResultsWriter:
    """Streams the results file: header, frames as they come, then the summary.

    The file is line-buffered, so every frame is on disk (in the temporary
    file that ``atomic_output`` renames into place at the end) as soon as it is
    processed.
    """

    def __init__(self, path: Path, header: dict[str, Any], jsonl: bool) -> None:
        self.jsonl = jsonl
        self.count = 0
        self._f: IO[str] = path.open("w", encoding="utf-8", buffering=1)
        if jsonl:
            self._f.write(_dumps(header) + "\n")
        else:
            self._f.write(_dumps(header)[:-1] + ',"frames":[\n')

    def frame(self, obj: dict[str, Any]) -> None:
        line = _dumps(obj)
        if not self.jsonl and self.count:
            line = "," + line
        self._f.write(line + "\n")
        self.count += 1

    def finish(self, tail: dict[str, Any]) -> None:
        if self.jsonl:
            self._f.write(_dumps(tail) + "\n")
        else:
            self._f.write("]," + _dumps(tail)[1:] + "\n")
        self._f.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
