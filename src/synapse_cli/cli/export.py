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


def default_output(src: str, suffix: str, output_dir: Optional[str]) -> str:
    """``<stem>.<suffix>`` in ``output_dir``, else beside the input: beside an ``s3://`` object too;
    an ``https://`` input's goes to the current directory (https is read-only)."""
    from synapse_cli.storage.urls import is_url

    if is_url(src):
        from urllib.parse import urlsplit

        name = f"{Path(urlsplit(src).path).stem or 'output'}.{suffix}"
        if output_dir:
            return output_dir.rstrip("/") + "/" + name if is_url(output_dir) else str(Path(output_dir) / name)
        return src.split("?", 1)[0].rsplit("/", 1)[0] + "/" + name if src.lower().startswith("s3://") else name
    name = f"{Path(src).stem}.{suffix}"
    if output_dir and is_url(output_dir):
        return output_dir.rstrip("/") + "/" + name
    return str(Path(output_dir) / name if output_dir else Path(src).with_name(name))


@with_common()
def export(
    input: Annotated[str, typer.Argument(help="Input video: a path, s3://bucket/key or https://… (see docs/storage.md).", show_default=False)],
    job: Annotated[Optional[str], typer.Option("--job", metavar="JOB", help="framing | overlay | annotate (default: export.default_job).")] = None,
    params_file: Annotated[Optional[Path], typer.Option("--params", metavar="FILE.json", help="Job params as a JSON file.", dir_okay=False)] = None,
    sets: Annotated[List[str], typer.Option("--set", metavar="KEY=VALUE", help="Set one param: KEY=VALUE (VALUE may be JSON). Repeatable.")] = [],
    output: Annotated[Optional[str], typer.Option("-o", "--output", metavar="FILE.mp4", help="Output .mp4, a path or s3://bucket/key (default: <stem>.<job>.mp4 beside the input).")] = None,
    *,
    common: Common,
) -> None:
    """Export a video with FFmpeg: framing (9:16 reel), overlay (highlight) or annotate (rated clips).

    Example: synapse export clip.mp4 --job framing --set 'keyframes=[{"time":0,"x":400,"y":0,"width":405,"height":720}]'
    """
    def build(settings: Settings):
        from synapse_cli.jobs.export.job import EXPORT_JOBS, ExportSpec, validate_params

        kind = job or settings["export.default_job"]
        if kind not in EXPORT_JOBS:
            raise UsageError(f"unknown --job {kind!r}; expected one of {', '.join(EXPORT_JOBS)}")
        params = parse_params(params_file, sets)
        validate_params(kind, params)  # reject bad params before any upload or encode
        from synapse_cli.storage.urls import is_url

        if not is_url(input) and not Path(input).exists():
            raise UsageError(f"input not found: {input}")
        out = output or default_output(input, f"{kind}.mp4", settings["export.output_dir"])
        if not is_url(out):  # an object is checked where the job runs, before it starts
            from synapse_cli.jobs._files import check_output

            check_output(Path(out), common.overwrite)
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

