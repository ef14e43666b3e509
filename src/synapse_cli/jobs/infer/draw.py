"""Boxes, skeletons, track ids and the court outline, drawn in place on a BGR frame with OpenCV."""

from __future__ import annotations

from typing import Any, Sequence

# COCO skeleton as keypoint index pairs (the limbs ultralytics draws).
SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip
# A colour-blind-friendly palette (BGR), picked by track id so a player keeps a colour.
PALETTE = (
    (255, 56, 56), (49, 210, 207), (56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255),
    (72, 249, 10), (146, 204, 23), (61, 219, 134), (26, 147, 52), (187, 212, 0), (168, 153, 44),
)  # fmt: skip
KEYPOINT_MIN_CONF = 0.5


def draw_detections(image: Any, detections: Sequence[dict[str, Any]], court: Any = None) -> Any:
    """Draw on ``image`` itself (no copy) and return it."""
    import cv2

    h, w = image.shape[:2]
    lw = max(2, round((h + w) / 2 * 0.003))
    if court is not None:
        import numpy as np

        poly = np.array([[int(round(x)), int(round(y))] for x, y in court.points], dtype=np.int32)
        cv2.polylines(image, [poly], True, (255, 255, 255), lw, cv2.LINE_AA)
    for det in detections:
        tid = det.get("track_id")
        color = PALETTE[(tid if tid is not None else 0) % len(PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in det["box"])
        cv2.rectangle(image, (x1, y1), (x2, y2), color, lw, cv2.LINE_AA)
        label = f"#{tid} " if tid is not None else ""
        label += f"{det['class']} {det['confidence']:.2f}"
        if "speed_m_s" in det:
            label += f" {det['speed_m_s']:.1f} m/s"
        scale = lw / 3
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, lw // 2))
        top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1
        cv2.rectangle(image, (x1, top), (x1 + tw + 2, top + th + base + 2), color, -1)
        cv2.putText(image, label, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(1, lw // 2), cv2.LINE_AA)
        kps = det.get("keypoints")
        if not kps:
            continue
        pts = [(int(round(k["x"])), int(round(k["y"]))) if (k["conf"] is None or k["conf"] >= KEYPOINT_MIN_CONF) else None for k in kps]
        if len(pts) == 17:
            for a, b in SKELETON:
                pa, pb = pts[a], pts[b]
                if pa is not None and pb is not None:
                    cv2.line(image, pa, pb, color, max(1, lw - 1), cv2.LINE_AA)
        for p in pts:
            if p is not None:
                cv2.circle(image, p, lw + 1, (0, 255, 255), -1, cv2.LINE_AA)
    return image
