"""The typer app. Each command lives in its own module and only declares options
and calls ``run_job``; nothing heavy (rich, modal, torch) is imported here, so
``synapse --help`` stays fast."""

from __future__ import annotations

import gc
from typing import Annotated, Optional

import typer

from synapse_cli import __version__
from synapse_cli.cli._options import Command, Group

app = typer.Typer(
    name="synapse",
    cls=Group,  # options coerced without a pydantic TypeAdapter each (see _options.plain_coercion)
    help="Run media and model jobs in-process or on Modal, with the same command.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: rich stays out of start-up
    pretty_exceptions_enable=False,  # no locals (tokens) in tracebacks
    add_completion=True,  # --install-completion / --show-completion (typer loads its completion code only when asked)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"synapse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    pass


def _register() -> None:
    import importlib

    from synapse_cli.cli import config, deploy, doctor, jobs, serve
    from synapse_cli.jobs import JOBS

    for kind in JOBS.values():  # one command per kind that declares one, named after the kind
        if kind.command:
            module, _, attr = kind.command.partition(":")
            app.command(kind.name, cls=Command)(getattr(importlib.import_module(module), attr))
    for module in (jobs, deploy, serve, config, doctor):
        module.register(app)


_register()


def main() -> None:
    try:
        app(prog_name="synapse")  # `python -m synapse_cli` completes and reads as `synapse` too
    finally:
        # On its way out the interpreter collects every object it tracks, typer's included: 30-90 ms
        # here after a job, a third of a short export's cost past ffmpeg's exit. Files, connections
        # and temporary folders are closed by now (atexit hooks still run), so leave them out of it.
        gc.freeze()
