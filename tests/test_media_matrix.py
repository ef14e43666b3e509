"""Real phone footage and other awkward inputs: every job on a matrix of clips made here with our ffmpeg.

Each job either succeeds on an input or refuses it with one line (UsageError/JobError, exit 2/1
through the CLI, no partial output). Rotated clips (display matrix side data, as phones record
portrait) are handled in displayed coordinates, the ones a player shows and infer reports: the
rotated cases check by pixel colour that an overlay ellipse and a framing crop land where asked.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from synapse_cli.errors import SynapseError
from synapse_cli.events import Artifact, Finished, Log, Progress, Started
from synapse_cli.jobs.export_video import ExportSpec, export_video
from tests.conftest import ffmpeg_exe, frame_at, probe

FPS = 15
# the coded frame: four coloured quadrants (RGB), so the displayed orientation shows in the output
QUADRANTS = {"tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 255)}
CODED_W, CODED_H = 320, 180


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def _testsrc(size: str = "320x180", seconds: float = 1.0, fps: int = FPS) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}"]


def _tone(seconds: float = 1.0, layout: str = "stereo", rate: int = 48000) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds},aformat=channel_layouts={layout}"]


H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]


def _quadrants(path: Path) -> Path:
    w, h = CODED_W // 2, CODED_H // 2
    colours = ["red", "lime", "blue", "white"]
    graph = ";".join(f"color=c={c}:size={w}x{h}:rate={FPS}:duration=1[{i}]" for i, c in enumerate(colours))
    graph += ";[0][1]hstack[t];[2][3]hstack[b];[t][b]vstack"
    _ffmpeg("-f", "lavfi", "-i", graph, *_tone(), *H264, "-c:a", "aac", "-shortest", str(path))
    return path


def _make(d: Path) -> dict[str, Path]:
    clips: dict[str, Path] = {}
    upright = _quadrants(d / "quadrants.mp4")
    clips["plain"] = upright
    for angle in (90, 180, 270):
        # -display_rotation writes the display matrix (counter-clockwise degrees), as a phone's muxer does
        clips[f"rot{angle}"] = d / f"rot{angle}.mp4"
        _ffmpeg("-display_rotation", str(angle), "-i", str(upright), "-c", "copy", str(clips[f"rot{angle}"]))
    clips["hevc10"] = d / "hevc10.mp4"
    _ffmpeg(*_testsrc(), *_tone(), "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le",
            "-x265-params", "log-level=error", "-tag:v", "hvc1", "-c:a", "aac", "-shortest", str(clips["hevc10"]))
    clips["prores_pcm"] = d / "prores.mov"
    _ffmpeg(*_testsrc(), *_tone(), "-c:v", "prores_ks", "-profile:v", "0", "-c:a", "pcm_s16le", "-shortest", str(clips["prores_pcm"]))
    clips["ts_offset"] = d / "offset.ts"
    _ffmpeg(*_testsrc(), *_tone(), *H264, "-c:a", "aac", "-shortest", "-output_ts_offset", "10", str(clips["ts_offset"]))
    clips["vfr"] = d / "vfr.mp4"  # drop frames unevenly: the gaps between timestamps vary
    _ffmpeg(*_testsrc(fps=30), "-vf", "select='not(eq(mod(n,5),1))*not(eq(mod(n,7),3))'", "-fps_mode", "vfr", *H264, str(clips["vfr"]))
    clips["surround"] = d / "surround.mp4"
    _ffmpeg(*_testsrc(), *_tone(layout="5.1"), *H264, "-c:a", "aac", "-shortest", str(clips["surround"]))
    clips["mp3_mkv"] = d / "mono.mkv"
    _ffmpeg(*_testsrc(), *_tone(layout="mono", rate=44100), *H264, "-c:a", "libmp3lame", "-shortest", str(clips["mp3_mkv"]))
    clips["vp9_webm"] = d / "vp9.webm"
    _ffmpeg(*_testsrc(), *_tone(), "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k",
            "-c:a", "libopus", "-shortest", str(clips["vp9_webm"]))
    clips["odd"] = d / "odd.mp4"  # 4:4:4, the H.264 that allows odd sizes
    _ffmpeg(*_testsrc(size="640x360", seconds=0.5), *_tone(0.5), "-vf", "scale=1279:719", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv444p",
            "-c:a", "aac", "-shortest", str(clips["odd"]))
    clips["short"] = d / "short.mp4"
    _ffmpeg(*_testsrc(seconds=0.2, fps=30), *_tone(0.2), *H264, "-c:a", "aac", "-shortest", str(clips["short"]))
    return clips


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> dict[str, Path]:
    return _make(tmp_path_factory.mktemp("matrix"))
