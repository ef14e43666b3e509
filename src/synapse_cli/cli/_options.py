"""Options shared by every job command (the CLI contract: keep names exactly), made from ``RunOptions``.

``Command``, ``Group`` and ``plain_coercion`` live in ``_typer_hooks`` (typer's private API, fenced there)."""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from synapse_cli.pipeline.options import RunOptions


def _option(name: str) -> Any:
    """The typer annotation of one common option, made from its declaration in ``RunOptions``."""
    default, opt, annotation = next((d, o, RunOptions.__annotations__[n]) for n, d, o in RunOptions.options() if n == name)
    if opt.cli_name == "no_cache":  # the flag turns the option off: the command's parameter is the flag
        annotation, default = "bool", False
    kinds = {"bool": bool, "Optional[bool]": Optional[bool], "Optional[str]": Optional[str], "Optional[Path]": Optional[Path]}
    extra: dict[str, Any] = {"dir_okay": False} if opt.path else {}
    if opt.metavar:
        extra["metavar"] = opt.metavar
    if default is None and not opt.path:
        extra["show_default"] = False
    return Annotated[kinds[annotation], typer.Option(*opt.flags, help=opt.help, **extra)], default, opt


USE_MODAL = _option("use_modal")[0]
JSON = _option("json")[0]
OVERWRITE = _option("overwrite")[0]
CONFIG = _option("config")[0]
PROFILE = _option("profile")[0]
ENDPOINT = _option("endpoint")[0]
API_KEY = _option("api_key")[0]
DETACH = _option("detach")[0]
SHARDS = _option("shards")[0]
NO_CACHE = _option("cache")[0]

# The common options of a job command, from ``RunOptions``: (parameter, annotation, default, remote only, field).
_COMMON: tuple[tuple[str, Any, Any, bool, str], ...] = tuple(
    (opt.cli_name or name, annotation, default, opt.remote, name)
    for name, (annotation, default, opt) in ((n, _option(n)) for n, _, _ in RunOptions.options())
)


def with_common(local: bool = False, no_cache_help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a job command the common options; it receives them as one ``common: RunOptions`` argument.

    ``local``: the command runs in this process only, so the remote options (--use-modal,
    --endpoint, --api-key, --detach, --no-cache, --shards) are left out. ``no_cache_help``
    rewords --no-cache for a kind whose own cache it also bypasses.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)  # in the command's own module
        signature = inspect.signature(func)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values() if p.name != "common"]
        added: dict[str, str] = {}  # parameter -> RunOptions field
        for name, annotation, default, remote, field_name in _COMMON:
            if local and remote:
                continue
            if name == "no_cache" and no_cache_help:
                annotation = Annotated[bool, typer.Option("--no-cache", help=no_cache_help)]
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
            added[name] = field_name

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {added[name]: kwargs.pop(name) for name in list(added) if name in kwargs}
            if "cache" in given:  # the parameter is --no-cache
                given["cache"] = not given["cache"]
            return func(*args, common=RunOptions(**given), **kwargs)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


from synapse_cli.cli._typer_hooks import Command, Group, plain_coercion  # noqa: E402,F401 (re-exported for the commands)
