"""synapse export end to end: real ffmpeg, real files, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from synapse_cli.events import Artifact, Finished, Log, Progress, Started
from synapse_cli.jobs.export.job import ExportSpec, export_video
from tests.conftest import INTERRUPTIBLE, frame_at, probe, synapse_cmd


def run_job(spec: ExportSpec) -> list:
    return list(export_video(spec))


def assert_stream_shape(events: list) -> None:
    assert isinstance(events[0], Started) and events[0].job == "export"
    assert isinstance(events[-1], Finished)
    done = [e.done for e in events if isinstance(e, Progress)]
    assert done, "no progress events"
    assert done == sorted(done), "progress went backwards"
    assert done[-1] == events[0].total
    assert any(isinstance(e, Artifact) for e in events)


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and ".part" in p.name]


# -- the three jobs ------------------------------------------------------------------


def test_framing_default_is_a_centred_9x16_reel(clips, tmp_path):
    out = tmp_path / "reel.mp4"
    events = run_job(ExportSpec(input=str(clips["landscape"]), output=str(out), job="framing", preset="ultrafast"))
    assert_stream_shape(events)
    info = probe(out)
    assert (info.width, info.height) == (810, 1440)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert abs(info.duration - 2.0) < 0.1
    assert events[-1].result["output"] == str(out)
    assert no_leftovers(tmp_path) == []


def test_framing_crop_window_follows_keyframes(clips, tmp_path):
    """Left half red, right half blue: the window moves from left to right, so the colour must too."""
    out = tmp_path / "moving.mp4"
    params = {
        "keyframes": [
            {"time": 0.0, "x": 0, "y": 0, "width": 200, "height": 356},
            {"time": 2.0, "x": 440, "y": 0, "width": 200, "height": 356},
        ],
        "interpolation": "catmull-rom",
        "output_width": 180,
        "output_height": 320,
    }
    run_job(ExportSpec(input=str(clips["halves"]), output=str(out), job="framing", params=params, preset="ultrafast"))
    first, last = frame_at(out, 0.0), frame_at(out, 1.95)
    assert first.shape[:2] == (320, 180)
    r0, _, b0 = first.reshape(-1, 3).mean(axis=0)
    r1, _, b1 = last.reshape(-1, 3).mean(axis=0)
    assert r0 > 200 and b0 < 60, (r0, b0)  # starts on the red half
    assert b1 > 200 and r1 < 60, (r1, b1)  # ends on the blue half


def test_framing_zoom_changes_crop_size(clips, tmp_path):
    """A window growing across the red/blue border: more blue enters the frame as it widens."""
    out = tmp_path / "zoom.mp4"
    params = {
        "keyframes": [
            {"time": 0.0, "x": 220, "y": 100, "width": 100, "height": 100},
            {"time": 1.9, "x": 20, "y": 0, "width": 600, "height": 360},
        ],
        "output_width": 160,
        "output_height": 160,
    }
    run_job(ExportSpec(input=str(clips["halves"]), output=str(out), job="framing", params=params, preset="ultrafast"))
    early, late = frame_at(out, 0.0), frame_at(out, 1.95)
    assert early[:, :, 2].mean() < 30  # only red at first
    assert 90 < late[:, :, 2].mean() < 170  # about half blue at the end


def test_framing_segments_trim_and_change_speed(clips, tmp_path):
    out = tmp_path / "segments.mp4"
    params = {"segments": [{"start": 0.0, "end": 1.0, "speed": 2.0}, {"start": 1.0, "end": 1.5, "speed": 0.5}]}
    events = run_job(ExportSpec(input=str(clips["landscape"]), output=str(out), job="framing", params=params, preset="ultrafast"))
    assert_stream_shape(events)
    info = probe(out)
    assert abs(info.duration - 1.5) < 0.15, info.duration  # 1.0/2 + 0.5/0.5
    assert info.has_audio


def test_out_of_frame_keyframe_is_clamped_and_reported(clips, tmp_path):
    out = tmp_path / "clamped.mp4"
    params = {"keyframes": [{"time": 0, "x": 600, "y": -50, "width": 300, "height": 500}]}
    events = run_job(ExportSpec(input=str(clips["landscape"]), output=str(out), job="framing", params=params, preset="ultrafast"))
    logs = [e for e in events if isinstance(e, Log)]
    assert logs and "clamped" in logs[0].message and logs[0].level == "warning"
    assert probe(out).width == 810


def test_rotate_and_portrait_input(clips, tmp_path):
    out = tmp_path / "rot.mp4"
    events = run_job(ExportSpec(input=str(clips["portrait"]), output=str(out), job="framing", params={"rotate": 90, "output_width": 360, "output_height": 640}, preset="ultrafast"))
    assert_stream_shape(events)
    assert (probe(out).width, probe(out).height) == (360, 640)


def test_silent_input_gives_silent_output(clips, tmp_path):
    for job, params in [("framing", {}), ("annotate", {"clips": [{"start": 0, "end": 1, "title": "t", "rating": "!"}]}),
                        ("overlay", {"keyframes": [{"time": 0, "x": 100, "y": 100, "radius_x": 50, "radius_y": 50}]})]:
        out = tmp_path / f"silent.{job}.mp4"
        run_job(ExportSpec(input=str(clips["silent"]), output=str(out), job=job, params=params, preset="ultrafast"))
        assert not probe(out).has_audio


def audio_packets(path: Path) -> list[str]:
    """The audio stream's packets as ffmpeg reads them, uncoded: (timestamp, size, hash) per packet."""
    from tests.conftest import ffmpeg_exe

    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a", "-c", "copy", "-f", "framemd5", "-"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if line and not line.startswith("#")]


