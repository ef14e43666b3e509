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
from typing import Any, Callable, ClassVar, Iterator, Optional

from synapse_cli.events import Artifact, Event, Finished, Log, Started
from synapse_cli.jobs._files import atomic_output, check_output
from synapse_cli.jobs._media import MediaInfo, find_ffmpeg, probe, run_ffmpeg
from synapse_cli.jobs.export.annotate import plan_annotate
from synapse_cli.jobs.export.audio import audio_encoding
from synapse_cli.jobs.export.framing import plan_framing
from synapse_cli.jobs.export.graph import Plan, even_size, threaded
from synapse_cli.jobs.export.overlay import plan_overlay
from synapse_cli.jobs.export.params import EXPORT_JOBS, PARAMS, validate_params
from synapse_cli.jobs.export.windows import part_window

__all__ = ["EXPORT_JOBS", "PARAMS", "ExportSpec", "export_video", "validate_params"]


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


PLANNERS: dict[str, Callable[..., Plan]] = {
    "framing": plan_framing,
    "overlay": plan_overlay,
    "annotate": plan_annotate,
}


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
    window = part_window(spec.job, params, info, spec.part) if spec.part is not None else None
    with tempfile.TemporaryDirectory(prefix="synapse-export-") as tmpdir:
        plan = even_size(PLANNERS[spec.job](params, info, Path(tmpdir), window))
        total = max(1, int(round(plan.duration * info.fps)))
        yield Started(job="export", total=total)
        for message in plan.logs:
            yield Log(message, level="warning")
        with atomic_output(out, spec.overwrite) as tmp:
            args = _encode_args(spec, plan, info, str(tmp), exe)
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


def _encode_args(spec: ExportSpec, plan: Plan, info: MediaInfo, target: str, exe: str) -> list[str]:
    """The ffmpeg command line that encodes ``plan`` into ``target``: x264 at the spec's preset and crf, faststart."""
    import ffmpeg

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
    return threaded(ffmpeg.output(*streams, target, **encode).compile(cmd=exe, overwrite_output=True), spec.threads)
