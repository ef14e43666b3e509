"""CPU decode + BGR conversion, frames per second: PyAV's ``to_ndarray(format="bgr24")`` per frame (what infer's
decoder did before) against ``BgrConverter`` (one reformatter per video, ``threads=1``), in the same process,
alternating, best of ``--runs`` each; prints the ratio.

    python bench/infer_decode.py                    # a 10 s 1280x720 testsrc2 clip made with ffmpeg
    python bench/infer_decode.py --clip some.mp4 --runs 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def make_clip(path: Path, seconds: float, size: str) -> Path:
    from synapse_cli.jobs._media import find_ffmpeg

    subprocess.run([find_ffmpeg(), "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)], check=True)  # fmt: skip
    return path


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
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from synapse_cli.jobs.infer.sources import BgrConverter

    clip = args.clip or make_clip(Path(tempfile.mkdtemp(prefix="synapse-decode-")) / "clip.mp4", args.seconds, args.size)
    import av

    with av.open(str(clip)) as container:
        frames = [f for _, f in zip(range(100), container.decode(video=0))]
    before, after, conv_before, conv_after = [], [], [], []
    for _ in range(args.runs):  # alternating, so a busy neighbour hurts both alike
        before.append(decode(clip, lambda f: f.to_ndarray(format="bgr24")))
        after.append(decode(clip, BgrConverter()))
        conv_before.append(convert_only(frames, lambda f: f.to_ndarray(format="bgr24")))
        conv_after.append(convert_only(frames, BgrConverter()))
    report = {
        "clip": str(clip), "runs": args.runs, "cores": len(__import__("os").sched_getaffinity(0)), "pyav": av.__version__,
        "decode_and_convert": {"to_ndarray_fps": round(max(before), 1), "reformatter_fps": round(max(after), 1),
                               "ratio": round(max(after) / max(before), 3)},
        "convert_only": {"to_ndarray_fps": round(max(conv_before), 1), "reformatter_fps": round(max(conv_after), 1),
                         "ratio": round(max(conv_after) / max(conv_before), 3)},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
