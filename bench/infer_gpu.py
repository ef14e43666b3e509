"""`synapse infer` on a CUDA GPU against `yolo predict`, against a forward-only figure, step by step (issue 24).

The clip: 20 s, 25 fps, 1280x720, a slow pan and zoom over ultralytics' zidane.jpg (two people in every
frame), encoded here with PyAV (no ffmpeg binary needed). Every run uses the bundled yolo11n-pose.pt at
imgsz 640 with the weights file already on disk.

1. synapse: ``run_yolo(InferSpec(task="pose", batch=auto, half=auto))`` to a .jsonl file, frames / wall of the
   whole job (model load, set-up, decode, results file included). ``--runs`` runs in this process: the first is
   the cold figure (fresh process: imports done, but the model, the cuDNN plans and the set-up are all new),
   the best of the others the warm one.
2. ``--steps name=src,...``: the same for other source trees (the committed code before issue 24, then each
   step), each in a child process of its own, so cold means cold; they run first, in the order given.
3. ``yolo predict device=0`` as its CLI runs it (default batch 1, fp32), ``stream=True, save=False``: frames / wall
   of the predict call, and of model construction plus the call (what a user's command pays).
4. ``yolo predict half=True batch=32``: the same, its best setting.
5. Ultralytics' in-memory predict (what earlier runs called the "ceiling"): every frame decoded into memory
   first, then ``model.predict(frames[i:i+32], half=True)``; mostly CPU time per frame, not the GPU's limit.
6. Forward-only: the model's forward alone on a letterboxed batch already on the GPU, at the batch synapse
   chose, timed with CUDA events (median of 20): the GPU's figure.
7. Stage split: one serial pass over the clip through synapse's own pieces, each stage timed apart (CUDA
   synchronised between stages): decode, letterbox, host-to-device copy, forward, postprocess (with its one
   device-to-host copy), JSON. Serial, so the stages add up; the job overlaps them.

Targets (issue 24, GPU): synapse ≥ 1.5x (4) and never below 1.0x; ≥ 3x (3); ≥ 60 % of (6) at its batch.
The earlier bench's targets are kept beside them: ≥ 1.0x (4), ≥ 60 % of (5).

CPU smoke run (proves the script works; the figures mean nothing for a GPU):
    python bench/infer_gpu.py --device cpu --seconds 1 --width 320 --height 180 --imgsz 160 --batch 4 --runs 2 --out cpu.json
GPU:
    python bench/infer_gpu.py --out gpu.json --steps committed=build/steps/0-committed/src,decode=build/steps/1-decode/src
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
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


def synapse_runs(clip: Path, imgsz: int, runs: int, work: Path, gpu: "Gpu") -> dict:
    """``runs`` synapse jobs in this process: the first is the cold one, the best of the rest the warm one."""
    from synapse_cli.jobs.infer.job import InferSpec, run_yolo

    tries = []
    for i in range(runs):
        gpu.reset()
        out = work / f"synapse-{i}.jsonl"
        start = time.perf_counter()
        events = list(run_yolo(InferSpec(source=str(clip), output=str(out), task="pose", imgsz=imgsz, overwrite=True)))
        wall = time.perf_counter() - start
        result = events[-1].result
        n = result["processed_frames"]
        tries.append({"fps": round(n / wall, 2), "wall_s": round(wall, 3), "loop_fps": result["fps"], "batch": result["batch"],
                      "half": result["half"], "frames": n, "gpu_peak_mib": result.get("gpu_peak_mib") or gpu.peak_mib()})  # fmt: skip
        print(f"  synapse run {i + 1} {tries[-1]}", flush=True)
    return {"cold": tries[0], "best_of_rest": best(tries[1:]) if len(tries) > 1 else None, "runs": tries}


def step_in_child(name: str, src: Path, clip: Path, args: argparse.Namespace) -> dict:
    """``synapse_runs`` for the source tree ``src``, in a fresh process that imports synapse from there."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(src.resolve()), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-synapse", "--clip", str(clip), "--imgsz", str(args.imgsz),
           "--runs", str(args.runs), "--device", args.device, "--out", os.devnull]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.step_timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "src": str(src)}
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    if not found.get("imported_from", "").startswith(str(src.resolve())):
        return {"error": f"the child imported synapse from {found.get('imported_from')}, not {src}", "src": str(src)}
    found["process_wall_s"] = round(time.perf_counter() - start, 2)  # imports included
    return found


