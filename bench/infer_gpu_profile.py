"""Where a batched `synapse infer` run spends its time, thread by thread (yappi, CPU clock).

Runs ``run_yolo`` (pose, batch auto) on a clip once to warm up, then once under yappi, and prints
each thread's CPU seconds, the process's CPU use against wall time, and the functions that cost the
most CPU of their own. Used to find what holds the GPU path below the model's ceiling.
    python bench/infer_gpu_profile.py --out profile.txt            (GPU; needs `pip install yappi`)
    python bench/infer_gpu_profile.py --device cpu --seconds 1 --width 320 --height 180 --imgsz 160 --out p.txt
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from infer_gpu import clip_arguments, make_clip, parse_gpu_args  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    clip_arguments(ap, seconds=20.0)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--out", type=Path, required=True)
    args = parse_gpu_args(ap)
    import yappi

    from synapse_cli.jobs.infer.job import InferSpec, run_yolo

    work = Path(tempfile.mkdtemp(prefix="synapse-gpu-profile-"))
    clip = make_clip(work / "clip.mp4", args.seconds, args.width, args.height)

    def once() -> tuple[dict, float, float]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        events = list(run_yolo(InferSpec(source=str(clip), output=str(work / "out.jsonl"), task="pose", imgsz=args.imgsz, overwrite=True)))
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        return events[-1].result, wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

    once()  # warm-up: cudnn, the batch probe's first allocations
    plain, plain_wall, plain_cpu = once()
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True)
    result, wall, cpu = once()
    yappi.stop()
    buf = io.StringIO()
    print(f"without profiler: loop {plain['fps']} fps, wall {plain_wall:.2f} s, process CPU {plain_cpu:.2f} s ({plain_cpu / plain_wall:.2f} cores)", file=buf)
    print(f"under yappi:      loop {result['fps']} fps, wall {wall:.2f} s, process CPU {cpu:.2f} s; batch {result['batch']}, half {result['half']}", file=buf)
    print("\nthreads (CPU s):", file=buf)
    for t in sorted(yappi.get_thread_stats(), key=lambda t: -t.ttot):
        print(f"  {t.name:28s} {t.ttot:8.3f}  (sched {t.sched_count})", file=buf)
    stats = yappi.get_func_stats()
    stats.sort("tsub", "desc")
    print(f"\ntop {args.top} functions by own CPU (tsub) / with callees (ttot), all threads:", file=buf)
    for s in list(stats)[: args.top]:
        print(f"  {s.tsub:8.3f} {s.ttot:8.3f} {s.ncall:8d}  {s.module.split('site-packages/')[-1]}:{s.lineno} {s.name}", file=buf)
    stats.sort("ttot", "desc")
    print(f"\ntop {args.top} by ttot:", file=buf)
    for s in list(stats)[: args.top]:
        print(f"  {s.tsub:8.3f} {s.ttot:8.3f} {s.ncall:8d}  {s.module.split('site-packages/')[-1]}:{s.lineno} {s.name}", file=buf)
    args.out.write_text(buf.getvalue())
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