OVERLAY = {"keyframes": [{"time": 0, "x": 100, "y": 100, "radius_x": 50, "radius_y": 50}]}
SMALL_REEL = {"output_width": 180, "output_height": 320}  # the audio is under test, not the picture: a cheap encode


@pytest.mark.parametrize("job,params", [("framing", SMALL_REEL), ("overlay", OVERLAY)])
@pytest.mark.parametrize("shards", [1, 2])
def test_audio_the_job_leaves_untouched_is_copied_packet_for_packet(cli, clips, tmp_path, job, params, shards):
    """framing without segments and overlay keep the input's timeline: its AAC is copied, not re-encoded (no loss, no encode)."""
    src = clips["landscape"]
    out = tmp_path / "copied.mp4"
    (tmp_path / "params.json").write_text(json.dumps(params))
    run = cli("export", src, "--job", job, "--params", tmp_path / "params.json", "-o", out, "--shards", shards, "--no-cache",
              "--json", env={"SYNAPSE_FFMPEG_PRESET": "ultrafast"})  # fmt: skip
    assert run.exit_code == 0, run.stderr
    assert run.events()[-1]["result"]["audio"] is True
    packets = audio_packets(src)
    assert len(packets) > 50 and audio_packets(out) == packets


def test_audio_a_segment_re_times_is_encoded_not_copied(clips, tmp_path):
    out = tmp_path / "fast.mp4"
    params = {"segments": [{"start": 0.0, "end": 2.0, "speed": 2.0}]}
    run_job(ExportSpec(input=str(clips["landscape"]), output=str(out), job="framing", params=params, preset="ultrafast"))
    source, packets = audio_packets(clips["landscape"]), audio_packets(out)
    assert probe(out).audio_codec == "aac"
    assert abs(len(packets) - len(source) / 2) <= 3  # half the samples (2x speed): encoded, since a copy keeps every packet


def test_overlay_dims_outside_the_ellipse(clips, tmp_path):
    out = tmp_path / "overlay.mp4"
    params = {
        "keyframes": [{"time": 0, "x": 320, "y": 180, "radius_x": 100, "radius_y": 80}],
        "effect": "dark_overlay",
        "stroke_width": 0,
        "text": "Player 7: 100% 'focus'",
    }
    events = run_job(ExportSpec(input=str(clips["gray"]), output=str(out), job="overlay", params=params, preset="ultrafast"))
    assert_stream_shape(events)
    info = probe(out)
    assert (info.width, info.height) == (640, 360)
    frame = frame_at(out, 0.5)
    inside = frame[170:190, 310:330].mean()
    outside = frame[330:350, 20:60].mean()
    assert inside > 110 and outside < 80, (inside, outside)


