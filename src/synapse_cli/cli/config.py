from __future__ import annotations

import json

import typer

from synapse_cli.cli._options import CONFIG, JSON, PROFILE
from synapse_cli.cli._run import exit_on_error
from synapse_cli.pipeline import RunOptions, settings_for

app = typer.Typer(help="Inspect configuration.", no_args_is_help=True, rich_markup_mode=None)


@app.command("show")
def show(json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None) -> None:
    """Every setting, its value and where it came from (flag, env, file, default).

    Example: synapse config show --json | jq '.["ffmpeg.preset"]'
    """
    with exit_on_error(json_output):
        settings = settings_for(RunOptions(config=config, profile=profile))
        payload = settings.report()  # the Python API's synapse.settings() returns the same
        rows = payload["settings"]
        if json_output:
            typer.echo(json.dumps(payload, indent=None, default=str))
            return
        typer.echo(f"config file: {settings.config_path or '(none found)'}")
        width = max(map(len, rows))
        for key, row in rows.items():
            value = json.dumps(row["value"], default=str)
            typer.echo(f"{key:<{width}}  {value:<30}  {row['source']}")
