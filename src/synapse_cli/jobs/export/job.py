"""Video export: framing (9:16 reels), overlay (a keyframed highlight ellipse) and annotate (rated clips).

Each job validates its params, probes the input, plans an ffmpeg filter graph
with ffmpeg-python, and runs ffmpeg through ``_media.run_ffmpeg`` so progress
streams as events. The output is written to a temporary sibling and renamed
into place only when ffmpeg succeeds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterator, Literal, Optional, Union


from synapse_cli.errors import UsageError
from synapse_cli.events import Artifact, Event, Finished, Log, Started
from synapse_cli.jobs._files import atomic_output, check_output
from synapse_cli.jobs.export._keyframes import interpolate
from synapse_cli.jobs._media import MediaInfo, concat_list, find_ffmpeg, probe, run_ffmpeg, url_options

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
    threads: int = 0  # threads per decoder, filter graph and x264; 0: ffmpeg's choice (all cores)
    # A shard: encode only output seconds [start, end), video only (see split_export / merge_export)
    part: Optional[list[float]] = None

    INPUTS: ClassVar[tuple[str, ...]] = ("input",)
    OUTPUTS: ClassVar[tuple[str, ...]] = ("output",)
    STREAMED: ClassVar[tuple[str, ...]] = ("input",)  # at a URL: range-read by ffmpeg, never fetched whole
    HOST_FIELDS: ClassVar[tuple[str, ...]] = ("ffmpeg",)


# -- params ----------------------------------------------------------------------
#
# Each job's params are a plain dataclass. A field's constraints are a _Bound (pydantic's
# own names: ge, gt, le, min_length, max_length, pattern), its own rule a _Check, and a
# class's rule its ``check`` method. That one declaration has two readers:
# - _read, in pure Python, for params a command line or a JSON file plainly gets right (JSON
#   numbers, strings, lists and objects with known keys, within bounds). Importing pydantic
#   would be most of a short export's start-up.
# - pydantic, for everything else (_model builds its models from the same declaration, once
#   needed): it words the error, naming the field, or applies its lax coercions ("810" for
#   810), and _read then builds the dataclass from what it returns.


class _Bound:
    """Constraints of one field, as pydantic-core's schema keys: pydantic checks and words them itself."""

    def __init__(self, **constraints: Any) -> None:
        self.constraints = constraints

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return {**handler(source), **self.constraints}

    KNOWN = frozenset({"ge", "gt", "le", "lt", "min_length", "max_length", "pattern"})  # what admits() can check

    def admits(self, value: Any) -> bool:
        """Does ``value`` meet every constraint? False for a constraint this reader does not know: pydantic then decides."""
        c = self.constraints
        if not c.keys() <= self.KNOWN:
            return False
        if "ge" in c and not value >= c["ge"] or "gt" in c and not value > c["gt"] or "le" in c and not value <= c["le"] or "lt" in c and not value < c["lt"]:
            return False
        if "min_length" in c and len(value) < c["min_length"] or "max_length" in c and len(value) > c["max_length"]:
            return False
        # pydantic matches a pattern anywhere (anchor it); Python's $ would also match before a last newline
        return "pattern" not in c or ("\n" not in value and re.search(c["pattern"], value) is not None)


