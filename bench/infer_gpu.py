"""`synapse infer` on a CUDA GPU against `yolo predict`, and against a model-only ceiling.

The clip: 20 s, 25 fps, 1280x720, a slow pan and zoom over ultralytics' zidane.jpg (two people in every
frame), encoded here with PyAV (no ffmpeg binary needed). Every run uses the bundled yolo11n-pose.pt at
imgsz 640, in this process, with the weights file already on disk; each is run ``--runs`` times, best kept.

1. synapse: ``run_yolo(InferSpec(task="pose", batch=auto, half=auto))`` to a .jsonl file: frames / wall of
   the whole job (model load, batch probe, decode, results file included) and the job's own loop fps.
2. ``yolo predict device=0`` as its CLI runs it (default batch 1, fp32), ``stream=True, save=False``
   (saving the annotated video would only slow it down): frames / wall of the predict call.
3. ``yolo predict half=True batch=32``: the same, its best setting.
4. Ceiling: every frame decoded into memory first, then ``model.predict(frames[i:i+32], half=True)``:
   frames / wall of the predict calls only (no decode, no output).

Targets (GPU): synapse ≥ 3x (2), ≥ 1.0x (3), ≥ 60 % of (4). Peak GPU memory is torch's
``max_memory_allocated`` for each run.

CPU smoke run (proves the script works; the figures mean nothing for a GPU):
    python bench/infer_gpu.py --device cpu --seconds 1 --width 320 --height 180 --imgsz 160 --batch 4 --runs 1 --out cpu.json
GPU:
    python bench/infer_gpu.py --out gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_clip(out: Path, seconds: float, width: int, height: int, fps: int = 25) -> Path:
    """A pan and zoom over zidane.jpg, encoded with PyAV (libx264 if the wheel has it, else mpeg4)."""
    import av
    import cv2

    assets = Path(next(iter(importlib.util.find_spec("ultralytics").submodule_search_locations))) / "assets"
    photo = cv2.imread(str(assets / "zidane.jpg"))  # 1280x720, two people
    ph, pw = photo.shape[:2]
    frames = int(round(seconds * fps))
    with av.open(str(out), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"preset": "veryfast", "crf": "26"}
        except Exception:  # noqa: BLE001 - a PyAV build without x264
            stream = container.add_stream("mpeg4", rate=fps)
            stream.bit_rate = 4_000_000
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            zoom = 0.85 + 0.1 * abs(((i / frames) * 2) % 2 - 1)  # 85-95 % of the photo
            cw, ch = int(pw * zoom), int(ph * zoom)
            x = int((pw - cw) * (i / max(frames - 1, 1)))
            y = int((ph - ch) / 2)
            img = cv2.resize(photo[y : y + ch, x : x + cw], (width, height), interpolation=cv2.INTER_AREA)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def decode_all(path: Path) -> list:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


class Gpu:
    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.cuda = torch, device != "cpu" and torch.cuda.is_available()

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        return round(self.torch.cuda.max_memory_allocated() / 2**20, 1)

    def name(self) -> str:
        return self.torch.cuda.get_device_name(0) if self.cuda else "cpu"


def clip_arguments(ap: argparse.ArgumentParser, seconds: float) -> None:
    """The options every GPU bench shares: the device, the made clip's length and size, the model's input size."""
    ap.add_argument("--device", default="0", help="0 (the first CUDA GPU) or cpu")
    ap.add_argument("--seconds", type=float, default=seconds)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--imgsz", type=int, default=640)


def parse_gpu_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """``ap.parse_args()``; with ``--device cpu`` the GPU is hidden, from synapse too (it picks its device itself)."""
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return args


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["fps"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    clip_arguments(ap, seconds=20.0)
    ap.add_argument("--batch", type=int, default=32, help="the batch of `yolo predict half=True` and of the ceiling")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--clip", type=Path, help="use this clip instead of making one")
    ap.add_argument("--out", type=Path, required=True, help="write every figure here as JSON")
    args = parse_gpu_args(ap)
    sys.path.insert(0, str(ROOT / "src"))
    from synapse_cli.jobs.infer.runtime import import_yolo
    from synapse_cli.jobs.infer.weights import default_weights
    from synapse_cli.jobs.infer.job import InferSpec, run_yolo

    yolo = import_yolo()  # offline, torchvision fallback where needed: the same ultralytics for every run
    weights = default_weights()
    gpu = Gpu(args.device)
    device: int | str = "cpu" if args.device == "cpu" else int(args.device)
    half_ok = args.device != "cpu"
    work = Path(tempfile.mkdtemp(prefix="synapse-bench-gpu-"))
    clip = args.clip or make_clip(work / "clip.mp4", args.seconds, args.width, args.height)
    frames = decode_all(clip)
    n = len(frames)
    print(f"clip {clip}: {n} frames {frames[0].shape[1]}x{frames[0].shape[0]}; device {gpu.name()}; weights {weights.name}", flush=True)
    report: dict = {"device": gpu.name(), "frames": n, "width": frames[0].shape[1], "height": frames[0].shape[0], "imgsz": args.imgsz}

    def synapse_run() -> dict:
        gpu.reset()
        out = work / "synapse.jsonl"
        start = time.perf_counter()
        events = list(run_yolo(InferSpec(source=str(clip), output=str(out), task="pose", imgsz=args.imgsz, overwrite=True)))
        wall = time.perf_counter() - start
        result = events[-1].result
        assert result["processed_frames"] == n, result
        return {"fps": round(n / wall, 2), "wall_s": round(wall, 3), "loop_fps": result["fps"], "batch": result["batch"],
                "half": result["half"], "gpu_peak_mib": result.get("gpu_peak_mib") or gpu.peak_mib()}  # fmt: skip

    def predict_run(**kw) -> dict:
        model = yolo(str(weights))
        gpu.reset()
        start = time.perf_counter()
        count = sum(1 for _ in model.predict(source=str(clip), stream=True, verbose=False, save=False, imgsz=args.imgsz, device=device, **kw))
        wall = time.perf_counter() - start
        assert count == n, (count, n)
        return {"fps": round(n / wall, 2), "wall_s": round(wall, 3), "gpu_peak_mib": gpu.peak_mib(), **kw}

    def ceiling_run() -> dict:
        model = yolo(str(weights))
        model.predict(frames[: args.batch], verbose=False, imgsz=args.imgsz, device=device, half=half_ok, batch=args.batch)  # set-up, warm-up
        gpu.reset()
        start = time.perf_counter()
        for i in range(0, n, args.batch):
            model.predict(frames[i : i + args.batch], verbose=False, imgsz=args.imgsz, device=device, half=half_ok, batch=args.batch)
        if gpu.cuda:
            gpu.torch.cuda.synchronize()
        wall = time.perf_counter() - start
        return {"fps": round(n / wall, 2), "wall_s": round(wall, 3), "gpu_peak_mib": gpu.peak_mib(), "batch": args.batch, "half": half_ok}

    def decode_run() -> dict:
        from synapse_cli.jobs.infer.sources import inspect_source, open_frames

        out = {}
        for interval in (0.005, 0.0005):
            saved = sys.getswitchinterval()
            sys.setswitchinterval(interval)
            try:
                frames_in = open_frames(inspect_source(str(clip)))
                start = time.perf_counter()
                count = sum(1 for _ in frames_in)
                frames_in.close()
                out[f"switch_{interval}"] = round(count / (time.perf_counter() - start), 1)
            finally:
                sys.setswitchinterval(saved)
        return {"fps": max(out.values()), **out}

    runs = {
        "decode_only": decode_run,
        "synapse": synapse_run,
        "yolo_predict_default": lambda: predict_run(),
        "yolo_predict_best": lambda: predict_run(half=half_ok, batch=args.batch),
        "ceiling": ceiling_run,
    }
    for name, fn in runs.items():
        tries = []
        for _ in range(args.runs):
            tries.append(fn())
            print(f"  {name:22s} {tries[-1]}", flush=True)
        report[name] = best(tries)
    s = report["synapse"]["fps"]
    report["ratios"] = {
        "vs_yolo_predict_default": round(s / report["yolo_predict_default"]["fps"], 3),
        "vs_yolo_predict_best": round(s / report["yolo_predict_best"]["fps"], 3),
        "vs_ceiling": round(s / report["ceiling"]["fps"], 3),
    }
    targets = {"vs_yolo_predict_default": 3.0, "vs_yolo_predict_best": 1.0, "vs_ceiling": 0.6}
    report["targets_met"] = {k: report["ratios"][k] >= v for k, v in targets.items()} if gpu.cuda else "n/a on the CPU"
    print(f"\n{'':24s}{'fps':>10s}{'GPU peak MiB':>14s}")
    for name in runs:
        r = report[name]
        print(f"{name:24s}{r['fps']:10.1f}{(r.get('gpu_peak_mib') or 0):14.0f}")
    print(f"synapse/yolo predict default {report['ratios']['vs_yolo_predict_default']:.2f}x (target 3x), "
          f"/best {report['ratios']['vs_yolo_predict_best']:.2f}x (target 1x), "
          f"/ceiling {report['ratios']['vs_ceiling']:.0%} (target 60 %)")  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
