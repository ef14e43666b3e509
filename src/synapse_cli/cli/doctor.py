from __future__ import annotations

import json
import subprocess
from typing import Any

import typer

from synapse_cli.cli._options import CONFIG, JSON, PROFILE
from synapse_cli.cli._run import exit_on_error
from synapse_cli.pipeline import RunOptions, settings_for
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
    from synapse_cli.backends.modal import credentials_source  # no modal import: it reads env and ~/.modal.toml

    source = credentials_source()
    if source:
        return {"ok": True, "detail": source}
    return {"ok": False, "detail": "none: run `modal token new` or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (needed for --use-modal only)"}


def _weights(settings) -> dict[str, Any]:
    """The model synapse infer uses: the configured file, or the bundled yolo11n-pose.pt (sha256-checked)."""
    try:
        from synapse_cli.jobs.infer.weights import resolve_model

        path = resolve_model(settings["infer.model"])
    except SynapseError as exc:
        return {"ok": False, "detail": str(exc)}
    return {"ok": True, "detail": f"{path} ({'infer.model' if settings['infer.model'] else 'bundled, sha256 verified'})"}


def _storage(settings) -> dict[str, Any]:
    """The [storage] settings and which AWS_* variables are set (names only); with SYNAPSE_DOCTOR_BUCKET=name,
    whether that bucket answers (one listing request)."""
    import os

    from synapse_cli.storage.client import Storage

    try:
        storage = Storage.from_settings(settings)
        info = storage.describe()
    except SynapseError as exc:
        return {"ok": False, "detail": str(exc)}
    creds = ", ".join(info["credentials"]) or "no AWS_* credentials in the environment"
    detail = f"endpoint {info['endpoint']}, region {info['region']}, path-style {info['path_style']}, allow_http {info['allow_http']}; {creds}"
    bucket = os.environ.get("SYNAPSE_DOCTOR_BUCKET")
    if not bucket:
        return {"ok": bool(info["credentials"]), "detail": detail}
    from synapse_cli.storage.urls import parse_s3

    try:
        url = parse_s3(f"s3://{bucket}/", "SYNAPSE_DOCTOR_BUCKET")
        storage.ping(url)
    except SynapseError as exc:
        return {"ok": False, "detail": f"{detail}; bucket {bucket}: {exc}"}
    return {"ok": True, "detail": f"{detail}; bucket {bucket} answers"}


def doctor(json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None) -> None:
    """Check what synapse needs: ffmpeg (which one, version), the config file, the infer weights, Modal credentials,
    the [storage] settings (SYNAPSE_DOCTOR_BUCKET=name: also whether that bucket answers).

    Exits 1 if something a local export needs is missing.
    """
    with exit_on_error(json_output):
        settings = settings_for(RunOptions(config=config, profile=profile))
        checks = {
            "ffmpeg": _ffmpeg(settings),
            "config": {"ok": True, "detail": str(settings.config_path) if settings.config_path else "no .synapse.toml found (defaults apply)"},
            "weights": _weights(settings),
            "modal_credentials": _modal_credentials(),
            "storage": _storage(settings),
        }
        if json_output:
            typer.echo(json.dumps(checks))
        else:
            for name, check in checks.items():
                mark = "ok  " if check["ok"] else "MISSING" if name == "ffmpeg" else "--  "
                typer.echo(f"{mark:<7} {name:<18} {check['detail']}")
        if not checks["ffmpeg"]["ok"]:
            raise typer.Exit(1)
