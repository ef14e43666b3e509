from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import typer

from synapse_cli.cli._options import CONFIG, JSON, PROFILE, Common
from synapse_cli.cli._run import exit_on_error, settings_for
from synapse_cli.errors import SynapseError


def _ffmpeg(settings) -> dict[str, Any]:
    from synapse_cli.jobs._media import find_ffmpeg

    try:
        exe = find_ffmpeg(settings["ffmpeg.path"])
    except SynapseError as exc:
        return {"ok": False, "detail": str(exc)}
    try:
        first = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "detail": f"{exe} does not run: {exc}"}
    origin = "configured" if settings["ffmpeg.path"] else ("imageio-ffmpeg" if "imageio_ffmpeg" in exe else "PATH")
    return {"ok": True, "detail": f"{exe} ({origin}): {first}"}


def _modal_credentials() -> dict[str, Any]:
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return {"ok": True, "detail": "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET set in the environment"}
    path = Path(os.environ.get("MODAL_CONFIG_PATH", Path.home() / ".modal.toml"))
    if path.is_file():
        return {"ok": True, "detail": f"profile file {path}"}
    return {"ok": False, "detail": "none: run `modal token new` or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (needed for --use-modal only)"}


def doctor(json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None) -> None:
    """Check what synapse needs: ffmpeg (which one, version), the config file, Modal credentials.

    Exits 1 if something a local export needs is missing.
    """
    with exit_on_error(json_output):
        settings = settings_for(Common(config=config, profile=profile))
        checks = {
            "ffmpeg": _ffmpeg(settings),
            "config": {"ok": True, "detail": str(settings.config_path) if settings.config_path else "no .synapse.toml found (defaults apply)"},
            "modal_credentials": _modal_credentials(),
        }
        if json_output:
            typer.echo(json.dumps(checks))
        else:
            for name, check in checks.items():
                mark = "ok  " if check["ok"] else "MISSING" if name != "modal_credentials" else "--  "
                typer.echo(f"{mark:<7} {name:<18} {check['detail']}")
        if not checks["ffmpeg"]["ok"]:
            raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.command("doctor")(doctor)
