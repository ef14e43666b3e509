"""``infer``'s spec builder: the options of ``synapse infer`` (or ``infer(...)``) into an ``InferSpec``.

``--task``, ``--model``, ``--imgsz``, ``--conf``, ``--batch`` and ``--half`` are settings
(``infer.*``): the kind's record maps them to those keys and the builder reads ``settings``.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from synapse_cli.config import Settings

PathLike = Union[str, "os.PathLike[str]"]


def _split(value: Union[str, Sequence[str], None]) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [p.strip() for p in items if p.strip()]


def build_spec(
    settings: Settings,
    source: PathLike,
    *,
    output: Optional[PathLike] = None,
    annotated: Optional[PathLike] = None,
    classes: Union[str, Sequence[str], None] = None,
    every: int = 1,
    court: Union[str, Sequence[float], None] = None,
    overwrite: bool = False,
    cache: bool = True,
) -> Any:
    """YOLO detect/pose/track on SOURCE (a video, an image or a folder of images) into per-frame JSON
    (``output``), optionally an ``annotated`` video. ``task``, ``model``, ``imgsz``, ``conf``,
    ``batch`` and ``half`` are settings (``infer.*``); ``court`` is eight numbers or ``"x1,y1,..."``."""
    from synapse_cli.jobs.infer.court import parse_corners
    from synapse_cli.jobs.infer.job import InferSpec, check_spec, default_output

    task = settings["infer.task"]
    if court is not None and not isinstance(court, str):
        court = ",".join(str(v) for v in court)
    spec = InferSpec(
        source=os.fspath(source),
        output=os.fspath(output) if output is not None else default_output(os.fspath(source), task),
        task=task,
        model=settings["infer.model"],
        annotated=os.fspath(annotated) if annotated is not None else None,
        imgsz=settings["infer.imgsz"],
        conf=settings["infer.conf"],
        classes=_split(classes),
        every=every,
        court=parse_corners(court) if court is not None else None,
        court_width_m=settings["infer.court_width_m"],
        court_length_m=settings["infer.court_length_m"],
        threads=settings["infer.threads"],
        batch=settings["infer.batch"],
        half=settings["infer.half"],
        overwrite=overwrite,
        ffmpeg_path=settings["ffmpeg.path"],
        ffmpeg_preset=settings["ffmpeg.preset"],
        ffmpeg_crf=settings["ffmpeg.crf"],
    )
    check_spec(spec)  # missing or non-media source, bad model path, bad --court: exit 2 before any work
    return spec
