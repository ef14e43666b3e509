from __future__ import annotations

import json
import os

import typer

from synapse_cli.cli._options import CONFIG, JSON, PROFILE
from synapse_cli.cli._run import exit_on_error
from synapse_cli.pipeline import RunOptions, settings_for


def deploy(json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None) -> None:
    """Deploy the synapse Modal app (one function per job kind) and print its function names.

    The app's name, GPU, timeout, retries, Volume and secrets come from the [modal] settings.
    Example: SYNAPSE_MODAL_GPU=A10G synapse deploy
    """
    with exit_on_error(json_output):
        settings = settings_for(RunOptions(config=config, profile=profile))
        from synapse_cli.backends.modal import map_modal_errors, require_credentials

        require_credentials()
        # synapse_cli.modal_app reads the settings when it defines the app: hand it the same file and profile
        if settings.config_path:
            os.environ["SYNAPSE_CONFIG"] = str(settings.config_path)
        if profile:
            os.environ["SYNAPSE_PROFILE"] = profile
        modal_cfg = settings.section("modal")
        with map_modal_errors(modal_cfg["app_name"], modal_cfg["environment"]):
            from synapse_cli import modal_app

            modal_app.app.deploy(name=modal_cfg["app_name"], environment_name=modal_cfg["environment"])
        names = sorted(modal_app.FUNCTIONS)
        if json_output:
            typer.echo(json.dumps({"app": modal_cfg["app_name"], "functions": names}))
        else:
            typer.echo(f"deployed app {modal_cfg['app_name']!r}: {', '.join(names)}")
