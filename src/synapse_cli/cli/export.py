"""``synapse export``: options in, one call to the pipeline (the spec is built by ``jobs/export/build.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from synapse_cli.cli._options import with_common
from synapse_cli.cli._run import run_command
from synapse_cli.pipeline.options import RunOptions


@with_common()
def export(
    input: Annotated[str, typer.Argument(help="Input video: a path, s3://bucket/key or https://… (see docs/storage.md).", show_default=False)],
    job: Annotated[Optional[str], typer.Option("--job", metavar="JOB", help="framing | overlay | annotate (default: export.default_job).")] = None,
    params_file: Annotated[Optional[Path], typer.Option("--params", metavar="FILE.json", help="Job params as a JSON file.", dir_okay=False)] = None,
    sets: Annotated[List[str], typer.Option("--set", metavar="KEY=VALUE", help="Set one param: KEY=VALUE (VALUE may be JSON). Repeatable.")] = [],
    output: Annotated[Optional[str], typer.Option("-o", "--output", metavar="FILE.mp4", help="Output .mp4, a path or s3://bucket/key (default: <stem>.<job>.mp4 beside the input).")] = None,
    *,
    common: RunOptions,
) -> None:
    """Export a video with FFmpeg: framing (9:16 reel), overlay (highlight) or annotate (rated clips).

    Example: synapse export clip.mp4 --job framing --set 'keyframes=[{"time":0,"x":400,"y":0,"width":405,"height":720}]'
    """
    run_command("export", common, input, job=job, params_file=params_file, sets=sets, output=output, summarize=lambda r: r.get("output", ""))
