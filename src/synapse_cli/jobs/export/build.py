"""``export``'s spec builder: the options of ``synapse export`` (or ``export(...)`` in Python) into an ``ExportSpec``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from synapse_cli.config import Settings
from synapse_cli.errors import UsageError

PathLike = Union[str, "os.PathLike[str]"]


def parse_params(params_file: Optional[PathLike], sets: Iterable[str] = ()) -> dict[str, Any]:
    """``--params FILE.json`` first, then each ``--set key=value`` (value parsed as JSON when it is JSON)."""
    params: dict[str, Any] = {}
    if params_file is not None:
        path = Path(params_file)
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read params file {path}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"params file {path} is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"params file {path} must hold a JSON object")
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


def default_output(src: PathLike, suffix: str, output_dir: Optional[str] = None) -> str:
    """``<stem>.<suffix>`` in ``output_dir``, else beside the input: beside an ``s3://`` object too;
    an ``https://`` input's goes to the current directory (https is read-only)."""
    from synapse_cli.storage.urls import is_url

    src = os.fspath(src)
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


def export_names(data: dict[str, Any], output_dir: Optional[str] = None) -> dict[str, Any]:
    """The export kind's ``names`` hook: ``output`` defaults to ``<input stem>.<job>.mp4`` (``default_output``,
    in ``output_dir`` when given), and must end in a video container's extension."""
    from synapse_cli.jobs._files import check_video_name
    from synapse_cli.jobs.export.job import ExportSpec

    if data.get("output") is None and isinstance(data.get("input"), str) and data["input"]:
        job = data.get("job") or ExportSpec.job
        data["output"] = default_output(data["input"], f"{job}.mp4", output_dir)
    if isinstance(data.get("output"), str):
        check_video_name(data["output"], "output")
    return data


def build_spec(
    settings: Settings,
    input: PathLike,
    *,
    job: Optional[str] = None,
    params: Union[Mapping[str, Any], PathLike, None] = None,
    params_file: Optional[PathLike] = None,
    sets: Iterable[str] = (),
    output: Optional[PathLike] = None,
    overwrite: bool = False,
    cache: bool = True,
) -> Any:
    """Export INPUT with FFmpeg (``job``: framing, overlay or annotate) into ``output`` (default:
    ``<stem>.<job>.mp4`` beside it). ``params``: a mapping of job params, or a JSON file's path (as ``--params``); ``sets``: ``KEY=VALUE`` strings (``--set``)."""
    from synapse_cli.jobs._files import check_output
    from synapse_cli.jobs.export.job import ExportSpec
    from synapse_cli.jobs.export.params import EXPORT_JOBS, validate_params
    from synapse_cli.storage.urls import is_url

    kind = job or settings["export.default_job"]
    if kind not in EXPORT_JOBS:
        raise UsageError(f"unknown --job {kind!r}; expected one of {', '.join(EXPORT_JOBS)}")
    if params is not None and not isinstance(params, Mapping):
        params_file, params = params, None
    merged = parse_params(params_file)
    merged.update(dict(params or {}))
    merged.update(parse_params(None, sets))
    validate_params(kind, merged)  # reject bad params before any upload or encode
    source = os.fspath(input)
    if not is_url(source) and not Path(source).exists():
        raise UsageError(f"input not found: {source}")
    names = {"input": source, "job": kind, "output": os.fspath(output) if output is not None else None}
    out = export_names(names, settings["export.output_dir"])["output"]  # the default output; a name no muxer knows is refused
    if not is_url(out):  # an object is checked where the job runs, before it starts
        check_output(Path(out), overwrite)
    return ExportSpec(
        input=source,
        output=out,
        job=kind,
        params=merged,
        preset=settings["ffmpeg.preset"],
        crf=settings["ffmpeg.crf"],
        ffmpeg=settings["ffmpeg.path"],
        overwrite=overwrite,
        threads=settings["ffmpeg.threads"],
    )
