"""framing's filter graph: a keyframed crop, scaled to the output size, over the segments' timeline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from synapse_cli.jobs._media import MediaInfo
from synapse_cli.jobs.export._keyframes import interpolate
from synapse_cli.jobs.export.graph import Plan, Window, atempo_chain, open_source
from synapse_cli.jobs.export.params import CropKeyframe, FramingParams
from synapse_cli.jobs.export.windows import framing_pieces


def _concat_slices(video: Any, audio: Any | None, parts: list[Any], info: MediaInfo, first: int,
                   audio_pieces: list[tuple[float, float, float]]) -> tuple[Any, Any | None]:
    """Join the output timeline's slices (``_timeline.Slice``), each showing exactly the source frames
    ``_timeline`` chose for its output frames, and each output frame at ``slot / fps``.

    ``video`` starts at source frame ``first``. Per slice: its source frames are cut by frame number;
    each frame's timestamp becomes the first output slot that shows it, in a time base of ``1/fps``
    (integers, so nothing rounds); the ``fps`` filter then shows in each slot the latest frame not after
    it, which is the chosen one; the last frame is cloned to fill the slots after it, and the slice is
    cut to its frame count. The same slice gives the same frames whether the timeline is encoded whole
    or in shards. ``audio`` (the whole export's) is cut and re-timed from ``audio_pieces`` ``(start, end, speed)``.
    """
    import ffmpeg

    from synapse_cli.jobs.export._timeline import frame_rate

    if not parts:
        return video, audio
    rate = frame_rate(info.fps)
    last = max(0, info.frames - 1)
    vsplit = video.filter_multi_output("split", len(parts))
    asplit = audio.filter_multi_output("asplit", len(audio_pieces)) if audio is not None else None
    streams: list[Any] = []
    for i, sl in enumerate(parts):
        ja, jb = sl.sources(rate, last)
        v = (vsplit[i].trim(start_frame=ja - first, end_frame=jb - first)
             .filter("settb", f"{rate.denominator}/{rate.numerator}")
             .setpts(sl.pts_expr(rate, last))
             .filter("fps", fps=f"{rate.numerator}/{rate.denominator}")
             .filter("tpad", stop_mode="clone", stop=math.ceil(1 / sl.segment.speed) + 2)
             .trim(end_frame=sl.frames()))
        streams.append(v)
        if asplit is not None:
            start, end, speed = audio_pieces[i]
            streams.append(atempo_chain(asplit[i].filter("atrim", start=start, end=end).filter("asetpts", "PTS-STARTPTS"), speed))
    joined = ffmpeg.concat(*streams, n=len(parts), v=1, a=1 if asplit is not None else 0)
    if asplit is None:
        return joined, None
    node = joined.node
    return node[0], node[1]


def _clamp_window(x: float, y: float, w: float, h: float, info: MediaInfo) -> tuple[float, float, float, float]:
    w, h = min(w, info.width), min(h, info.height)
    return min(max(x, 0.0), info.width - w), min(max(y, 0.0), info.height - h), w, h


def plan_framing(p: FramingParams, info: MediaInfo, workdir: Path, window: Optional[Window] = None) -> Plan:
    logs: list[str] = []
    keyframes, windows = _crop_windows(p, info, logs)
    video, audio = open_source(info, window)
    if len(set(windows)) > 1:
        # The crop size changes over time: crop only evaluates w/h once, so we drive it
        # with per-frame commands (sendcmd), computed here with exact interpolation.
        video = video.filter("sendcmd", f=str(_crop_commands(p, info, keyframes, windows, window, workdir)))
    x, y, w, h = _ints(windows[0], info)
    video = video.crop(x, y, w, h).filter("scale", p.output_width, p.output_height, flags="bicubic").filter("setsar", 1)
    if p.rotate % 360:
        video = video.filter("rotate", f"{p.rotate}*PI/180", fillcolor="black")
    pieces = framing_pieces(p, info, logs)
    if p.segments:  # whole frames, chosen exactly (jobs.export._timeline): the same frames in any split
        from synapse_cli.jobs.export._timeline import frame_rate, segments, slices

        if window is not None:
            parts, first_frame = list(window.slices), window.first
        else:
            segs = segments(pieces, info.fps)
            parts, first_frame = slices(segs, 0, sum(s.frames for s in segs)), 0
        video, audio = _concat_slices(video, audio, parts, info, first_frame, [(s, e, v) for _, s, e, v in pieces] if window is None else [])
        duration = float(sum(sl.frames() for sl in parts) / frame_rate(info.fps))
    elif window is not None:
        duration = sum((e - s) / v for _, s, e, v in window.pieces)
    else:
        duration = info.duration
    return Plan(video, audio, duration, p.output_width, p.output_height, logs)


def _crop_windows(p: FramingParams, info: MediaInfo, logs: list[str]) -> tuple[list[CropKeyframe], list[tuple[float, float, float, float]]]:
    """The keyframes in time order and their crop windows clamped to the frame (a warning for each clamped
    or late one); without keyframes, one centred crop with the output's aspect."""
    keyframes = sorted(p.keyframes, key=lambda k: k.time)
    windows: list[tuple[float, float, float, float]] = []
    for i, k in enumerate(keyframes):
        clamped = _clamp_window(k.x, k.y, k.width, k.height, info)
        if clamped != (k.x, k.y, k.width, k.height):
            logs.append(
                f"keyframe {i} at {k.time:g}s clamped to the {info.width}x{info.height} frame: "
                f"{k.width:g}x{k.height:g}+{k.x:g}+{k.y:g} -> {clamped[2]:g}x{clamped[3]:g}+{clamped[0]:g}+{clamped[1]:g}"
            )
        if k.time > info.duration:
            logs.append(f"keyframe {i} at {k.time:g}s is after the end of the input ({info.duration:.2f}s)")
        windows.append(clamped)
    if not windows:  # a centred crop with the output's aspect
        aspect = p.output_width / p.output_height
        w, h = (info.height * aspect, float(info.height)) if info.width / info.height > aspect else (float(info.width), info.width / aspect)
        windows = [((info.width - w) / 2, (info.height - h) / 2, w, h)]
        keyframes = [CropKeyframe(time=0, x=windows[0][0], y=windows[0][1], width=w, height=h)]
    return keyframes, windows


def _crop_commands(p: FramingParams, info: MediaInfo, keyframes: list[CropKeyframe], windows: list[tuple[float, float, float, float]],
                   window: Optional[Window], workdir: Path) -> Path:
    """sendcmd's file: the interpolated crop window at each frame of the source clock, where it changes."""
    offset = window.start if window else 0.0  # global time of the source clock's 0
    times = [k.time for k in keyframes]
    lines, last = [], None
    frames = int(round((window.end - window.start) * info.fps)) if window else info.frames
    for n in range(frames + int(info.fps) + 1):
        t = n / info.fps
        x, y, w, h = _ints(tuple(interpolate(times, windows, offset + t, p.interpolation)), info)  # type: ignore[arg-type]
        if (x, y, w, h) != last:
            lines.append(f"{t:.6f} crop w {w}, crop h {h}, crop x {x}, crop y {y};")
            last = (x, y, w, h)
    cmds = workdir / "crop.cmd"
    cmds.write_text("\n".join(lines) + "\n")
    return cmds


def _ints(win: tuple[float, float, float, float], info: MediaInfo) -> tuple[int, int, int, int]:
    x, y, w, h = (int(round(v)) for v in win)
    return _int_window(x, y, w, h, info)


def _int_window(x: int, y: int, w: int, h: int, info: MediaInfo) -> tuple[int, int, int, int]:
    w, h = max(2, min(w, info.width)), max(2, min(h, info.height))
    return min(max(x, 0), info.width - w), min(max(y, 0), info.height - h), w, h
