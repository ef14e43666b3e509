"""`synapse export --no-modal` (framing, one static keyframe) ÷ the same crop/scale/encode as a plain ffmpeg command.

A 30 s 1280x720 clip with audio; both use the same ffmpeg binary, preset and crf.
Runs are interleaved and the median of each is compared. Target: ratio ≤ 1.03.
Usage: python bench/export.py [--runs 2] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import synapse_exe, timed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from synapse_cli.jobs._media import find_ffmpeg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=30)
    args = ap.parse_args()
    ffmpeg = find_ffmpeg(None)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        clip = work / "clip.mp4"
        subprocess.run(
            [ffmpeg, "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={args.seconds}",
             "-f", "lavfi", "-i", f"sine=frequency=440:duration={args.seconds}", "-c:v", "libx264", "-preset", "veryfast",
             "-c:a", "aac", "-shortest", str(clip)],
            check=True,
        )
        key = {"time": 0, "x": 437, "y": 0, "width": 405, "height": 720}
        params = work / "params.json"
        params.write_text(json.dumps({"keyframes": [key]}))
        ours = synapse_exe() + ["export", str(clip), "--job", "framing", "--params", str(params), "--no-modal",
                                "-o", str(work / "ours.mp4"), "--overwrite", "--no-cache"]  # every run encodes
        plain = [ffmpeg, "-v", "error", "-y", "-i", str(clip), "-vf",
                 f"crop={key['width']}:{key['height']}:{key['x']}:{key['y']},scale=810:1440:flags=bicubic,setsar=1",
                 "-c:v", "libx264", "-preset", "fast", "-crf", "23", "-pix_fmt", "yuv420p",
                 "-c:a", "aac", "-b:a", "160k", "-movflags", "+faststart", str(work / "plain.mp4")]
        env = {**os.environ, "SYNAPSE_FFMPEG": ffmpeg, "SYNAPSE_JOBS_DB": str(work / "jobs.sqlite3")}
        t_ours, t_plain = [], []
        for _ in range(args.runs):
            t_plain.append(timed(plain))
            t_ours.append(timed(ours, env=env))
        mo, mp = statistics.median(t_ours), statistics.median(t_plain)
        print(f"clip: {args.seconds} s 1280x720 + audio, framing to 810x1440, libx264 fast crf 23, {args.runs} runs each")
        print(f"synapse export   median {mo:7.2f} s   runs {', '.join(f'{t:.2f}' for t in t_ours)}")
        print(f"plain ffmpeg     median {mp:7.2f} s   runs {', '.join(f'{t:.2f}' for t in t_plain)}")
        print(f"ratio            {mo / mp:7.3f}   (target <= 1.03: {'ok' if mo / mp <= 1.03 else 'MISSED'})")


if __name__ == "__main__":
    main()