class _Check:
    """A field's own rule: ``func(value)`` returns the value to keep, or raises ValueError."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.func, handler(source))


def _interp(value: str) -> str:
    value = value.replace("_", "-").lower()
    if value not in ("linear", "catmull-rom"):
        raise ValueError("expected 'linear' or 'catmull-rom'")
    return value


def _even(v: int) -> int:
    if v % 2:
        raise ValueError("must be even (H.264 with 4:2:0 chroma)")
    return v


Interpolation = Annotated[str, _Check(_interp)]
OutputSide = Annotated[int, _Bound(ge=16, le=7680), _Check(_even)]


@dataclass
class CropKeyframe:
    time: Annotated[float, _Bound(ge=0)]
    x: float
    y: float
    width: Annotated[float, _Bound(gt=0)]
    height: Annotated[float, _Bound(gt=0)]


@dataclass
class Segment:
    start: Annotated[float, _Bound(ge=0)]
    end: Annotated[float, _Bound(gt=0)]
    speed: Annotated[float, _Bound(ge=0.1, le=10)] = 1.0

    def check(self) -> None:
        if self.end <= self.start:
            raise ValueError("end must be after start")


@dataclass
class FramingParams:
    keyframes: list[CropKeyframe] = field(default_factory=list)
    interpolation: Interpolation = "linear"
    rotate: float = 0.0
    output_width: OutputSide = 810
    output_height: OutputSide = 1440
    segments: list[Segment] = field(default_factory=list)


@dataclass
class EllipseKeyframe:
    time: Annotated[float, _Bound(ge=0)]
    x: float
    y: float
    radius_x: Annotated[float, _Bound(gt=0)]
    radius_y: Annotated[float, _Bound(gt=0)]


_COLOR = r"^(#?[0-9a-fA-F]{6}|[A-Za-z]+)(@(0(\.\d+)?|1(\.0+)?))?$"


@dataclass
class OverlayParams:
    keyframes: Annotated[list[EllipseKeyframe], _Bound(min_length=1)]
    effect: Literal["dark_overlay", "brightness_boost", "original"] = "dark_overlay"
    interpolation: Interpolation = "linear"
    start: Optional[Annotated[float, _Bound(ge=0)]] = None
    end: Optional[Annotated[float, _Bound(gt=0)]] = None
    fade_s: Annotated[float, _Bound(ge=0, le=5)] = 0.25
    dim: Annotated[float, _Bound(ge=0, le=1)] = 0.6
    boost: Annotated[float, _Bound(ge=0, le=2)] = 0.35
    stroke_color: Annotated[str, _Bound(pattern=_COLOR)] = "white"
    stroke_width: Annotated[float, _Bound(ge=0, le=100)] = 4.0
    text: Optional[Annotated[str, _Bound(max_length=500)]] = None


RATING_COLORS = {"!!": "0x1baca6", "!": "0x5c8bb0", "!?": "0xe6c229", "?": "0xe58f2a", "??": "0xca3431"}


@dataclass
class Clip:
    start: Annotated[float, _Bound(ge=0)]
    end: Annotated[float, _Bound(gt=0)]
    title: Annotated[str, _Bound(max_length=200)] = ""
    notes: Annotated[str, _Bound(max_length=1000)] = ""
    rating: Optional[Literal["!!", "!", "!?", "?", "??"]] = None

    def check(self) -> None:
        if self.end <= self.start:
            raise ValueError("end must be after start")


@dataclass
class AnnotateParams:
    clips: Annotated[list[Clip], _Bound(min_length=1)]
    border: Annotated[int, _Bound(ge=0, le=200)] = 12


PARAMS: dict[str, type] = {"framing": FramingParams, "overlay": OverlayParams, "annotate": AnnotateParams}


class _Doubt(Exception):
    """_read cannot vouch for a value: pydantic decides."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _read(tp: Any, value: Any, check: bool = True) -> Any:
    """``value`` as ``tp``: with ``check``, only a plainly valid value (else _Doubt); without, one pydantic has validated."""
    meta: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        tp, *rest = typing.get_args(tp)
        meta = tuple(rest)
    origin = typing.get_origin(tp)
    if origin is Union:
        if value is None:
            return None
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return _read(tp, value, check)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        out = _read_object(tp, value, check)
    elif origin is list:
        if check and type(value) is not list:
            raise _Doubt
        (item,) = typing.get_args(tp)
        out = [_read(item, v, check) for v in value]
    elif not check:
        return value
    elif origin is Literal:
        if type(value) is not str or value not in typing.get_args(tp):
            raise _Doubt
        out = value
    elif tp is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _Doubt
        out = float(value)
    elif tp in (int, str):
        if type(value) is not tp:
            raise _Doubt
        out = value
    else:
        raise _Doubt
    for m in meta if check else ():
        if isinstance(m, _Check):
            try:
                out = m.func(out)
            except ValueError:
                raise _Doubt from None
        elif not (isinstance(m, _Bound) and m.admits(out)):
            raise _Doubt
    return out


def _read_object(cls: type, value: Any, check: bool) -> Any:
    if check and (type(value) is not dict or not set(value) <= set(_hints(cls))):
        raise _Doubt
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = _read(hints[f.name], value[f.name], check)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Doubt
    obj = cls(**kwargs)
    if check and hasattr(obj, "check"):
        try:
            obj.check()
        except ValueError:
            raise _Doubt from None
    return obj


