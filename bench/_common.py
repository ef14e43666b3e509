"""Helpers for the benchmarks: they print ratios against a reference run in the same process."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def synapse_exe() -> list[str]:
    """The installed console script if present (what users run), else ``python -m synapse_cli``."""
    script = Path(sys.executable).with_name("synapse")
    return [str(script)] if script.exists() else ([shutil.which("synapse")] if shutil.which("synapse") else [sys.executable, "-m", "synapse_cli"])


def timed(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def median_of(cmd: list[str], runs: int, **kwargs) -> float:
    return statistics.median(timed(cmd, **kwargs) for _ in range(runs))


def make_test_clip(ffmpeg: str, path: Path, seconds: float) -> Path:
    """A 1280x720 30 fps test pattern with a 440 Hz tone (H.264 veryfast + AAC): the clip the export benches encode."""
    subprocess.run(
        [ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:v", "libx264", "-preset", "veryfast",
         "-c:a", "aac", "-shortest", str(path)],
        check=True,
    )  # fmt: skip
    return path
