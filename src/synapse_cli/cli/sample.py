from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from synapse_cli.cli._options import Common, with_common
from synapse_cli.cli._run import run_job
from synapse_cli.config import Settings
from synapse_cli.errors import UsageError


@with_common(local=True)
def sample(
    output: Annotated[Path, typer.Argument(help="Where to write the clip (.mp4).", show_default=False)] = Path("sample.mp4"),
    seconds: Annotated[float, typer.Option("--seconds", metavar="SECONDS", help="Length in seconds.")] = 10.0,
    size: Annotated[str, typer.Option("--size", metavar="WxH", help="WIDTHxHEIGHT.")] = "1280x720",
    audio: Annotated[bool, typer.Option("--audio/--no-audio", help="Add a tone track.")] = True,
    *,
    common: Common,
) -> None:
    """Generate a sample clip (test pattern and tone) with the embedded ffmpeg, to try synapse on.

    Example: synapse sample demo.mp4 && synapse export demo.mp4 --job framing
    """

    def build(settings: Settings):
        from synapse_cli.jobs import settle_names
        from synapse_cli.jobs._files import check_output
        from synapse_cli.jobs.sample import SampleSpec

        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise UsageError(f"--size expects WIDTHxHEIGHT, got {size!r}") from None
        if width < 16 or height < 16 or width % 2 or height % 2:
            raise UsageError(f"--size {size}: width and height must be even and at least 16")
        if not 0 < seconds <= 3600:
            raise UsageError(f"--seconds must be in (0, 3600], got {seconds:g}")
        settle_names("sample", {"output": str(output)})  # a name no muxer knows: exit 2 before anything runs
        check_output(output, common.overwrite)
        return SampleSpec(output=str(output), seconds=seconds, width=width, height=height, audio=audio, ffmpeg=settings["ffmpeg.path"], overwrite=common.overwrite)

    run_job("sample", build, common, summarize=lambda r: r["output"])

