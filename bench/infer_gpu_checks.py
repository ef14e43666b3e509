"""What `bench/infer_gpu.py` does not time: are batched and fp16 results the same, and does memory stay flat?

1. Equality on the device: for pose, detect and track, batch 1 in fp32 is the reference. Against it,
   batch auto in fp32 (boxes/keypoints within 1 px, confidences within 0.01) and batch auto in fp16
   (within 2 px / 0.02). Reports, per run, the frames whose class lists differ, the worst pixel and
   confidence differences over the frames that match (boxes and visible keypoints; keypoints neither run
   sees apart), where the worst one is, and whether the track summaries are equal. On a GPU, ultralytics'
   own predict in fp16 against fp32 is measured the same way, as the yardstick for fp16.
2. Memory: `run_yolo` on 300 and on 3,000 frames, each in a child process: the child's peak RSS
   (ru_maxrss) and torch's peak GPU memory. Target: within ±10 % from 300 to 3,000 frames.

CPU smoke run (proves the script works; the figures mean nothing for a GPU):
    python bench/infer_gpu_checks.py --device cpu --seconds 1 --width 320 --height 180 --imgsz 160 \
        --memory-frames 20 60 --memory-size 160x96 --out cpu-checks.json
GPU:
    python bench/infer_gpu_checks.py --out gpu-checks.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from infer_gpu import clip_arguments, make_clip, parse_gpu_args  # noqa: E402

CHILD = """\
import json, resource, sys, time
sys.path.insert(0, {src!r})
from synapse_cli.jobs.infer.job import InferSpec, run_yolo
start = time.perf_counter()
events = list(run_yolo(InferSpec(source={clip!r}, output={out!r}, task="pose", imgsz={imgsz}, overwrite=True)))
wall = time.perf_counter() - start
result = events[-1].result
print(json.dumps({{"frames": result["processed_frames"], "wall_s": round(wall, 3), "fps": round(result["processed_frames"] / wall, 1),
                  "batch": result.get("batch"), "half": result.get("half"), "device": result.get("device"),
                  "gpu_peak_mib": result.get("gpu_peak_mib"),
                  "rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""


def compare(ref: dict, other: dict, visible: float = 0.5) -> dict:
    """How far ``other`` is from ``ref``, detection by detection in order, over the frames whose class lists agree.

    Boxes and keypoints are reported apart: ``worst_px`` covers boxes and the keypoints both runs see
    (conf ≥ ``visible`` in either), ``worst_hidden_kp_px`` the keypoints neither sees, whose position the
    model only guesses. ``worst_at`` says where the worst difference is.
    """
    frames = differing = 0
    worst_px = worst_conf = worst_hidden = 0.0
    worst_at: dict = {}
    ids_equal = True
    for fa, fb in zip(ref["frames"], other["frames"]):
        frames += 1
        da, db = fa["detections"], fb["detections"]
        if [d["class"] for d in da] != [d["class"] for d in db]:
            differing += 1
            continue
        ids_equal &= [d.get("track_id") for d in da] == [d.get("track_id") for d in db]
        for i, (x, y) in enumerate(zip(da, db)):
            for p, q in zip(x["box"], y["box"]):
                if abs(p - q) > worst_px:
                    worst_px, worst_at = abs(p - q), {"frame": fa["frame"], "detection": i, "box": [x["box"], y["box"]]}
            worst_conf = max(worst_conf, abs(x["confidence"] - y["confidence"]))
            for kx, ky in zip(x.get("keypoints", []), y.get("keypoints", [])):
                d = max(abs(kx["x"] - ky["x"]), abs(kx["y"] - ky["y"]))
                if max(kx["conf"] or 0, ky["conf"] or 0) >= visible:
                    if d > worst_px:
                        worst_px, worst_at = d, {"frame": fa["frame"], "detection": i, "keypoint": [kx, ky]}
                else:
                    worst_hidden = max(worst_hidden, d)
    return {"frames": frames, "frames_equal_count": len(ref["frames"]) == len(other["frames"]), "frames_with_other_classes": differing,
            "worst_px": round(worst_px, 3), "worst_conf": round(worst_conf, 4), "worst_hidden_kp_px": round(worst_hidden, 3),
            "worst_at": worst_at, "track_ids_equal": ids_equal, "tracks_equal": ref.get("tracks") == other.get("tracks")}  # fmt: skip


def ultralytics_fp16_vs_fp32(clip: Path, imgsz: int, device: str) -> dict:
    """The same comparison for ultralytics' own ``model.predict``, batch 1, half=True against half=False:
    how far fp16 moves this model's outputs whoever runs it."""
    from synapse_cli.jobs.infer.results import detections_from
    from synapse_cli.jobs.infer.runtime import import_yolo
    from synapse_cli.jobs.infer.weights import default_weights

    from infer_gpu import decode_all

    frames = decode_all(clip)
    out = {}
    for half in (False, True):
        model = import_yolo()(str(default_weights()))
        names = {int(k): str(v) for k, v in model.names.items()}
        out[half] = {"frames": [{"frame": i, "detections": detections_from(model.predict(f, imgsz=imgsz, device=device, half=half, verbose=False)[0], names, True)}
                                for i, f in enumerate(frames)]}  # fmt: skip
    return compare(out[False], out[True])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    clip_arguments(ap, seconds=8.0)
    ap.add_argument("--memory-frames", type=int, nargs=2, default=[300, 3000])
    ap.add_argument("--memory-size", default="640x360")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = parse_gpu_args(ap)

    from synapse_cli.jobs.infer.job import InferSpec, run_yolo

    work = Path(tempfile.mkdtemp(prefix="synapse-gpu-checks-"))
    clip = make_clip(work / "clip.mp4", args.seconds, args.width, args.height)
    report: dict = {"equality": {}, "memory": {}}

    def run(task: str, batch: int, half: bool, name: str) -> tuple[dict, dict]:
        out = work / f"{task}-{name}.json"
        start = time.perf_counter()
        events = list(run_yolo(InferSpec(source=str(clip), output=str(out), task=task, imgsz=args.imgsz, batch=batch, half=half, overwrite=True)))
        result = events[-1].result
        return json.loads(out.read_text()), {"batch": result.get("batch"), "half": result.get("half"), "device": result.get("device"),
                                             "wall_s": round(time.perf_counter() - start, 2)}  # fmt: skip

    half_ok = args.device != "cpu"
    for task in ("pose", "detect", "track"):
        ref, ref_info = run(task, 1, False, "b1-fp32")
        row: dict = {"reference": ref_info, "detections": sum(len(f["detections"]) for f in ref["frames"])}
        variants = [("auto-fp32", 0, False, 1.0, 0.01)]
        if half_ok:
            variants.append(("auto-fp16", 0, True, 2.0, 0.02))
        for name, batch, half, px, conf in variants:
            other, info = run(task, batch, half, name)
            diff = compare(ref, other)
            diff["within_tolerance"] = (diff["frames_equal_count"] and diff["frames_with_other_classes"] == 0
                                        and diff["worst_px"] <= px and diff["worst_conf"] <= conf)  # fmt: skip
            diff["tolerance"] = {"px": px, "conf": conf}
            row[name] = {**info, **diff}
        report["equality"][task] = row
        if task == "pose" and half_ok:
            report["equality"]["ultralytics_fp16_vs_fp32_pose"] = ultralytics_fp16_vs_fp32(clip, args.imgsz, "cuda:0")
            print(f"ultralytics' own fp16 vs fp32: {json.dumps(report['equality']['ultralytics_fp16_vs_fp32_pose'])}", flush=True)
        print(f"equality {task}: {json.dumps(row)}", flush=True)

    if not args.skip_memory:
        width, height = (int(v) for v in args.memory_size.split("x"))
        for frames in args.memory_frames:
            mclip = make_clip(work / f"mem-{frames}.mp4", frames / 25, width, height)
            code = CHILD.format(src=str(ROOT / "src"), clip=str(mclip), out=str(work / f"mem-{frames}.jsonl"), imgsz=args.imgsz)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                report["memory"][str(frames)] = {"error": proc.stderr[-2000:]}
                print(f"memory {frames}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                continue
            report["memory"][str(frames)] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"memory {frames}: {report['memory'][str(frames)]}", flush=True)
        small, large = (report["memory"].get(str(n), {}) for n in args.memory_frames)
        for key in ("rss_peak_mib", "gpu_peak_mib"):
            if small.get(key) and large.get(key):
                report["memory"][f"{key}_growth"] = round(large[key] / small[key] - 1, 4)
        print(f"memory growth: rss {report['memory'].get('rss_peak_mib_growth')}, gpu {report['memory'].get('gpu_peak_mib_growth')} (target within ±0.10)")

    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
