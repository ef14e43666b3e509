"""Which batch, and whether cuDNN's autotuner, make a batched `synapse infer` fastest on this GPU.

For batch 16, 32 and 64, with ``torch.backends.cudnn.benchmark`` off (the default) and on: the job's own
loop fps on a 20 s 1280x720 clip (pose, fp16), plus the model-only figure (frames decoded in memory,
``model.predict`` on slices of that batch), so the pipeline and the model are told apart.
    python bench/infer_gpu_sweep.py --out sweep.json
    python bench/infer_gpu_sweep.py --device cpu --seconds 1 --width 320 --height 180 --imgsz 160 --batches 2 4 --out s.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from infer_gpu import clip_arguments, decode_all, make_clip, parse_gpu_args  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    clip_arguments(ap, seconds=20.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--out", type=Path, required=True)
    args = parse_gpu_args(ap)
    import torch

    from synapse_cli.jobs.infer.job import InferSpec, run_yolo
    from synapse_cli.jobs.infer.runtime import import_yolo
    from synapse_cli.jobs.infer.weights import default_weights

    work = Path(tempfile.mkdtemp(prefix="synapse-gpu-sweep-"))
    clip = make_clip(work / "clip.mp4", args.seconds, args.width, args.height)
    frames = decode_all(clip)
    device = "cpu" if args.device == "cpu" else int(args.device)
    half = args.device != "cpu"
    rows = []
    for bench_mode in (False, True):
        torch.backends.cudnn.benchmark = bench_mode
        for batch in args.batches:
            spec = InferSpec(source=str(clip), output=str(work / "o.jsonl"), task="pose", imgsz=args.imgsz, batch=batch, overwrite=True)
            list(run_yolo(spec))  # warm-up at this shape
            start = time.perf_counter()
            result = list(run_yolo(spec))[-1].result
            wall = time.perf_counter() - start
            model = import_yolo()(str(default_weights()))
            model.predict(frames[:batch], verbose=False, imgsz=args.imgsz, device=device, half=half, batch=batch)
            t0 = time.perf_counter()
            for i in range(0, len(frames), batch):
                model.predict(frames[i : i + batch], verbose=False, imgsz=args.imgsz, device=device, half=half, batch=batch)
            if half:
                torch.cuda.synchronize()
            model_fps = len(frames) / (time.perf_counter() - t0)
            row = {"cudnn_benchmark": bench_mode, "batch": batch, "synapse_loop_fps": result["fps"], "synapse_wall_fps": round(len(frames) / wall, 1),
                   "model_only_fps": round(model_fps, 1)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(rows, indent=2) + "\n")  # after each row: a cut-off run still tells something
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
