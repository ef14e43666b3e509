"""A sample clip (ffmpeg's testsrc2 pattern with a tone), so a new user can try synapse with nothing else."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, Union

from synapse_cli.errors import UsageError
from synapse_cli.events import Artifact, Event, Finished, Started
from synapse_cli.jobs._files import atomic_output, check_output, check_video_name
from synapse_cli.jobs import JobKind
from synapse_cli.jobs._media import find_ffmpeg, run_ffmpeg

# runs in this process only from the CLI (nothing to gain remotely): no Modal functions
KIND = JobKind(
    name="sample",
    spec="synapse_cli.jobs.sample:SampleSpec",
    run="synapse_cli.jobs.sample:make_sample",
    build="synapse_cli.jobs.sample:build_spec",
    command="synapse_cli.cli.sample:sample",
    remote=False,
    names="synapse_cli.jobs.sample:sample_names",
)
DEFAULT_OUTPUT = "sample.mp4"  # what ``synapse sample`` writes when no name is given


@dataclass
class SampleSpec:
    output: str
    seconds: float = 10.0
    width: int = 1280
    height: int = 720
    fps: int = 30
    audio: bool = True
    ffmpeg: Optional[str] = None
    overwrite: bool = False

    INPUTS: ClassVar[tuple[str, ...]] = ()
    OUTPUTS: ClassVar[tuple[str, ...]] = ("output",)
    HOST_FIELDS: ClassVar[tuple[str, ...]] = ("ffmpeg",)
    SERVER_CAPS: ClassVar[dict[str, float]] = {"seconds": 600, "width": 3840, "height": 2160, "fps": 60}  # synapse serve refuses more (422)


def sample_names(data: dict, output_dir: Optional[str] = None) -> dict:
    """The sample kind's ``names`` hook: ``output`` defaults to ``sample.mp4`` and must end in a video container's extension."""
    if data.get("output") is None:
        data["output"] = DEFAULT_OUTPUT
    if isinstance(data["output"], str):
        check_video_name(data["output"], "output")
    return data


def build_spec(
    settings: Any,
    output: Union[str, "os.PathLike[str]"] = DEFAULT_OUTPUT,
    *,
    seconds: float = 10.0,
    size: str = "1280x720",
    audio: bool = True,
    overwrite: bool = False,
    cache: bool = True,
) -> SampleSpec:
    """The options of ``synapse sample`` (or ``sample(...)``) into a ``SampleSpec``."""
    from synapse_cli.errors import UsageError

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size expects WIDTHxHEIGHT, got {size!r}") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise UsageError(f"--size {size}: width and height must be even and at least 16")
    if not 0 < seconds <= 3600:
        raise UsageError(f"--seconds must be in (0, 3600], got {seconds:g}")
    sample_names({"output": os.fspath(output)})  # a name no muxer knows: exit 2 before anything runs
    check_output(Path(output), overwrite)
    return SampleSpec(output=os.fspath(output), seconds=seconds, width=width, height=height, audio=audio, ffmpeg=settings["ffmpeg.path"], overwrite=overwrite)


def check_sample(spec: SampleSpec) -> None:
    """The CLI's rules for any client (a spec sent over HTTP skips the command's checks): a UsageError naming the field."""
    if not (isinstance(spec.seconds, (int, float)) and math.isfinite(spec.seconds) and 0 < spec.seconds <= 3600):
        raise UsageError(f"seconds must be in (0, 3600], got {spec.seconds!r}")
    for name in ("width", "height"):
        value = getattr(spec, name)
        if value < 16 or value % 2:
            raise UsageError(f"{name} must be even and at least 16, got {value!r}")
    if not 1 <= spec.fps <= 240:
        raise UsageError(f"fps must be in [1, 240], got {spec.fps!r}")


def make_sample(spec: SampleSpec) -> Iterator[Event]:
    started = time.monotonic()
    check_sample(spec)
    out = Path(spec.output)
    check_output(out, spec.overwrite)
    exe = find_ffmpeg(spec.ffmpeg)
    total = int(round(spec.seconds * spec.fps))
    yield Started(job="sample", total=total)
    with atomic_output(out, spec.overwrite) as tmp:
        args = [exe, "-y", "-f", "lavfi", "-i", f"testsrc2=size={spec.width}x{spec.height}:rate={spec.fps}:duration={spec.seconds}"]
        if spec.audio:
            args += ["-f", "lavfi", "-i", f"sine=frequency=440:beep_factor=4:duration={spec.seconds}", "-c:a", "aac", "-shortest"]
        args += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(tmp)]
        yield from run_ffmpeg(args, total, spec.fps, phase="generate")
    size = out.stat().st_size
    yield Artifact(path=str(out), bytes=size)
    yield Finished(result={"output": str(out), "bytes": size, "duration_s": spec.seconds}, elapsed_s=round(time.monotonic() - started, 3))
