from __future__ import annotations

import json
from typing import Any

import typer

from synapse_cli.cli._options import CONFIG, JSON, PROFILE, Common
from synapse_cli.cli._run import exit_on_error, settings_for
from synapse_cli.config import REGISTRY

app = typer.Typer(help="Inspect configuration.", no_args_is_help=True, rich_markup_mode=None)


def _shown(key: str, value: Any) -> Any:
    return "***" if REGISTRY[key].secret and value else value


@app.command("show")
def show(json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None) -> None:
    """Every setting, its value and where it came from (flag, env, file, default).

    Example: synapse config show --json | jq '.["ffmpeg.preset"]'
    """
    with exit_on_error(json_output):
        settings = settings_for(Common(config=config, profile=profile))
        rows = {k: {"value": _shown(k, settings[k]), "source": settings.source(k)} for k in settings}
        if json_output:
            payload = {"config_file": str(settings.config_path) if settings.config_path else None, "settings": rows}
            typer.echo(json.dumps(payload, indent=None, default=str))
            return
        typer.echo(f"config file: {settings.config_path or '(none found)'}")
        width = max(map(len, rows))
        for key, row in rows.items():
            value = json.dumps(row["value"], default=str)
            typer.echo(f"{key:<{width}}  {value:<30}  {row['source']}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="config")
