"""``synapse sample``: a test-pattern clip (the spec is built by ``jobs/sample.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from synapse_cli.cli._options import with_common
from synapse_cli.cli._run import run_command
from synapse_cli.pipeline.options import RunOptions


@with_common(local=True)
def sample(
    output: Annotated[Path, typer.Argument(help="Where to write the clip (.mp4).", show_default=False)] = Path("sample.mp4"),
    seconds: Annotated[float, typer.Option("--seconds", metavar="SECONDS", help="Length in seconds.")] = 10.0,
    size: Annotated[str, typer.Option("--size", metavar="WxH", help="WIDTHxHEIGHT.")] = "1280x720",
    audio: Annotated[bool, typer.Option("--audio/--no-audio", help="Add a tone track.")] = True,
    *,
    common: RunOptions,
) -> None:
    """Generate a sample clip (test pattern and tone) with the embedded ffmpeg, to try synapse on.

    Example: synapse sample demo.mp4 && synapse export demo.mp4 --job framing
    """

    run_command("sample", common, output, seconds=seconds, size=size, audio=audio, summarize=lambda r: r["output"])