def test_overlay_brightness_boost_and_stroke(clips, tmp_path):
    out = tmp_path / "boost.mp4"
    params = {
        "keyframes": [{"time": 0, "x": 320, "y": 180, "radius_x": 100, "radius_y": 80}],
        "effect": "brightness_boost",
        "stroke_color": "red",
        "stroke_width": 8,
    }
    run_job(ExportSpec(input=str(clips["gray"]), output=str(out), job="overlay", params=params, preset="ultrafast"))
    frame = frame_at(out, 0.5).astype(int)
    assert frame[175:185, 315:325].mean() > frame[330:350, 20:60].mean() + 20  # brighter inside
    ring = frame[178:182, 418:422]  # right edge of the ellipse: x = 320 + 100
    assert ring[..., 0].mean() > ring[..., 1].mean() + 60  # red stroke


def test_annotate_concatenates_clips_with_rating_border(clips, tmp_path):
    out = tmp_path / "annotated.mp4"
    params = {
        "clips": [
            {"start": 0.0, "end": 0.5, "title": "Great rally", "notes": "cross-court", "rating": "!!"},
            {"start": 1.0, "end": 1.8, "title": "Unforced error", "rating": "??"},
        ]
    }
    events = run_job(ExportSpec(input=str(clips["landscape"]), output=str(out), job="annotate", params=params, preset="ultrafast"))
    assert_stream_shape(events)
    info = probe(out)
    assert abs(info.duration - 1.3) < 0.15 and info.has_audio
    # the right border, in the second clip ("??": red 0xca3431); testsrc2 is cyan there, so only a border makes it red
    frame = frame_at(out, 1.0).astype(int)
    border, inside = frame[180, 636], frame[180, 600]
    assert border[0] > 150 and border[1] < 110 and border[2] < 110, border
    assert inside[0] < 60 and inside[1] > 200 and inside[2] > 200, inside  # past the 12 px border: the source's cyan


# -- the CLI -------------------------------------------------------------------------


def test_cli_json_stream_and_default_output(cli, clips, tmp_path):
    src = tmp_path / "match.mp4"
    src.write_bytes(clips["silent"].read_bytes())
    run = cli("export", src, "--job", "framing", "--json", "--no-modal", "--set", "output_width=360", "--set", "output_height=640")
    assert run.exit_code == 0, run.stderr
    events = run.events()  # every stdout line is JSON
    assert events[0]["type"] == "started" and events[-1]["type"] == "finished"
    assert {"progress", "artifact"} <= {e["type"] for e in events}
    assert events[-1]["result"]["output"] == str(tmp_path / "match.framing.mp4")
    assert (tmp_path / "match.framing.mp4").exists()


def test_cli_plain_mode_result_on_stdout_progress_on_stderr(cli, clips, tmp_path):
    out = tmp_path / "o.mp4"
    run = cli("export", clips["silent"], "-o", out, "--params", _params_file(tmp_path, {"output_width": 180, "output_height": 320}))
    assert run.exit_code == 0
    assert run.stdout.strip() == str(out)
    assert "export:" in run.stderr and "%" in run.stderr


