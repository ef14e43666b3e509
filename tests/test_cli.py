from __future__ import annotations

import json
import subprocess
import sys

from synapse_cli import __version__
from tests.conftest import synapse_cmd


def test_version_and_module_entry_point():
    run = subprocess.run([*synapse_cmd(), "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"synapse {__version__}"


def test_help_imports_nothing_heavy():
    """synapse --help must stay fast: no rich, modal, torch or ultralytics at start-up."""
    code = (
        "import sys\n"
        "from synapse_cli.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "for cmd in ('export', 'config', 'doctor'):\n"
        "    try:\n        app([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in ('rich', 'modal', 'torch', 'ultralytics', 'av', 'numpy', 'httpx', 'ffmpeg') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY=\n" in run.stdout, run.stdout[-300:]


def test_doctor_finds_ffmpeg(cli):
    run = cli("doctor", "--json")
    assert run.exit_code == 0, run.stdout
    checks = json.loads(run.stdout)
    assert checks["ffmpeg"]["ok"] and "ffmpeg version" in checks["ffmpeg"]["detail"]
    assert checks["modal_credentials"]["ok"] is False
    assert checks["weights"]["ok"] and checks["weights"]["detail"].endswith("(bundled, sha256 verified)")
    configured = cli("doctor", "--json", env={"SYNAPSE_INFER_MODEL": "yolo11n.pt"})  # a bare name: never downloaded
    assert json.loads(configured.stdout)["weights"]["ok"] is False
    with_token = cli("doctor", "--json", env={"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": "as-1"})
    assert json.loads(with_token.stdout)["modal_credentials"]["ok"] is True


def test_doctor_reports_a_bad_ffmpeg_path(cli):
    run = cli("doctor", env={"SYNAPSE_FFMPEG": "/nonexistent/ffmpeg"})
    assert run.exit_code == 1 and "MISSING" in run.stdout
