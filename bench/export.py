"""`synapse export --no-modal` (framing, one static keyframe) ÷ the same crop/scale/encode as a plain ffmpeg command.

A 1280x720 clip with audio (30 s by default; `--short` is the 6 s clip of issue #11); both use the
same ffmpeg binary, preset and crf. Runs are interleaved and the median of each is compared.
Targets: ratio ≤ 1.03 on 30 s, ≤ 1.08 on 6 s.

It also prints synapse's fixed cost, which the machine's load moves much less than the ratio:
from launch to the start of its ffmpeg, and from ffmpeg's exit to its own, timed in extra runs
whose ffmpeg is a shell script that notes the time and runs the real binary (the script's own
start, a few ms, is counted in "before"). `--baseline SRC` interleaves a second checkout's
`src` (e.g. the main branch's) in every measurement, for a before/after on the same load.

Each tree's .py files are compiled first (an installed package has its .pyc files); the load
average is printed before and after.

Usage: python bench/export.py [--runs 5] [--seconds 30 | --short] [--baseline ../main/src]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import make_test_clip, synapse_exe, timed

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))
from synapse_cli.jobs._media import find_ffmpeg  # noqa: E402

SHIM = """#!/bin/sh
echo "start $(date +%s.%N)" >> "{log}"
"{ffmpeg}" "$@"
rc=$?
echo "end $(date +%s.%N)" >> "{log}"
exit $rc
"""


def fixed_cost(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(launch → ffmpeg starts, ffmpeg exits → synapse exits), in seconds, for one run through the shim."""
    log.unlink(missing_ok=True)
    start = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    end = time.time()
    marks = dict(line.split() for line in log.read_text().splitlines())
    return float(marks["start"]) - start, end - float(marks["end"])


def ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--short", action="store_true", help="the 6 s clip (same as --seconds 6)")
    ap.add_argument("--baseline", type=Path, help="another checkout's src/ to interleave (before/after)")
    args = ap.parse_args()
    seconds = 6 if args.short else args.seconds
    target = 1.08 if seconds <= 10 else 1.03
    ffmpeg = find_ffmpeg(None)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        clip = make_test_clip(ffmpeg, work / "clip.mp4", seconds)
        key = {"time": 0, "x": 437, "y": 0, "width": 405, "height": 720}
        params = work / "params.json"
        params.write_text(json.dumps({"keyframes": [key]}))
        ours = synapse_exe() + ["export", str(clip), "--job", "framing", "--params", str(params), "--no-modal",
                                "-o", str(work / "ours.mp4"), "--overwrite", "--no-cache"]  # every run encodes
        # the same work as synapse: the audio a framing leaves as it is is copied, not encoded
        plain = [ffmpeg, "-v", "error", "-y", "-i", str(clip), "-vf",
                 f"crop={key['width']}:{key['height']}:{key['x']}:{key['y']},scale=810:1440:flags=bicubic,setsar=1",
                 "-c:v", "libx264", "-preset", "fast", "-crf", "23", "-pix_fmt", "yuv420p",
                 "-c:a", "copy", "-movflags", "+faststart", str(work / "plain.mp4")]  # fmt: skip
        base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base_env.update(SYNAPSE_FFMPEG=ffmpeg, SYNAPSE_JOBS_DB=str(work / "jobs.sqlite3"))
        trees = {"synapse export": SRC} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
        envs = {name: {**base_env, "PYTHONPATH": os.pathsep.join([str(src), base_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
                for name, src in trees.items()}  # fmt: skip
        log = work / "shim.log"
        shim = work / "ffmpeg-shim"
        shim.write_text(SHIM.format(log=log, ffmpeg=ffmpeg))
        shim.chmod(0o755)
        load_before = os.getloadavg()
        for src in trees.values():  # .pyc files, as an installed package has them
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True, stdout=subprocess.DEVNULL)
        walls: dict[str, list[float]] = {"plain ffmpeg": [], **{name: [] for name in envs}}
        fixed: dict[str, list[tuple[float, float]]] = {name: [] for name in envs}
        for _ in range(args.runs):
            walls["plain ffmpeg"].append(timed(plain))
            for name, env in envs.items():
                walls[name].append(timed(ours, env=env))
            for name, env in envs.items():
                fixed[name].append(fixed_cost(ours, {**env, "SYNAPSE_FFMPEG": str(shim)}, log))
        load_after = os.getloadavg()
        mp = statistics.median(walls["plain ffmpeg"])
        print(f"clip: {seconds} s 1280x720 + audio, framing to 810x1440, libx264 fast crf 23, {args.runs} runs each, interleaved")
        print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min), {os.cpu_count()} cores")
        for name, values in walls.items():
            m = statistics.median(values)
            ratio = f"ratio {m / mp:6.3f}" if name != "plain ffmpeg" else ""
            print(f"{name:16} median {m:7.2f} s   {ratio:14} runs {', '.join(f'{t:.2f}' for t in values)}")
        for name, pairs in fixed.items():
            before, after = [b for b, _ in pairs], [a for _, a in pairs]
            print(f"{name:16} to ffmpeg start median {statistics.median(before) * 1000:4.0f} ms (runs {ms(before)}); "
                  f"after ffmpeg exit median {statistics.median(after) * 1000:4.0f} ms (runs {ms(after)})")  # fmt: skip
        ratio = statistics.median(walls["synapse export"]) / mp
        print(f"ratio            {ratio:7.3f}   (target <= {target}: {'ok' if ratio <= target else 'MISSED'})")


if __name__ == "__main__":
    main()