@functools.lru_cache(maxsize=None)
def _model(cls: type) -> Any:
    """The pydantic model of a params dataclass (extra keys forbidden), for the params _read cannot vouch for."""
    from pydantic import ConfigDict, create_model, model_validator

    def swap(tp: Any) -> Any:  # nested dataclasses become their models
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return _model(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            return Annotated[(swap(args[0]), *tp.__metadata__)]  # type: ignore[valid-type]  # built at run time
        if origin is list:
            return list[swap(args[0])]  # type: ignore[misc]  # built at run time
        if origin is Union:
            return Union[tuple(swap(a) for a in args)]
        return tp

    fields_ = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else ...)
        fields_[f.name] = (swap(_hints(cls)[f.name]), default)
    validators = {}
    if hasattr(cls, "check"):

        def after(self: Any) -> Any:
            cls.check(self)
            return self

        validators["check_"] = model_validator(mode="after")(after)
    return create_model(cls.__name__, __config__=ConfigDict(extra="forbid"), __validators__=validators, **fields_)  # type: ignore[call-overload]  # fields built at run time


def validate_params(job: str, params: dict[str, Any]) -> Any:
    """Typed params for ``job``, or a one-line UsageError naming the bad field."""
    if job not in PARAMS:
        raise UsageError(f"unknown export job {job!r}; expected one of {', '.join(EXPORT_JOBS)}")
    try:
        return _read(PARAMS[job], params)
    except _Doubt:
        return _validate_with_pydantic(job, params)