def test_config_file_sets_default_job_and_output_dir(cli, clips, tmp_path, monkeypatch):
    outdir = tmp_path / "exports"
    outdir.mkdir()
    (tmp_path / ".synapse.toml").write_text(f'[export]\ndefault_job = "annotate"\noutput_dir = "{outdir}"\n[ffmpeg]\npreset = "ultrafast"\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # found from the working directory upward
    run = cli("export", clips["silent"], "--set", 'clips=[{"start":0,"end":0.5}]')
    assert run.exit_code == 0, run.stderr
    assert (outdir / "silent.annotate.mp4").exists()


def _params_file(folder: Path, params) -> Path:
    path = folder / "params.json"
    path.write_text(json.dumps(params) if not isinstance(params, str) else params)
    return path


@pytest.mark.parametrize(
    "case, code, fragment",
    [
        ("missing file", 2, "input not found"),
        ("text file named .mp4", 2, "not readable media"),
        ("bad json params", 2, "not valid JSON"),
        ("unknown job", 2, "unknown --job"),
        ("negative keyframe size", 2, "params.keyframes[0].width"),
        ("existing output", 2, "already exists"),
        ("unwritable output dir", 2, "does not exist"),
        ("bad toml", 2, "bad TOML"),
        ("unknown config key", 2, "unknown config key 'ffmpeg.colour'"),
        ("bad config value", 2, "ffmpeg.crf"),
        ("use modal without credentials", 3, "no Modal credentials"),
        ("truncated mp4", 1, "ffmpeg exited"),
    ],
)
def test_bad_input_one_line_and_exit_code(case, code, fragment, cli, clips, tmp_path):
    src, args = clips["silent"], []
    out = tmp_path / "out.mp4"
    if case == "missing file":
        src = tmp_path / "nope.mp4"
    elif case == "text file named .mp4":
        src = tmp_path / "notes.mp4"
        src.write_text("not a video\n")
    elif case == "bad json params":
        args = ["--params", _params_file(tmp_path, "{nope")]
    elif case == "unknown job":
        args = ["--job", "dance"]
    elif case == "negative keyframe size":
        args = ["--set", 'keyframes=[{"time":0,"x":0,"y":0,"width":-5,"height":10}]']
    elif case == "existing output":
        out.write_bytes(b"precious")
    elif case == "unwritable output dir":
        out = tmp_path / "missing-dir" / "out.mp4"
    elif case == "bad toml":
        (Path.cwd() / ".synapse.toml").write_text("[ffmpeg\npreset=")
    elif case == "unknown config key":
        (Path.cwd() / ".synapse.toml").write_text('[ffmpeg]\ncolour = "red"\n')
    elif case == "bad config value":
        (Path.cwd() / ".synapse.toml").write_text("[ffmpeg]\ncrf = 99\n")
    elif case == "use modal without credentials":
        args = ["--use-modal"]
    elif case == "truncated mp4":
        src = tmp_path / "cut.mp4"
        data = clips["landscape"].read_bytes()
        src.write_bytes(data[: len(data) // 2])  # faststart: the index survives, the media does not
        args = ["--params", _params_file(tmp_path, SMALL_REEL)]  # its first half encoded at 180x320, not 810x1440 (preset fast)
    run = cli("export", src, "-o", out, *args)
    assert run.exit_code == code, (run.exit_code, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert fragment in lines[-1], run.stderr
    assert len([ln for ln in lines if not ln.startswith("export:")]) == 1, run.stderr  # one error line
    assert "Traceback" not in run.stderr
    if case == "existing output":
        assert out.read_bytes() == b"precious"
    elif out.parent.exists():
        assert not out.exists() and no_leftovers(out.parent) == []


def test_json_error_is_the_last_stdout_line(cli, tmp_path):
    run = cli("export", tmp_path / "nope.mp4", "--json")
    assert run.exit_code == 2
    last = run.events()[-1]
    assert last == {"type": "error", "code": 2, "message": f"input not found: {tmp_path / 'nope.mp4'}", "error": "UsageError"}
    assert "UsageError" in run.stderr


@pytest.mark.slow
def test_ctrl_c_kills_ffmpeg_and_leaves_nothing(clips, tmp_path):
    """SIGINT to a running `synapse export`: exit 130, no temp file, no output, no ffmpeg left."""
    from tests.conftest import make_clip

    # a small picture, cheap to make, that takes many seconds to encode at 810x1440 (preset medium): still
    # running when SIGINT lands, and only its first second of work is spent
    src = make_clip(tmp_path / "long.mp4", size="160x90", seconds=20, audio=True)
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen(
        [*synapse_cmd(), "export", str(src), "-o", str(out), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SYNAPSE_FFMPEG_PRESET": "medium"},
        **INTERRUPTIBLE,
    )
    for line in proc.stdout:  # wait for real progress, so ffmpeg is running
        if json.loads(line)["type"] == "progress":
            break
    assert any(p.name.startswith(".out.") for p in tmp_path.iterdir()), "no temp file while running"
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert json.loads(rest.strip().splitlines()[-1])["code"] == 130
    assert err.strip().splitlines()[-1] == "Interrupted: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]
    time.sleep(0.2)
    ps = subprocess.run(["pgrep", "-f", str(out.parent)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "ffmpeg child survived"


def test_a_signal_while_ffmpeg_starts_is_held_until_ffmpeg_can_be_stopped():
    """Ctrl-C, or the SIGTERM a shard's worker turns into one, landing inside ``subprocess.Popen`` would
    lose the ffmpeg it had just started (it ran on, writing the job's files): run_ffmpeg holds both
    signals for that instant, and they take effect once the process can be killed."""
    from synapse_cli.jobs._media import interrupts_held

    # Python's own Ctrl-C handler, whatever this test run inherited (a background job's SIGINT is ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                signal.raise_signal(signal.SIGINT)
                reached.append("the block ran to its end")
        assert reached == ["the block ran to its end"]
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, inherited)

    came: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: came.append(signum))  # as a worker's handler
    try:
        with interrupts_held():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            assert came == []
        assert came == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
