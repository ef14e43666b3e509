"""The one place synapse leans on typer's private API, fenced.

What it is for: typer 0.29 coerces every parameter of the invoked command through a pydantic
TypeAdapter built on first use; ``_PlainCoercion`` coerces the plain values a command line
gives (``str``, ``list[str]``, ``Path``) exactly as those adapters would, without building them
(a third of ``synapse export``'s start-up).

What it uses (private, so it may change in any typer release): a click parameter's
``type_descriptor`` and ``_runtime_param`` attributes, ``typer._coercion.build_runtime_param``
and ``typer._param_types.coerce_cli_path``. pyproject pins typer to the range tested here, and
``tests/test_startup.py::test_typer_private_hooks_are_as_expected`` fails when a release moves
them. Where they are absent (older, click-based typers) nothing is installed and typer's own
coercion runs: slower, never wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import typer.core


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
        self.kind, self.descriptor = kind, descriptor
        self._typer: Any = None  # typer's own RuntimeParam, built on first need

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
