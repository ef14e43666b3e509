"""Options shared by every job command (the CLI contract: keep names exactly)."""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import typer
import typer.core

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


# -- coercion without a pydantic TypeAdapter per option ------------------------------------------


class _PlainCoercion:
    """Typer's coercion of one parameter, for the values a command line gives, without its TypeAdapter.

    Typer (0.29) coerces every parameter of the invoked command through a pydantic
    TypeAdapter, built on first use, unset options included: importing pydantic and
    building fifteen adapters was a third of ``synapse export``'s start-up. A value the
    command line gives for ``str``, ``list[str]`` and ``Path`` parameters is coerced here
    exactly as those adapters do (a ``Path`` through typer's own path checks); an unset
    option is ``None`` (or ``()``), as typer has it; any other value goes to typer's own
    coercion, built then.
    """

    __slots__ = ("kind", "descriptor", "_typer")

    def __init__(self, kind: str | None, descriptor: Any) -> None:
        self.kind, self.descriptor, self._typer = kind, descriptor, None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        multi = param.multiple or param.nargs == -1
        if value is None:
            return () if multi else None
        if self.kind == "str" and type(value) is str:
            return value
        if self.kind == "strs" and isinstance(value, (list, tuple)) and all(type(v) is str for v in value):
            return list(value)
        if self.kind == "path" and (type(value) is str and value or isinstance(value, Path)):
            from typer._param_types import coerce_cli_path

            path = value if isinstance(value, Path) else Path(value)  # what pydantic's Path validation makes of a str
            return coerce_cli_path(path, self.descriptor.parameter_info, path_type=Path, param=param, ctx=ctx)
        if self._typer is None:
            from typer._coercion import build_runtime_param

            self._typer = build_runtime_param(self.descriptor)
        return self._typer.coerce(value, param=param, ctx=ctx)


def _coercion_kind(descriptor: Any) -> str | None:
    info, annotation = descriptor.parameter_info, descriptor.annotation
    if getattr(info, "parser", None) is not None or descriptor.file_annotation is not None:
        return None
    if annotation is str:
        return "str"
    if annotation == List[str] or annotation == list[str]:
        return "strs"
    if annotation is Path and getattr(info, "path_type", None) is None and descriptor.is_path:
        return "path"
    return None


def _typer_hooks() -> bool:
    """Does this typer have the (private) pieces ``_PlainCoercion`` calls? Checked once, without importing them."""
    global _HOOKS
    if _HOOKS is None:
        import importlib.util

        _HOOKS = all(importlib.util.find_spec(m) is not None for m in ("typer._coercion", "typer._param_types"))
    return _HOOKS


_HOOKS: bool | None = None


def _install(param: Any) -> None:
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None and getattr(param, "_runtime_param", False) is None and _typer_hooks():
        param._runtime_param = _PlainCoercion(_coercion_kind(descriptor), descriptor)


def plain_coercion(command: Any) -> None:
    """Give ``command``'s parameters, and its subcommands', the coercion above.

    Only where typer has the hook (a parameter with an unbuilt ``_runtime_param``); a typer
    without it (click-based releases) builds no adapters, and is left as it is.
    """
    for param in getattr(command, "params", ()):
        _install(param)
    for sub in getattr(command, "commands", {}).values():
        plain_coercion(sub)


class _PlainHelp:
    """The ``--help`` option typer makes on first use is coerced with ``plain_coercion`` too."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _install(option)
        return option


class Command(_PlainHelp, typer.core.TyperCommand):
    """A job command: its ``--help`` option is coerced without a TypeAdapter (its other options are, by ``Group``)."""


class Group(_PlainHelp, typer.core.TyperGroup):
    """The root group: every command under it coerces its options with ``plain_coercion``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain_coercion(self)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        plain_coercion(self)  # the completion options typer adds to the group after building it
        return super().parse_args(ctx, args)
