"""overlay's filter graph: a keyframed highlight ellipse, its masks drawn in Python and fed to ffmpeg's stdin."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from synapse_cli.errors import UsageError
from synapse_cli.jobs._media import MediaInfo
from synapse_cli.jobs.export._keyframes import interpolate
from synapse_cli.jobs.export.graph import Plan, Window, open_source, write_text
from synapse_cli.jobs.export.params import EllipseKeyframe, OverlayParams


def _mask_size(info: MediaInfo) -> tuple[int, int]:
    """Masks are drawn at up to 640 px wide and scaled up by ffmpeg (which also smooths the edge)."""
    scale = min(1.0, 640 / info.width)
    return max(2, int(info.width * scale) // 2 * 2), max(2, int(info.height * scale) // 2 * 2)


def plan_overlay(p: OverlayParams, info: MediaInfo, workdir: Path, window: Optional[Window] = None) -> Plan:
    start = p.start if p.start is not None else 0.0
    end = min(p.end if p.end is not None else info.duration, info.duration)
    if end <= start:
        raise UsageError(f"overlay: the highlight window {start:g}s..{end:g}s is empty for a {info.duration:.2f}s input")
    keyframes = sorted(p.keyframes, key=lambda k: k.time)
    logs = [
        f"ellipse keyframe {i} at {k.time:g}s has its centre outside the {info.width}x{info.height} frame"
        for i, k in enumerate(keyframes)
        if not (0 <= k.x <= info.width and 0 <= k.y <= info.height)
    ]
    offset = window.start if window else 0.0  # global time of the source clock's 0
    feed = _mask_feed(p, info, window, (start, end), keyframes)
    source, audio = open_source(info, window)
    video = _highlight(p, info, source)
    if p.text:
        video = video.drawtext(
            textfile=write_text(workdir, "overlay.txt", p.text),
            fontcolor="white",
            fontsize="h/18",
            x="(w-tw)/2",
            y="h*0.06",
            box=1,
            boxcolor="black@0.5",
            boxborderw=12,
            expansion="none",
            # a frame exactly on a bound is in (between() is inclusive), whatever the rounding of a shard's clock
            enable=f"between(t,{start - offset - 1e-4:.6f},{end - offset + 1e-4:.6f})",
        )
    video = video.filter("format", "yuv420p")
    duration = window.end - window.start if window else info.duration
    return Plan(video, audio, duration, info.width, info.height, logs, feed=feed)


def _highlight(p: OverlayParams, info: MediaInfo, source: Any) -> Any:
    """``source`` with the effect and the stroke laid over it through the two masks ffmpeg reads from its stdin."""
    import ffmpeg

    mw, mh = _mask_size(info)
    masks = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="gray", s=f"{mw}x{2 * mh}", framerate=info.fps)
    m = masks.video.filter_multi_output("split", 2)
    effect_mask = m[0].crop(0, 0, mw, mh).filter("scale", info.width, info.height, flags="bilinear")
    stroke_mask = m[1].crop(0, mh, mw, mh).filter("scale", info.width, info.height, flags="bilinear")
    base = source.filter("setpts", "PTS-STARTPTS").filter_multi_output("split", 3)
    video = base[0]
    if p.effect != "original":
        if p.effect == "dark_overlay":
            layer = base[1].filter("lutyuv", y=f"val*{1 - p.dim:.4f}")
        else:
            layer = base[1].filter("eq", brightness=min(1.0, p.boost * 0.5), contrast=1.0 + p.boost * 0.2)
        layer = ffmpeg.filter([layer, effect_mask], "alphamerge")
        video = ffmpeg.filter([video, layer], "overlay", eof_action="pass", format="auto")
    else:
        base[1].filter("nullsink")
    color = base[2].drawbox(0, 0, "iw", "ih", color=p.stroke_color, thickness="fill")
    return ffmpeg.filter([video, ffmpeg.filter([color, stroke_mask], "alphamerge")], "overlay", eof_action="pass")


def _fade(t: float, start: float, end: float, fade_s: float) -> float:
    if t < start or t > end:
        return 0.0
    if fade_s <= 0:
        return 1.0
    return min(1.0, (t - start) / fade_s, (end - t) / fade_s)


def _mask_feed(p: OverlayParams, info: MediaInfo, window: Optional[Window], bounds: tuple[float, float], keyframes: list[EllipseKeyframe]) -> Callable[[Any], None]:
    """What writes the masks to ffmpeg's stdin: per frame of the source clock, the effect's mask above the stroke's."""
    import numpy as np

    mw, mh = _mask_size(info)
    scale = (mw / info.width, mh / info.height)
    times = [k.time for k in keyframes]
    values = [(k.x, k.y, k.radius_x, k.radius_y) for k in keyframes]
    offset = window.start if window else 0.0  # global time of the source clock's 0
    frames = int(round((window.end - window.start) * info.fps)) if window else info.frames
    total = frames + int(info.fps) + 1
    ys, xs = np.mgrid[0:mh, 0:mw].astype(np.float32)
    xs += 0.5
    ys += 0.5

    def feed(proc: Any) -> None:
        frame = np.zeros((2 * mh, mw), dtype=np.uint8)
        for n in range(total):
            t = offset + n / info.fps
            f = _fade(t, bounds[0], bounds[1], p.fade_s)
            frame[:] = 0
            if f > 0:
                _draw_masks(frame, p, (xs, ys), scale, interpolate(times, values, t, p.interpolation), f)
            proc.stdin.write(frame.tobytes())

    return feed


def _draw_masks(frame: Any, p: OverlayParams, grid: tuple[Any, Any], scale: tuple[float, float], ellipse: Any, f: float) -> None:
    """Draw the ellipse ``(cx, cy, rx, ry)`` at opacity ``f`` into ``frame``: the effect's mask on top, the stroke's below."""
    import numpy as np

    xs, ys = grid
    sx, sy = scale
    cx, cy, rx, ry = ellipse
    mh = frame.shape[0] // 2
    stroke = p.stroke_width * sx
    # normalised radius: 1.0 on the ellipse; the stroke is a band of the given width around it
    d = np.sqrt(((xs - cx * sx) / max(rx * sx, 1e-3)) ** 2 + ((ys - cy * sy) / max(ry * sy, 1e-3)) ** 2)
    inside = np.clip((1.0 - d) * min(rx * sx, ry * sy) + 0.5, 0.0, 1.0)  # 1 px soft edge
    region = inside if p.effect == "brightness_boost" else (1.0 - inside)
    if p.effect != "original":
        frame[:mh] = (region * (255 * f)).astype(np.uint8)
    if stroke > 0:
        band = np.abs(d - 1.0) * min(rx * sx, ry * sy)  # distance to the ellipse in mask pixels
        frame[mh:] = (np.clip(stroke / 2 - band + 0.5, 0.0, 1.0) * (255 * f)).astype(np.uint8)
