"""An export in shards: the output timeline cut into contiguous parts (``split``), their length (``size``)
and the pieces joined with the audio (``merge``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from synapse_cli.events import Artifact, Event, Finished
from synapse_cli.jobs._files import atomic_output
from synapse_cli.jobs._media import concat_list, find_ffmpeg, probe, run_ffmpeg
from synapse_cli.jobs.export.audio import AUDIO_PIECE, encode_audio
from synapse_cli.jobs.export.params import validate_params
from synapse_cli.jobs.export.windows import output_pieces

if TYPE_CHECKING:
    from synapse_cli.jobs.export.job import ExportSpec


def split_export(spec: ExportSpec, n: int, workdir: Path, settings: Any = None) -> list[ExportSpec]:
    """``n`` shard specs over contiguous ranges of the output timeline, each writing a video-only piece in ``workdir``.

    framing and overlay cut at output frame boundaries; annotate cuts only between clips
    (one shard per clip, or per group of consecutive clips). Fewer than ``n`` come back
    when the output has fewer frames (or clips) than that.
    """
    from dataclasses import replace

    params = validate_params(spec.job, spec.params)
    info = probe(spec.input)
    pieces = output_pieces(spec.job, params, info)
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
    return sum((e - s) / v for _, s, e, v in output_pieces(spec.job, params, info))


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
