"""What every export's filter graph shares: the source (or a shard's window of it), the plan a planner
returns, text files for drawtext, the audio tempo chain, even frame sizes, and ffmpeg's thread options."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from synapse_cli.jobs._media import MediaInfo, url_options


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


def open_source(info: MediaInfo, window: Optional[Window]) -> tuple[Any, Any | None]:
    """(video, audio) of the input; for a shard, only its window's frames, on a clock starting at 0, and no audio."""
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


def write_text(workdir: Path, name: str, text: str) -> str:
    """drawtext reads text from a file (with expansion off): no quoting of user text to get wrong."""
    path = workdir / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def atempo_chain(stream: Any, speed: float) -> Any:
    # atempo takes 0.5..2.0 per instance in older ffmpeg builds: chain factors to reach any speed
    while speed > 2.0:
        stream, speed = stream.filter("atempo", 2.0), speed / 2.0
    while speed < 0.5:
        stream, speed = stream.filter("atempo", 0.5), speed / 0.5
    return stream.filter("atempo", round(speed, 6)) if abs(speed - 1.0) > 1e-9 else stream


def even_size(plan: Plan) -> Plan:
    """H.264 in 4:2:0 needs even sizes: pad an odd frame by one black row/column at the right/bottom
    (as infer's annotated video does), so displayed coordinates stay where they were."""
    if not (plan.width % 2 or plan.height % 2):
        return plan
    w, h = plan.width + plan.width % 2, plan.height + plan.height % 2
    plan.logs.append(f"the {plan.width}x{plan.height} frame is padded to {w}x{h} (H.264 4:2:0 needs even sizes)")
    plan.video = plan.video.filter("pad", w, h, 0, 0, color="black")
    plan.width, plan.height = w, h
    return plan


def threaded(args: list[str], threads: int) -> list[str]:
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
