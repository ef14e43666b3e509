"""The typer app. Each command lives in its own module and only declares options
and calls ``run_command`` (one call to ``synapse_cli.pipeline``); nothing heavy (rich, modal, torch) is imported here, so
``synapse --help`` stays fast."""

from __future__ import annotations

import gc
import importlib
from typing import Annotated, Any, Optional

import typer
import typer.main

from synapse_cli import __version__
from synapse_cli.cli._options import Command, Group, plain_coercion

# The commands that are not a job kind's, as "module:attr": a command function, or a typer.Typer of subcommands
_OTHER_COMMANDS = {
    "deploy": "synapse_cli.cli.deploy:deploy",
    "serve": "synapse_cli.cli.serve:serve",
    "doctor": "synapse_cli.cli.doctor:doctor",
    "jobs": "synapse_cli.cli.jobs:app",
    "config": "synapse_cli.cli.config:app",
}


def _commands() -> dict[str, str]:
    """Every command, in the order ``--help`` lists them: one per kind that declares one, named after it, then the rest."""
    from synapse_cli.jobs import JOBS

    return {**{kind.name: kind.command for kind in JOBS.values() if kind.command}, **_OTHER_COMMANDS}


class _Root(Group):
    """The root group loads a command when it is run (or listed, by ``--help`` and completion).

    ``synapse export`` imports and builds only ``export``: the other commands' modules and
    typer's conversion of their signatures were a fifth of a short export's start-up.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return list(_commands())

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in self.commands:
            where = _commands().get(name)
            if where is None:
                return None
            self.add_command(_load(name, where), name)
            plain_coercion(self.commands[name])
        return self.commands[name]

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in _commands():  # typer's "Did you mean ...?" looks among the loaded ones
            for name in self.list_commands(ctx):
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


def _load(name: str, where: str) -> Any:
    module, _, attr = where.partition(":")
    target = getattr(importlib.import_module(module), attr)
    command: Any
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)
    else:
        one = typer.Typer(rich_markup_mode=None, add_completion=False)
        one.command(name, cls=Command)(target)
        command = typer.main.get_command(one)
    command.name = name
    return command


app = typer.Typer(
    name="synapse",
    cls=_Root,  # commands load when used; options coerced without a pydantic TypeAdapter each (see _options.plain_coercion)
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


def main() -> None:
    try:
        app(prog_name="synapse")  # `python -m synapse_cli` completes and reads as `synapse` too
    finally:
        # On its way out the interpreter collects every object it tracks, typer's included: 30-90 ms
        # here after a job, a third of a short export's cost past ffmpeg's exit. Files, connections
        # and temporary folders are closed by now (atexit hooks still run), so leave them out of it.
        gc.freeze()
