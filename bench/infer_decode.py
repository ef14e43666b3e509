"""CPU decode + BGR conversion, frames per second: PyAV's ``to_ndarray(format="bgr24")`` per frame (what infer's
decoder did before) against ``BgrConverter`` (one reformatter per video) with ``threads=1`` (the default) and
``threads=0`` (swscale's choice), in the same process, alternating, best of ``--runs`` each; prints the ratios.

    python bench/infer_decode.py                    # a 10 s 1280x720 clip made with PyAV (infer_gpu.make_clip)
    python bench/infer_decode.py --clip some.mp4 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def decode(path: Path, convert) -> float:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as VideoFrames decodes
        start = time.perf_counter()
        n = sum(1 for frame in container.decode(stream) if convert(frame) is not None)
        return n / (time.perf_counter() - start)


def convert_only(frames: list, convert) -> float:
    """The conversion alone, on frames decoded beforehand."""
    start = time.perf_counter()
    for frame in frames:
        convert(frame)
    return len(frames) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", type=Path)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="1280x720")  # WIDTHxHEIGHT
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from synapse_cli.jobs.infer.sources import BgrConverter

    from infer_gpu import make_clip

    width, height = (int(v) for v in args.size.split("x"))
    clip = args.clip or make_clip(Path(tempfile.mkdtemp(prefix="synapse-decode-")) / "clip.mp4", args.seconds, width, height)
    import av

    with av.open(str(clip)) as container:
        frames = [f for _, f in zip(range(100), container.decode(video=0))]
    ways = {
        "to_ndarray": lambda: (lambda f: f.to_ndarray(format="bgr24")),  # what the decoder did before
        "reformatter_threads_1": lambda: BgrConverter(threads=1),  # what it does now
        "reformatter_threads_0": lambda: BgrConverter(threads=0),  # the same, swscale choosing its threads
    }
    whole: dict[str, list[float]] = {k: [] for k in ways}
    alone: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.runs):  # alternating, so a busy neighbour hurts every way alike
        for name, make in ways.items():
            whole[name].append(decode(clip, make()))
            alone[name].append(convert_only(frames, make()))
    report = {
        "clip": str(clip), "runs": args.runs, "cores": len(os.sched_getaffinity(0)), "pyav": av.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "decode_and_convert_fps": {k: round(max(v), 1) for k, v in whole.items()},
        "convert_only_fps": {k: round(max(v), 1) for k, v in alone.items()},
        "ratio_vs_to_ndarray": {f"{part}/{k}": round(max(d[k]) / max(d["to_ndarray"]), 3)
                                for part, d in (("decode_and_convert", whole), ("convert_only", alone)) for k in ways if k != "to_ndarray"},
        "all_runs": {"decode_and_convert": whole, "convert_only": alone},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