def _validate_with_pydantic(job: str, params: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        model = _model(PARAMS[job]).model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "params" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        value = f" (got {err['input']!r:.60})" if err.get("type") not in ("missing",) and "input" in err else ""
        raise UsageError(f"{job}: {where}: {err['msg']}{value}") from None
    return _read(PARAMS[job], model.model_dump(), check=False)


# -- plans: the filter graph for each job -----------------------------------------


@dataclass(frozen=True)
class Window:
    """What a shard reads: source seconds ``[start, end)``, and its pieces of the output timeline.

    ``pieces`` are ``(index, start, end, speed)`` on the window's own clock (source time
    minus ``start``): the segments or clips (``index`` into the params) a shard encodes,
    cut at the shard's boundaries. Frames keep their place on the global timeline, so
    keyframes, fades and interpolation are evaluated at global time (``start + t``).
    """

    start: float
    end: float
    pieces: tuple[tuple[int, float, float, float], ...]
    # framing with segments: the window is source frames [first, ...) and the shard encodes these
    # slices of the output timeline, chosen in whole frames (jobs.export._timeline)
    first: int = 0
    slices: tuple[Any, ...] = ()


def _open_source(info: MediaInfo, window: Optional[Window]) -> tuple[Any, Any | None]:
    """(video, audio) of the input; for a shard, only its window's frames, on a clock starting at 0, and no audio."""
    import math

    import ffmpeg

    if window is None:
        src = ffmpeg.input(info.path, **url_options(info.path))
        return src.video, (src.audio if info.has_audio else None)
    # A fast input seek to a second before the window (ffmpeg decodes from the keyframe before it),
    # then an exact cut half a frame before each boundary, so every frame lands in exactly one shard.
    seek = max(0.0, math.floor((window.start - 1.0) * 1000) / 1000)
    # ... and stop reading a second after it: the demuxer need not run on to the end of the input
    # (a shard of an s3:// or https:// input then fetches its own window, not the rest of the file)
    limit = {"t": f"{window.end - seek + 1.0:.3f}"}
    src = ffmpeg.input(info.path, **url_options(info.path), **({"ss": f"{seek:.3f}"} if seek > 0 else {}), **limit)
    half = 0.5 / info.fps
    video = src.video.trim(start=max(0.0, window.start - half - seek), end=window.end - half - seek).setpts("PTS-STARTPTS")
    return video, None


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
    import math

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
            streams.append(_atempo_chain(asplit[i].filter("atrim", start=start, end=end).filter("asetpts", "PTS-STARTPTS"), speed))
    joined = ffmpeg.concat(*streams, n=len(parts), v=1, a=1 if asplit is not None else 0)
    if asplit is None:
        return joined, None
    node = joined.node
    return node[0], node[1]


def _clamp_window(x: float, y: float, w: float, h: float, info: MediaInfo) -> tuple[float, float, float, float]:
    w, h = min(w, info.width), min(h, info.height)
    return min(max(x, 0.0), info.width - w), min(max(y, 0.0), info.height - h), w, h


def _plan_framing(p: FramingParams, info: MediaInfo, workdir: Path, window: Optional[Window] = None) -> Plan:
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

    video, audio = _open_source(info, window)
    offset = window.start if window else 0.0  # global time of the source clock's 0
    first = ints(windows[0])
    if len(set(windows)) > 1:
        # The crop size changes over time: crop only evaluates w/h once, so we drive it
        # with per-frame commands (sendcmd), computed here with exact interpolation.
        times = [k.time for k in keyframes]
        lines, last = [], None
        frames = int(round((window.end - window.start) * info.fps)) if window else info.frames
        for n in range(frames + int(info.fps) + 1):
            t = n / info.fps
            x, y, w, h = ints(tuple(interpolate(times, windows, offset + t, p.interpolation)))  # type: ignore[arg-type]
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
    pieces = _framing_pieces(p, info, logs)
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


def _framing_pieces(p: FramingParams, info: MediaInfo, logs: list[str] | None = None) -> list[tuple[int, float, float, float]]:
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


def _int_window(x: int, y: int, w: int, h: int, info: MediaInfo) -> tuple[int, int, int, int]:
    w, h = max(2, min(w, info.width)), max(2, min(h, info.height))
    return min(max(x, 0), info.width - w), min(max(y, 0), info.height - h), w, h


def _mask_size(info: MediaInfo) -> tuple[int, int]:
    """Masks are drawn at up to 640 px wide and scaled up by ffmpeg (which also smooths the edge)."""
    scale = min(1.0, 640 / info.width)
    return max(2, int(info.width * scale) // 2 * 2), max(2, int(info.height * scale) // 2 * 2)


def _plan_overlay(p: OverlayParams, info: MediaInfo, workdir: Path, window: Optional[Window] = None) -> Plan:
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
    offset = window.start if window else 0.0  # global time of the source clock's 0
    frames = int(round((window.end - window.start) * info.fps)) if window else info.frames
    total = frames + int(info.fps) + 1
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
            t = offset + n / info.fps
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

    source, audio = _open_source(info, window)
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
            # a frame exactly on a bound is in (between() is inclusive), whatever the rounding of a shard's clock
            enable=f"between(t,{start - offset - 1e-4:.6f},{end - offset + 1e-4:.6f})",
        )
    video = video.filter("format", "yuv420p")
    duration = window.end - window.start if window else info.duration
    return Plan(video, audio, duration, info.width, info.height, logs, feed=feed)


def _annotate_pieces(p: AnnotateParams, info: MediaInfo, logs: list[str] | None = None) -> list[tuple[int, float, float, float]]:
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


def _plan_annotate(p: AnnotateParams, info: MediaInfo, workdir: Path, window: Optional[Window] = None) -> Plan:
    import ffmpeg

    logs: list[str] = []
    pieces = _annotate_pieces(p, info, logs)
    if window is not None:
        pieces = list(window.pieces)
    clips = [(p.clips[i], start, end) for i, start, end, _ in pieces]
    source, source_audio = _open_source(info, window)
    has_audio = source_audio is not None
    vsplit = source.filter_multi_output("split", len(clips))
    asplit = source_audio.filter_multi_output("asplit", len(clips)) if source_audio is not None else None
    parts: list[Any] = []
    for i, (c, start, end) in enumerate(clips):
        v = vsplit[i].trim(start=start, end=end).setpts("PTS-STARTPTS")
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
            parts.append(asplit[i].filter("atrim", start=start, end=end).filter("asetpts", "PTS-STARTPTS"))
    joined = ffmpeg.concat(*parts, n=len(clips), v=1, a=1 if has_audio else 0)
    video, audio = (joined.node[0], joined.node[1]) if has_audio else (joined, None)
    duration = sum(end - start for _, start, end in clips)
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


PLANNERS: dict[str, Callable[..., Plan]] = {
    "framing": _plan_framing,
    "overlay": _plan_overlay,
    "annotate": _plan_annotate,
}


# -- the output timeline, and its shards ---------------------------------------------


def _output_pieces(job: str, params: Any, info: MediaInfo, logs: list[str] | None = None) -> list[tuple[int, float, float, float]]:
    """The output timeline as source pieces ``(index, start, end, speed)``, in output order."""
    if job == "framing":
        return _framing_pieces(params, info, logs)
    if job == "annotate":
        return _annotate_pieces(params, info, logs)
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


def split_export(spec: ExportSpec, n: int, workdir: Path, settings: Any = None) -> list[ExportSpec]:
    """``n`` shard specs over contiguous ranges of the output timeline, each writing a video-only piece in ``workdir``.

    framing and overlay cut at output frame boundaries; annotate cuts only between clips
    (one shard per clip, or per group of consecutive clips). Fewer than ``n`` come back
    when the output has fewer frames (or clips) than that.
    """
    from dataclasses import replace

    params = validate_params(spec.job, spec.params)
    info = probe(spec.input)
    pieces = _output_pieces(spec.job, params, info)
    lengths = [(e - s) / v for _, s, e, v in pieces]
    total = sum(lengths)
    if spec.job == "annotate":
        ends, at = [], 0.0
        for length in lengths:
            at += length
            ends.append(at)
        # balance by duration: cut after the clip whose end is nearest each ideal boundary
        cuts = sorted({min(range(len(ends) - 1), key=lambda j: abs(ends[j] - total * k / n)) for k in range(1, n)}) if len(ends) > 1 else []
        bounds = [0.0] + [ends[j] for j in cuts] + [total]
    elif spec.job == "framing" and params.segments:  # whole output frames, exactly (jobs.export._timeline)
        from synapse_cli.jobs.export._timeline import frame_rate, segments, split_marks

        rate = frame_rate(info.fps)
        bounds = [float(m / rate) for m in split_marks(sum(s.frames for s in segments(pieces, info.fps)), n)]
    else:
        frames = max(1, int(round(total * info.fps)))
        marks = sorted({int(round(frames * k / n)) for k in range(0, n + 1)})
        bounds = [m / info.fps for m in marks]
        bounds[-1] = total
    bounds = [b for i, b in enumerate(bounds) if i == 0 or b - bounds[i - 1] > 1e-9]
    return [
        replace(spec, part=[a, b], output=str(workdir / f"part{i:03d}.mp4"), overwrite=True)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def export_seconds(spec: ExportSpec) -> float:
    """The output's length in seconds: what ``--shards auto`` divides."""
    params = validate_params(spec.job, spec.params)
    info = probe(spec.input)
    return sum((e - s) / v for _, s, e, v in _output_pieces(spec.job, params, info))


def _keeps_timeline(job: str, params: Any) -> bool:
    """Whether the job's output timeline is the input's, as it is: its planner passes the audio through."""
    return job == "overlay" or (job == "framing" and not params.segments)


def _audio_graph(pieces: list[tuple[int, float, float, float]], info: MediaInfo, whole: bool) -> Any:
    """The output's audio alone: the pieces cut, re-timed and joined exactly as the whole export does
    (``whole``: the input's audio as it is, as the planners of jobs that keep the timeline take it)."""
    import ffmpeg

    src = ffmpeg.input(info.path, **url_options(info.path))
    if whole:
        return src.audio
    split = src.audio.filter_multi_output("asplit", len(pieces))
    parts = [
        _atempo_chain(split[k].filter("atrim", start=s, end=e).filter("asetpts", "PTS-STARTPTS"), v)
        for k, (_, s, e, v) in enumerate(pieces)
    ]
    return ffmpeg.concat(*parts, n=len(parts), v=0, a=1)


AUDIO_PIECE = "audio.m4a"
COPYABLE_AUDIO = frozenset({"aac"})  # what an MP4 output carries as it is, in every player


def audio_encoding(audio: Any, info: MediaInfo) -> dict[str, Any]:
    """ffmpeg output options for the output's audio: copied when the job leaves it untouched, else AAC.

    The audio is untouched when it comes straight from the input, with no filter between (no
    segment cut or re-timed, no clips joined), and the input's codec is one an MP4 carries:
    then its packets are copied, losing nothing and costing no encode (2.6 CPU seconds per
    minute of stereo AAC), the same whether the export is sharded or not.
    """
    import ffmpeg

    if isinstance(audio.node, ffmpeg.nodes.InputNode) and info.audio_codec in COPYABLE_AUDIO:
        return {"acodec": "copy"}
    return {"acodec": "aac", "audio_bitrate": "160k"}


def encode_audio(spec: ExportSpec, workdir: Path) -> Iterator[Event]:
    """The sharded output's audio, encoded once over the whole timeline into ``workdir/audio.m4a``.

    The kind's ``beside`` hook: it runs while the shards encode their video-only pieces, so
    the merge only joins. Written to a temporary name and renamed, so the merge never takes a
    half-written file for a finished one. Nothing is written for an input without audio.
    """
    import ffmpeg

    params = validate_params(spec.job, spec.params)
    info = probe(spec.input)
    if not info.has_audio:
        return
    pieces = _output_pieces(spec.job, params, info)
    duration = sum((e - s) / v for _, s, e, v in pieces)
    partial = workdir / f".{AUDIO_PIECE}.partial.m4a"
    audio = _audio_graph(pieces, info, _keeps_timeline(spec.job, params))
    args = ffmpeg.output(audio, str(partial), **audio_encoding(audio, info))
    yield from run_ffmpeg(_threaded(args.compile(cmd=find_ffmpeg(spec.ffmpeg), overwrite_output=True), spec.threads),
                          max(1, int(duration * info.fps)), info.fps, phase="audio")  # fmt: skip
    partial.replace(workdir / AUDIO_PIECE)


def _threaded(args: list[str], threads: int) -> list[str]:
    """``args`` with ``[ffmpeg] threads`` applied to every decoder and to the filter graph, not only the encoder.

    One ffmpeg still runs its demuxer, decoders, filters, encoders and muxer on threads of their
    own; this keeps each of them from starting a pool as large as the machine, which is what
    several shards on one machine (``threads = 1`` each) would otherwise do at once.
    """
    if not threads:
        return list(args)
    out = [args[0], "-filter_threads", str(threads)]
    for arg in args[1:]:
        if arg == "-i":
            out += ["-threads", str(threads)]
        out.append(arg)
    return out


def merge_export(spec: ExportSpec, parts: list[ExportSpec], results: list[dict[str, Any]], workdir: Path) -> Iterator[Event]:
    """Join the shards' pieces with stream copy (concat demuxer), add the audio encoded once over the whole timeline, faststart.

    The audio is normally there already (``encode_audio`` ran beside the shards); a merge
    without it (called on its own) encodes it first.
    """
    import ffmpeg

    started = time.monotonic()
    info = probe(spec.input)
    out = Path(spec.output)
    exe = find_ffmpeg(spec.ffmpeg)
    frames = int(sum(r.get("frames", 0) for r in results))
    listing = concat_list(workdir / "parts.txt", [p.output for p in parts])
    audio_file = workdir / AUDIO_PIECE if info.has_audio else None
    if audio_file is not None and not audio_file.exists():
        yield from encode_audio(spec, workdir)
    with atomic_output(out, spec.overwrite) as tmp:
        joined = ffmpeg.input(str(listing), format="concat", safe=0)
        streams = [joined.video] + ([ffmpeg.input(str(audio_file)).audio] if audio_file else [])
        args = ffmpeg.output(*streams, str(tmp), c="copy", movflags="+faststart").compile(cmd=exe, overwrite_output=True)
        yield from run_ffmpeg(args, frames, info.fps, phase="merge")
    size = out.stat().st_size
    yield Artifact(path=str(out), bytes=size)
    first = results[0] if results else {}
    result = {
        "job": spec.job,
        "input": spec.input,
        "output": str(out),
        "bytes": size,
        "width": first.get("width"),
        "height": first.get("height"),
        "duration_s": round(sum(r.get("duration_s", 0.0) for r in results), 3),
        "frames": frames,
        "audio": audio_file is not None,
    }
    yield Finished(result=result, elapsed_s=round(time.monotonic() - started, 3))


# -- the job ---------------------------------------------------------------------


def export_video(spec: ExportSpec) -> Iterator[Event]:
    """Export ``spec.input`` with one of the export jobs; yields progress in output frames.

    With ``spec.part`` set (a shard), only those output seconds are encoded, without audio.
    """
    started = time.monotonic()
    params = validate_params(spec.job, spec.params)
    info = probe(spec.input)
    out = Path(spec.output)
    check_output(out, spec.overwrite)
    exe = find_ffmpeg(spec.ffmpeg)
    import ffmpeg

    window = None
    if spec.part is not None:
        part = spec.part
        if not (isinstance(part, (list, tuple)) and len(part) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in part)):
            raise UsageError(f"export part: expected [start, end] in output seconds, got {str(part)[:60]}")
        pieces = _output_pieces(spec.job, params, info)
        if spec.job == "framing" and params.segments:
            window = _segment_window(pieces, info, float(spec.part[0]), float(spec.part[1]))
        else:
            window = _window(pieces, float(spec.part[0]), float(spec.part[1]))
    with tempfile.TemporaryDirectory(prefix="synapse-export-") as tmpdir:
        plan = _even_size(PLANNERS[spec.job](params, info, Path(tmpdir), window))
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
            if spec.threads:
                encode["threads"] = int(spec.threads)
            if plan.audio is not None:
                encode.update(audio_encoding(plan.audio, info))
            args = _threaded(ffmpeg.output(*streams, str(tmp), **encode).compile(cmd=exe, overwrite_output=True), spec.threads)
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
