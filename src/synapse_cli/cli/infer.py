"""``synapse infer``: YOLO detect, pose and track on a video, an image or a folder of images."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from synapse_cli.cli._options import with_common
from synapse_cli.cli._run import run_command
from synapse_cli.pipeline.options import RunOptions

# Heavy imports (ultralytics, torch) happen inside the job, so `synapse --help` stays fast.


def _summary(result: dict[str, Any]) -> str:
    parts = [f"{result.get('processed_frames', 0)} frames", f"{result.get('detections', 0)} detections"]
    if result.get("tracks") is not None:
        parts.append(f"{result['tracks']} tracks")
    parts.append(f"{result.get('fps', 0):g} fps")
    if result.get("device", "cpu") != "cpu":
        parts.append(f"batch {result.get('batch')}")
        if result.get("gpu_peak_mib") is not None:
            parts.append(f"{result['gpu_peak_mib']:g} MiB GPU peak")
    line = f"{result.get('output')}: {', '.join(parts)}"
    if result.get("annotated"):
        line += f"; annotated: {result['annotated']}"
    return line


@with_common()
def infer(
    source: Annotated[str, typer.Argument(help="A video file, an image, or a directory of images: a path, s3://bucket/key (a prefix/ for images) or https://….", show_default=False)],
    task: Annotated[
        Optional[str], typer.Option("--task", metavar="TASK", help="detect | pose | track (pose + persistent ids). Default: pose ([infer] task).")
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", metavar="FILE", help="Weights file (.pt/.onnx). Default: the bundled yolo11n-pose.pt. Never downloaded."),
    ] = None,
    output: Annotated[
        Optional[str],
        typer.Option("-o", "--output", metavar="FILE.json", help="Results file, .json or .jsonl (streamed), a path or s3://bucket/key. Default: <stem>.<task>.json beside SOURCE (for a URL source: in the current directory)."),
    ] = None,
    annotated: Annotated[
        Optional[str],
        typer.Option("--annotated", metavar="OUT.mp4", help="Also write OUT.mp4 (a path or s3://bucket/key): boxes, skeletons and track ids drawn, H.264, source audio kept."),
    ] = None,
    imgsz: Annotated[Optional[int], typer.Option("--imgsz", metavar="PIXELS", help="Inference size in pixels. Default: 640.")] = None,
    conf: Annotated[Optional[float], typer.Option("--conf", metavar="0-1", help="Confidence threshold. Default: 0.25.")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", metavar="NAME,...", help="Keep only these classes: NAME,... (names from the model).")] = None,
    every: Annotated[int, typer.Option("--every", metavar="N", help="Run the model on every Nth frame.")] = 1,
    court: Annotated[
        Optional[str],
        typer.Option(
            "--court",
            metavar="X1,Y1,...,X4,Y4",
            help="Court corners X1,Y1,...,X4,Y4 in pixels, in order round the court starting with one end of the far baseline. "
            "Drops detections whose feet are outside; adds position_m and speed_m_s.",
        ),
    ] = None,
    batch: Annotated[
        Optional[str],
        typer.Option("--batch", metavar="auto|N", help="Frames per model call: auto (1 per CPU worker; on a GPU the largest of 8/16/32/64 that fits) or 1-256."),
    ] = None,
    half: Annotated[
        Optional[bool], typer.Option("--half/--no-half", help="fp16 inference. Default: on for CUDA, off elsewhere ([infer] half).")
    ] = None,
    *,
    common: RunOptions,
) -> None:
    """Detect people (boxes, 17 keypoints, track ids) in a video, offline, with per-frame JSON.

    Example: synapse infer match.mp4 --task track --court 412,220,868,220,1180,700,100,700 --annotated match.tracked.mp4
    """
    run_command(
        "infer", common, source, task=task, model=model, output=output, annotated=annotated, imgsz=imgsz, conf=conf,
        classes=classes, every=every, court=court, batch=batch, half=half, summarize=_summary,
    )  # fmt: skip
