from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from synapse_cli.cli._options import Common, with_common
from synapse_cli.cli._run import run_job
from synapse_cli.config import Settings
from synapse_cli.errors import UsageError


def parse_params(params_file: Optional[Path], sets: List[str]) -> dict[str, Any]:
    """``--params FILE.json`` first, then each ``--set key=value`` (value parsed as JSON when it is JSON)."""
    params: dict[str, Any] = {}
    if params_file is not None:
        try:
            loaded = json.loads(params_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read params file {params_file}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"params file {params_file} is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"params file {params_file} must hold a JSON object")
        params.update(loaded)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


@with_common()
def export(
    input: Annotated[Path, typer.Argument(help="Input video.", show_default=False)],
    job: Annotated[Optional[str], typer.Option("--job", metavar="JOB", help="framing | overlay | annotate (default: export.default_job).")] = None,
    params_file: Annotated[Optional[Path], typer.Option("--params", metavar="FILE.json", help="Job params as a JSON file.", dir_okay=False)] = None,
    sets: Annotated[List[str], typer.Option("--set", metavar="KEY=VALUE", help="Set one param: KEY=VALUE (VALUE may be JSON). Repeatable.")] = [],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE.mp4", help="Output .mp4 (default: <stem>.<job>.mp4 beside the input).")] = None,
    *,
    common: Common,
) -> None:
    """Export a video with FFmpeg: framing (9:16 reel), overlay (highlight) or annotate (rated clips).

    Example: synapse export clip.mp4 --job framing --set 'keyframes=[{"time":0,"x":400,"y":0,"width":405,"height":720}]'
    """
    def build(settings: Settings):
        from synapse_cli.jobs import settle_names
        from synapse_cli.jobs.export.job import EXPORT_JOBS, ExportSpec, validate_params

        kind = job or settings["export.default_job"]
        if kind not in EXPORT_JOBS:
            raise UsageError(f"unknown --job {kind!r}; expected one of {', '.join(EXPORT_JOBS)}")
        params = parse_params(params_file, sets)
        validate_params(kind, params)  # reject bad params before any upload or encode
        if not input.exists():
            raise UsageError(f"input not found: {input}")
        names = {"input": str(input), "job": kind, "output": str(output) if output else None}
        out = Path(settle_names("export", names, settings["export.output_dir"])["output"])  # default output, name checked
        from synapse_cli.jobs._files import check_output

        check_output(out, common.overwrite)
        return ExportSpec(
            input=str(input),
            output=str(out),
            job=kind,
            params=params,
            preset=settings["ffmpeg.preset"],
            crf=settings["ffmpeg.crf"],
            ffmpeg=settings["ffmpeg.path"],
            overwrite=common.overwrite,
            threads=settings["ffmpeg.threads"],
        )

    run_job("export", build, common, summarize=lambda r: r.get("output", ""))

