"""Video export: framing (9:16 reels), overlay (a keyframed highlight ellipse) and annotate (rated clips).

Each job validates its params, probes the input, plans an ffmpeg filter graph
with ffmpeg-python, and runs ffmpeg through ``_media.run_ffmpeg`` so progress
streams as events. The output is written to a temporary sibling and renamed
into place only when ffmpeg succeeds.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synapse_cli.errors import UsageError
from synapse_cli.events import Artifact, Event, Finished, Log, Started
from synapse_cli.jobs._files import atomic_output, check_output
from synapse_cli.jobs.export._keyframes import interpolate
from synapse_cli.jobs._media import MediaInfo, find_ffmpeg, probe, run_ffmpeg

EXPORT_JOBS = ("framing", "overlay", "annotate")


@dataclass
class ExportSpec:
    """Everything an export needs, as plain data (it is pickled to Modal and sent as JSON over HTTP)."""

    input: str
    output: str
    job: str = "framing"
    params: dict[str, Any] = field(default_factory=dict)
    preset: str = "fast"
    crf: int = 23
    ffmpeg: Optional[str] = None  # configured binary; None = find one where the job runs
    overwrite: bool = False

    INPUTS: ClassVar[tuple[str, ...]] = ("input",)
    OUTPUTS: ClassVar[tuple[str, ...]] = ("output",)
    HOST_FIELDS: ClassVar[tuple[str, ...]] = ("ffmpeg",)


# -- params ----------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _interp(value: str) -> str:
    value = value.replace("_", "-").lower()
    if value not in ("linear", "catmull-rom"):
        raise ValueError("expected 'linear' or 'catmull-rom'")
    return value


class CropKeyframe(_Params):
    time: float = Field(ge=0)
    x: float
    y: float
    width: float = Field(gt=0)
    height: float = Field(gt=0)


class Segment(_Params):
    start: float = Field(ge=0)
    end: float = Field(gt=0)
    speed: float = Field(1.0, ge=0.1, le=10)

    @model_validator(mode="after")
    def _ordered(self) -> "Segment":
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class FramingParams(_Params):
    keyframes: list[CropKeyframe] = []
    interpolation: str = "linear"
    rotate: float = 0.0
    output_width: int = Field(810, ge=16, le=7680)
    output_height: int = Field(1440, ge=16, le=7680)
    segments: list[Segment] = []

    _interpolation = field_validator("interpolation")(_interp)

    @field_validator("output_width", "output_height")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (H.264 with 4:2:0 chroma)")
        return v


class EllipseKeyframe(_Params):
    time: float = Field(ge=0)
    x: float
    y: float
    radius_x: float = Field(gt=0)
    radius_y: float = Field(gt=0)


_COLOR = r"^(#?[0-9a-fA-F]{6}|[A-Za-z]+)(@(0(\.\d+)?|1(\.0+)?))?$"


class OverlayParams(_Params):
    keyframes: list[EllipseKeyframe] = Field(min_length=1)
    effect: Literal["dark_overlay", "brightness_boost", "original"] = "dark_overlay"
    interpolation: str = "linear"
    start: Optional[float] = Field(None, ge=0)
    end: Optional[float] = Field(None, gt=0)
    fade_s: float = Field(0.25, ge=0, le=5)
    dim: float = Field(0.6, ge=0, le=1)
    boost: float = Field(0.35, ge=0, le=2)
    stroke_color: str = Field("white", pattern=_COLOR)
    stroke_width: float = Field(4.0, ge=0, le=100)
    text: Optional[str] = Field(None, max_length=500)

    _interpolation = field_validator("interpolation")(_interp)


RATING_COLORS = {"!!": "0x1baca6", "!": "0x5c8bb0", "!?": "0xe6c229", "?": "0xe58f2a", "??": "0xca3431"}


class Clip(_Params):
    start: float = Field(ge=0)
    end: float = Field(gt=0)
    title: str = Field("", max_length=200)
    notes: str = Field("", max_length=1000)
    rating: Optional[Literal["!!", "!", "!?", "?", "??"]] = None

    @model_validator(mode="after")
    def _ordered(self) -> "Clip":
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class AnnotateParams(_Params):
    clips: list[Clip] = Field(min_length=1)
    border: int = Field(12, ge=0, le=200)


PARAMS: dict[str, type[_Params]] = {"framing": FramingParams, "overlay": OverlayParams, "annotate": AnnotateParams}


def validate_params(job: str, params: dict[str, Any]) -> Any:
    """Typed params for ``job``, or a one-line UsageError naming the bad field."""
    if job not in PARAMS:
        raise UsageError(f"unknown export job {job!r}; expected one of {', '.join(EXPORT_JOBS)}")
    try:
        return PARAMS[job].model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "params" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        value = f" (got {err['input']!r:.60})" if err.get("type") not in ("missing",) and "input" in err else ""
        raise UsageError(f"{job}: {where}: {err['msg']}{value}") from None


# -- plans: the filter graph for each job -----------------------------------------


@dataclass
class Plan:
    video: Any  # ffmpeg-python stream
    audio: Any | None
    duration: float  # output seconds
    width: int
    height: int
    logs: list[str] = field(default_factory=list)
    feed: Optional[Callable[[Any], None]] = None  # writes a second input (masks) to ffmpeg's stdin
    output_args: dict[str, Any] = field(default_factory=dict)


def _write_text(workdir: Path, name: str, text: str) -> str:
    """drawtext reads text from a file (with expansion off): no quoting of user text to get wrong."""
    path = workdir / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _atempo_chain(stream: Any, speed: float) -> Any:
    # atempo takes 0.5..2.0 per instance in older ffmpeg builds: chain factors to reach any speed
    while speed > 2.0:
        stream, speed = stream.filter("atempo", 2.0), speed / 2.0
    while speed < 0.5:
        stream, speed = stream.filter("atempo", 0.5), speed / 0.5
    return stream.filter("atempo", round(speed, 6)) if abs(speed - 1.0) > 1e-9 else stream


def _concat_segments(video: Any, audio: Any | None, segments: list[tuple[float, float, float]]) -> tuple[Any, Any | None]:
    """Cut (start, end, speed) segments from the source timeline and join them in order."""
    import ffmpeg

    if not segments:
        return video, audio
    vsplit = video.filter_multi_output("split", len(segments))
    asplit = audio.filter_multi_output("asplit", len(segments)) if audio is not None else None
    parts: list[Any] = []
    for i, (start, end, speed) in enumerate(segments):
        v = vsplit[i].trim(start=start, end=end).setpts(f"(PTS-STARTPTS)/{speed}")
        parts.append(v)
        if asplit is not None:
            a = asplit[i].filter("atrim", start=start, end=end).filter("asetpts", "PTS-STARTPTS")
            parts.append(_atempo_chain(a, speed))
    joined = ffmpeg.concat(*parts, n=len(segments), v=1, a=1 if audio is not None else 0)
    if audio is None:
        return joined, None
    node = joined.node
    return node[0], node[1]


def _clamp_window(x: float, y: float, w: float, h: float, info: MediaInfo) -> tuple[float, float, float, float]:
    w, h = min(w, info.width), min(h, info.height)
    return min(max(x, 0.0), info.width - w), min(max(y, 0.0), info.height - h), w, h


def _plan_framing(p: FramingParams, info: MediaInfo, workdir: Path) -> Plan:
    import ffmpeg

    src = ffmpeg.input(info.path)
    logs: list[str] = []
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

    def ints(win: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
        x, y, w, h = (int(round(v)) for v in win)
        return _int_window(x, y, w, h, info)

    video = src.video
    first = ints(windows[0])
    if len(set(windows)) > 1:
        # The crop size changes over time: crop only evaluates w/h once, so we drive it
        # with per-frame commands (sendcmd), computed here with exact interpolation.
        times = [k.time for k in keyframes]
        lines, last = [], None
        for n in range(info.frames + int(info.fps) + 1):
            t = n / info.fps
            x, y, w, h = ints(tuple(interpolate(times, windows, t, p.interpolation)))  # type: ignore[arg-type]
            if (x, y, w, h) != last:
                lines.append(f"{t:.6f} crop w {w}, crop h {h}, crop x {x}, crop y {y};")
                last = (x, y, w, h)
        cmds = workdir / "crop.cmd"
        cmds.write_text("\n".join(lines) + "\n")
        video = video.filter("sendcmd", f=str(cmds))
    x, y, w, h = first
    video = video.crop(x, y, w, h).filter("scale", p.output_width, p.output_height, flags="bicubic").filter("setsar", 1)
    if p.rotate % 360:
        video = video.filter("rotate", f"{p.rotate}*PI/180", fillcolor="black")
    audio = src.audio if info.has_audio else None
    segments = []
    for i, s in enumerate(p.segments):
        end = min(s.end, info.duration)
        if s.start >= info.duration:
            raise UsageError(f"framing: params.segments[{i}] starts at {s.start:g}s, after the end of the input ({info.duration:.2f}s)")
        if end < s.end:
            logs.append(f"segment {i} end {s.end:g}s clamped to the input's end ({info.duration:.2f}s)")
        segments.append((s.start, end, s.speed))
    video, audio = _concat_segments(video, audio, segments)
    duration = sum((e - s) / v for s, e, v in segments) if segments else info.duration
    output_args = {"r": info.fps} if segments else {}
    return Plan(video, audio, duration, p.output_width, p.output_height, logs, output_args=output_args)


def _int_window(x: int, y: int, w: int, h: int, info: MediaInfo) -> tuple[int, int, int, int]:
    w, h = max(2, min(w, info.width)), max(2, min(h, info.height))
    return min(max(x, 0), info.width - w), min(max(y, 0), info.height - h), w, h


def _mask_size(info: MediaInfo) -> tuple[int, int]:
    """Masks are drawn at up to 640 px wide and scaled up by ffmpeg (which also smooths the edge)."""
    scale = min(1.0, 640 / info.width)
    return max(2, int(info.width * scale) // 2 * 2), max(2, int(info.height * scale) // 2 * 2)


def _plan_overlay(p: OverlayParams, info: MediaInfo, workdir: Path) -> Plan:
    import ffmpeg
    import numpy as np

    start = p.start if p.start is not None else 0.0
    end = min(p.end if p.end is not None else info.duration, info.duration)
    if end <= start:
        raise UsageError(f"overlay: the highlight window {start:g}s..{end:g}s is empty for a {info.duration:.2f}s input")
    keyframes = sorted(p.keyframes, key=lambda k: k.time)
    times = [k.time for k in keyframes]
    values = [(k.x, k.y, k.radius_x, k.radius_y) for k in keyframes]
    logs = [
        f"ellipse keyframe {i} at {k.time:g}s has its centre outside the {info.width}x{info.height} frame"
        for i, k in enumerate(keyframes)
        if not (0 <= k.x <= info.width and 0 <= k.y <= info.height)
    ]
    mw, mh = _mask_size(info)
    sx, sy = mw / info.width, mh / info.height
    total = info.frames + int(info.fps) + 1
    ys, xs = np.mgrid[0:mh, 0:mw].astype(np.float32)
    xs += 0.5
    ys += 0.5
    stroke = p.stroke_width * sx

    def fade(t: float) -> float:
        if t < start or t > end:
            return 0.0
        if p.fade_s <= 0:
            return 1.0
        return min(1.0, (t - start) / p.fade_s, (end - t) / p.fade_s)

    def feed(proc: Any) -> None:
        frame = np.zeros((2 * mh, mw), dtype=np.uint8)
        for n in range(total):
            t = n / info.fps
            f = fade(t)
            frame[:] = 0
            if f > 0:
                cx, cy, rx, ry = interpolate(times, values, t, p.interpolation)
                # normalised radius: 1.0 on the ellipse; the stroke is a band of the given width around it
                d = np.sqrt(((xs - cx * sx) / max(rx * sx, 1e-3)) ** 2 + ((ys - cy * sy) / max(ry * sy, 1e-3)) ** 2)
                inside = np.clip((1.0 - d) * min(rx * sx, ry * sy) + 0.5, 0.0, 1.0)  # 1 px soft edge
                region = inside if p.effect == "brightness_boost" else (1.0 - inside)
                if p.effect != "original":
                    frame[:mh] = (region * (255 * f)).astype(np.uint8)
                if stroke > 0:
                    band = np.abs(d - 1.0) * min(rx * sx, ry * sy)  # distance to the ellipse in mask pixels
                    frame[mh:] = (np.clip(stroke / 2 - band + 0.5, 0.0, 1.0) * (255 * f)).astype(np.uint8)
            proc.stdin.write(frame.tobytes())

    src = ffmpeg.input(info.path)
    masks = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="gray", s=f"{mw}x{2 * mh}", framerate=info.fps)
    m = masks.video.filter_multi_output("split", 2)
    effect_mask = m[0].crop(0, 0, mw, mh).filter("scale", info.width, info.height, flags="bilinear")
    stroke_mask = m[1].crop(0, mh, mw, mh).filter("scale", info.width, info.height, flags="bilinear")
    base = src.video.filter("setpts", "PTS-STARTPTS").filter_multi_output("split", 3)
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
    video = ffmpeg.filter([video, ffmpeg.filter([color, stroke_mask], "alphamerge")], "overlay", eof_action="pass")
    if p.text:
        video = video.drawtext(
            textfile=_write_text(workdir, "overlay.txt", p.text),
            fontcolor="white",
            fontsize="h/18",
            x="(w-tw)/2",
            y="h*0.06",
            box=1,
            boxcolor="black@0.5",
            boxborderw=12,
            expansion="none",
            enable=f"between(t,{start:.3f},{end:.3f})",
        )
    video = video.filter("format", "yuv420p")
    audio = src.audio if info.has_audio else None
    return Plan(video, audio, info.duration, info.width, info.height, logs, feed=feed)


def _plan_annotate(p: AnnotateParams, info: MediaInfo, workdir: Path) -> Plan:
    import ffmpeg

    logs: list[str] = []
    clips = []
    for i, c in enumerate(p.clips):
        if c.start >= info.duration:
            raise UsageError(f"annotate: params.clips[{i}] starts at {c.start:g}s, after the end of the input ({info.duration:.2f}s)")
        end = min(c.end, info.duration)
        if end < c.end:
            logs.append(f"clip {i} end {c.end:g}s clamped to the input's end ({info.duration:.2f}s)")
        clips.append((c, end))
    src = ffmpeg.input(info.path)
    has_audio = info.has_audio
    vsplit = src.video.filter_multi_output("split", len(clips))
    asplit = src.audio.filter_multi_output("asplit", len(clips)) if has_audio else None
    parts: list[Any] = []
    for i, (c, end) in enumerate(clips):
        v = vsplit[i].trim(start=c.start, end=end).setpts("PTS-STARTPTS")
        color = RATING_COLORS.get(c.rating or "", "0x808080")
        if p.border:
            v = v.drawbox(0, 0, "iw", "ih", color=color, thickness=p.border)
        common = dict(fontcolor="white", box=1, boxcolor="black@0.55", boxborderw=10, expansion="none")
        if c.title or c.rating:
            title = f"{c.rating}  {c.title}".strip() if c.rating else c.title
            v = v.drawtext(textfile=_write_text(workdir, f"title{i}.txt", title), fontsize="h/16", x=f"{p.border}+24", y=f"{p.border}+24", **common)
        if c.notes:
            v = v.drawtext(textfile=_write_text(workdir, f"notes{i}.txt", c.notes), fontsize="h/28", x=f"{p.border}+24", y=f"h-th-{p.border}-30", **common)
        parts.append(v)
        if asplit is not None:
            parts.append(asplit[i].filter("atrim", start=c.start, end=end).filter("asetpts", "PTS-STARTPTS"))
    joined = ffmpeg.concat(*parts, n=len(clips), v=1, a=1 if has_audio else 0)
    video, audio = (joined.node[0], joined.node[1]) if has_audio else (joined, None)
    duration = sum(end - c.start for c, end in clips)
    return Plan(video, audio, duration, info.width, info.height, logs)


def _even_size(plan: Plan) -> Plan:
    """H.264 in 4:2:0 needs even sizes: pad an odd frame by one black row/column at the right/bottom
    (as infer's annotated video does), so displayed coordinates stay where they were."""
    if not (plan.width % 2 or plan.height % 2):
        return plan
    w, h = plan.width + plan.width % 2, plan.height + plan.height % 2
    plan.logs.append(f"the {plan.width}x{plan.height} frame is padded to {w}x{h} (H.264 4:2:0 needs even sizes)")
    plan.video = plan.video.filter("pad", w, h, 0, 0, color="black")
    plan.width, plan.height = w, h
    return plan


PLANNERS: dict[str, Callable[[Any, MediaInfo, Path], Plan]] = {
    "framing": _plan_framing,
    "overlay": _plan_overlay,
    "annotate": _plan_annotate,
}


# -- the job ---------------------------------------------------------------------


def export_video(spec: ExportSpec) -> Iterator[Event]:
    """Export ``spec.input`` with one of the export jobs; yields progress in output frames."""
    started = time.monotonic()
    params = validate_params(spec.job, spec.params)
    info = probe(spec.input)
    out = Path(spec.output)
    check_output(out, spec.overwrite)
    exe = find_ffmpeg(spec.ffmpeg)
    import ffmpeg

    with tempfile.TemporaryDirectory(prefix="synapse-export-") as tmpdir:
        plan = _even_size(PLANNERS[spec.job](params, info, Path(tmpdir)))
        total = max(1, int(round(plan.duration * info.fps)))
        yield Started(job="export", total=total)
        for message in plan.logs:
            yield Log(message, level="warning")
        with atomic_output(out, spec.overwrite) as tmp:
            streams = [plan.video] + ([plan.audio] if plan.audio is not None else [])
            encode: dict[str, Any] = {
                "vcodec": "libx264",
                "preset": spec.preset,
                "crf": spec.crf,
                "pix_fmt": "yuv420p",
                "movflags": "+faststart",
                **plan.output_args,
            }
            if plan.audio is not None:
                encode.update(acodec="aac", audio_bitrate="160k")
            args = ffmpeg.output(*streams, str(tmp), **encode).compile(cmd=exe, overwrite_output=True)
            yield from run_ffmpeg(args, total, info.fps, phase="encode", feed=plan.feed)
    size = out.stat().st_size
    yield Artifact(path=str(out), bytes=size)
    result = {
        "job": spec.job,
        "input": spec.input,
        "output": str(out),
        "bytes": size,
        "width": plan.width,
        "height": plan.height,
        "duration_s": round(plan.duration, 3),
        "frames": total,
        "audio": plan.audio is not None,
    }
    yield Finished(result=result, elapsed_s=round(time.monotonic() - started, 3))