def forward_only(weights: Path, frames: list, batch: int, imgsz: int, half: bool, device: str, gpu: "Gpu", repeats: int = 20) -> dict:
    """The model's forward alone on one letterboxed batch already on the device (CUDA events where there is CUDA)."""
    import torch

    from synapse_cli.jobs.infer.batching import yolo_engines
    from synapse_cli.jobs.infer.runtime import load_model

    args = {"imgsz": imgsz, "conf": 0.25, "classes": None, "verbose": False, "save": False}
    engine, _ = yolo_engines(load_model(weights), weights, device, half, args, frames[0].shape, batch)
    p = engine.predictor
    picked = [frames[i % len(frames)] for i in range(batch)]
    buf = torch.stack([torch.from_numpy(p.pre_transform([f])[0]) for f in picked])

    def forward_ms() -> float:
        with torch.inference_mode():
            im = buf.to(p.device).permute(0, 3, 1, 2).flip(1).contiguous()
            im = (im.half() if p.model.fp16 else im.float()).div_(255)
            if gpu.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                begin.record()
                p.inference(im)
                end.record()
                torch.cuda.synchronize()
                return begin.elapsed_time(end)
            start = time.perf_counter()
            p.inference(im)
            return (time.perf_counter() - start) * 1000

    def run() -> list[float]:
        forward_ms()  # this thread's plans for the shape
        return sorted(forward_ms() for _ in range(repeats))

    times = engine._on_device(run)
    median = times[len(times) // 2]
    return {"fps": round(batch / (median / 1000), 1), "batch": batch, "half": bool(p.model.fp16), "median_ms": round(median, 3),
            "min_ms": round(times[0], 3), "timer": "cuda events" if gpu.cuda else "perf_counter (no CUDA)"}  # fmt: skip


def stage_split(clip: Path, weights: Path, batch: int, imgsz: int, half: bool, device: str, gpu: "Gpu", work: Path) -> dict:
    """One serial pass through synapse's own pieces, each stage timed apart; seconds and frames per second each."""
    import numpy as np
    import torch

    from synapse_cli.jobs.infer.batching import yolo_engines
    from synapse_cli.jobs.infer.postprocess import batched_postprocess
    from synapse_cli.jobs.infer.results import ResultsWriter, detections_from
    from synapse_cli.jobs.infer.runtime import load_model
    from synapse_cli.jobs.infer.sources import inspect_source, open_frames

    def sync() -> None:
        if gpu.cuda:
            torch.cuda.synchronize()

    t = dict.fromkeys(("decode", "letterbox", "h2d", "forward", "postprocess", "json"), 0.0)
    start = time.perf_counter()
    source = open_frames(inspect_source(str(clip)))
    frames = [f.image for f in source]  # all of it first: the decode alone, as the job's decode thread does it
    source.close()
    t["decode"] = time.perf_counter() - start
    args = {"imgsz": imgsz, "conf": 0.25, "classes": None, "verbose": False, "save": False}
    engine, _ = yolo_engines(load_model(weights), weights, device, half, args, frames[0].shape, batch)
    p = engine.predictor
    names = {int(k): str(v) for k, v in p.model.names.items()}

    def one_pass(timed: bool) -> None:
        with ResultsWriter(work / "split.jsonl", {"source": str(clip)}, jsonl=True) as writer:
            for i in range(0, len(frames), batch):
                part = frames[i : i + batch]
                marks = [time.perf_counter()]
                buf = engine.buffer((len(part), *engine.letterbox_shape(part[0].shape)))
                for f, slot in zip(part, np.asarray(buf)):
                    engine.letterbox_into(f, slot)
                marks.append(time.perf_counter())
                with torch.inference_mode():
                    im = buf.to(p.device, non_blocking=engine._pin)
                    sync()
                    marks.append(time.perf_counter())
                    im = im.permute(0, 3, 1, 2).contiguous().flip(1)
                    im = (im.half() if p.model.fp16 else im.float()).div_(255)
                    preds = p.inference(im)
                    sync()
                    marks.append(time.perf_counter())
                    first = preds[0] if isinstance(preds, (list, tuple)) else preds
                    results = batched_postprocess(p, first, im, part)
                marks.append(time.perf_counter())
                for j, r in enumerate(results):
                    writer.frame({"frame": i + j, "detections": detections_from(r, names, True)})
                marks.append(time.perf_counter())
                if timed:
                    for key, (a, b) in zip(("letterbox", "h2d", "forward", "postprocess", "json"), zip(marks, marks[1:])):
                        t[key] += b - a
            writer.finish({})

    engine._on_device(lambda: one_pass(False))  # warm-up: this thread's plans, the allocator's blocks
    engine._on_device(lambda: one_pass(True))
    n = len(frames)
    return {"frames": n, "batch": batch, "half": bool(p.model.fp16), "serial": True,
            "seconds": {k: round(v, 4) for k, v in t.items()},
            "fps": {k: (round(n / v, 1) if v > 0 else None) for k, v in t.items()},
            "ms_per_frame": {k: round(1000 * v / n, 3) for k, v in t.items()}}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    clip_arguments(ap, seconds=20.0)
    ap.add_argument("--batch", type=int, default=32, help="the batch of `yolo predict half=True` and of the in-memory predict")
    ap.add_argument("--runs", type=int, default=3, help="synapse runs per tree: the first is cold, the best of the rest warm")
    ap.add_argument("--predict-runs", type=int, default=2, help="runs of each `yolo predict` figure (best kept)")
    ap.add_argument("--clip", type=Path, help="use this clip instead of making one")
    ap.add_argument("--steps", default="", help="name=src,... source trees to measure first, each in a child process")
    ap.add_argument("--step-timeout", type=float, default=150.0)
    ap.add_argument("--skip", default="", help="comma-separated: predict, in_memory, forward, split, decode")
    ap.add_argument("--child-synapse", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, required=True, help="write every figure here as JSON")
    args = parse_gpu_args(ap)
    if not args.child_synapse:
        sys.path.insert(0, str(ROOT / "src"))  # a child imports the tree its PYTHONPATH names
    import synapse_cli
    from synapse_cli.jobs.infer.runtime import import_yolo
    from synapse_cli.jobs.infer.weights import default_weights

    yolo = import_yolo()  # offline, torchvision fallback where needed: the same ultralytics for every run
    weights = default_weights()
    gpu = Gpu(args.device)
    work = Path(tempfile.mkdtemp(prefix="synapse-bench-gpu-"))
    if args.child_synapse:
        found = synapse_runs(args.clip, args.imgsz, args.runs, work, gpu)
        found["imported_from"] = str(Path(synapse_cli.__file__).resolve())
        print(json.dumps(found))
        return 0
    device: int | str = "cpu" if args.device == "cpu" else int(args.device)
    half_ok = args.device != "cpu"
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    clip = args.clip or make_clip(work / "clip.mp4", args.seconds, args.width, args.height)
    frames = decode_all(clip)
    n = len(frames)
    print(f"clip {clip}: {n} frames {frames[0].shape[1]}x{frames[0].shape[0]}; device {gpu.name()}; weights {weights.name}", flush=True)
    report: dict = {"device": gpu.name(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "frames": n, "width": frames[0].shape[1],
                    "height": frames[0].shape[0], "imgsz": args.imgsz, "steps": {}}  # fmt: skip

    for item in [x for x in args.steps.split(",") if x.strip()]:
        name, _, src = item.partition("=")
        print(f"step {name}: {src}", flush=True)
        report["steps"][name] = step_in_child(name, Path(src), clip, args)
        print(f"  step {name}: {json.dumps({k: v for k, v in report['steps'][name].items() if k != 'runs'})}", flush=True)

    print("synapse (this tree, in this process)", flush=True)
    report["synapse"] = synapse_runs(clip, args.imgsz, args.runs, work, gpu)
    warm = report["synapse"]["best_of_rest"] or report["synapse"]["cold"]
    chosen_batch = warm["batch"]

    def predict_run(**kw) -> dict:
        start = time.perf_counter()
        model = yolo(str(weights))
        built = time.perf_counter()
        gpu.reset()
        count = sum(1 for _ in model.predict(source=str(clip), stream=True, verbose=False, save=False, imgsz=args.imgsz, device=device, **kw))
        end = time.perf_counter()
        assert count == n, (count, n)
        return {"fps": round(n / (end - built), 2), "wall_s": round(end - built, 3), "fps_with_model_construction": round(n / (end - start), 2),
                "wall_with_model_construction_s": round(end - start, 3), "gpu_peak_mib": gpu.peak_mib(), **kw}  # fmt: skip

    def in_memory_run() -> dict:
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

        frames_in = open_frames(inspect_source(str(clip)))
        start = time.perf_counter()
        count = sum(1 for _ in frames_in)
        frames_in.close()
        return {"fps": round(count / (time.perf_counter() - start), 1)}

    runs = {}
    if "decode" not in skip:
        runs["decode_only"] = decode_run
    if "predict" not in skip:
        runs["yolo_predict_default"] = lambda: predict_run()
        runs["yolo_predict_best"] = lambda: predict_run(half=half_ok, batch=args.batch)
    if "in_memory" not in skip:
        runs["ultralytics_in_memory_predict"] = in_memory_run
    for name, fn in runs.items():
        tries = []
        for _ in range(args.predict_runs):
            tries.append(fn())
            print(f"  {name:30s} {tries[-1]}", flush=True)
        report[name] = best(tries)
    if "forward" not in skip:
        report["forward_only"] = forward_only(weights, frames, chosen_batch, args.imgsz, half_ok, "cuda:0" if gpu.cuda else "cpu", gpu)
        print(f"  forward_only {report['forward_only']}", flush=True)
    if "split" not in skip:
        report["stage_split"] = stage_split(clip, weights, chosen_batch, args.imgsz, half_ok, "cuda:0" if gpu.cuda else "cpu", gpu, work)
        print(f"  stage_split {json.dumps(report['stage_split'])}", flush=True)

    s, cold = warm["fps"], report["synapse"]["cold"]["fps"]
    ratios: dict = {}
    for key, ref in (("vs_yolo_predict_default", "yolo_predict_default"), ("vs_yolo_predict_best", "yolo_predict_best"),
                     ("vs_in_memory_predict", "ultralytics_in_memory_predict"), ("vs_forward_only", "forward_only")):  # fmt: skip
        if ref in report:
            ratios[key] = round(s / report[ref]["fps"], 3)
            ratios[key + "_cold"] = round(cold / report[ref]["fps"], 3)
    if "yolo_predict_best" in report:
        ratios["vs_yolo_predict_best_with_its_model_construction"] = round(s / report["yolo_predict_best"]["fps_with_model_construction"], 3)
    report["ratios"] = ratios
    targets = {"vs_yolo_predict_best": 1.5, "vs_yolo_predict_default": 3.0, "vs_forward_only": 0.6}
    earlier = {"vs_yolo_predict_best": 1.0, "vs_in_memory_predict": 0.6}
    if gpu.cuda:
        report["targets_met"] = {k: ratios[k] >= v for k, v in targets.items() if k in ratios}
        report["targets_met"]["never_below_1x_best_cold"] = ratios.get("vs_yolo_predict_best_cold", 0) >= 1.0
        report["earlier_targets_met"] = {k: ratios[k] >= v for k, v in earlier.items() if k in ratios}
    else:
        report["targets_met"] = "n/a on the CPU"
    print(f"\n{'':32s}{'fps':>10s}{'GPU peak MiB':>14s}")
    rows = [(f"step {k} (cold / warm)", v) for k, v in report["steps"].items()]
    for label, r in rows:
        if "error" in r:
            print(f"{label:32s}  FAILED: {r['error'][-200:]}")
        else:
            w = r["best_of_rest"] or r["cold"]
            print(f"{label:32s}{r['cold']['fps']:10.1f} / {w['fps']:.1f}")
    print(f"{'synapse (cold / warm)':32s}{cold:10.1f} / {s:.1f}  batch {chosen_batch}")
    for name in [*runs, "forward_only"]:
        if name in report:
            r = report[name]
            print(f"{name:32s}{r['fps']:10.1f}{(r.get('gpu_peak_mib') or 0):14.0f}")
    print("ratios " + json.dumps(ratios))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
