"""Options shared by every job command (the CLI contract: keep names exactly)."""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

USE_MODAL = Annotated[
    Optional[bool],
    typer.Option("--use-modal/--no-modal", help="Run on Modal, or in this process. Default: the 'backend' setting."),
]
JSON = Annotated[bool, typer.Option("--json", help="Print NDJSON events on stdout, one per line.")]
OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
CONFIG = Annotated[
    Optional[Path],
    typer.Option("--config", metavar="FILE.toml", help="Config file (default: .synapse.toml from here upward; env SYNAPSE_CONFIG).", dir_okay=False),
]
PROFILE = Annotated[
    Optional[str], typer.Option("--profile", metavar="NAME", help="[profile.NAME] table of the config file to apply (env SYNAPSE_PROFILE).")
]
ENDPOINT = Annotated[
    Optional[str],
    typer.Option("--endpoint", metavar="URL", help="Run on a synapse HTTP endpoint (env SYNAPSE_ENDPOINT, [http] endpoint).", show_default=False),
]
API_KEY = Annotated[
    Optional[str],
    typer.Option("--api-key", metavar="KEY", help="API key for --endpoint (prefer env SYNAPSE_API_KEY: flags show up in process lists).", show_default=False),
]
DETACH = Annotated[bool, typer.Option("--detach", help="Start the job in the background, print its id and return (see synapse jobs).")]
SHARDS = Annotated[
    Optional[str],
    typer.Option("--shards", help="Split the job into N shards run at once, or 'auto' ([shards] count; auto is 1 locally).", show_default=False),
]
NO_CACHE = Annotated[bool, typer.Option("--no-cache", help="Run even if an identical job already has a result.")]


@dataclass
class Common:
    """What every job command passes to ``run_job``."""

    json: bool = False
    use_modal: Optional[bool] = None
    config: Optional[Path] = None
    profile: Optional[str] = None
    overwrite: bool = False
    endpoint: Optional[str] = None
    api_key: Optional[str] = None
    detach: bool = False
    cache: bool = True
    shards: Optional[str] = None

    def flags(self) -> dict:
        backend = None if self.use_modal is None else ("modal" if self.use_modal else "local")
        return {"backend": backend, "http.endpoint": self.endpoint, "api_key": self.api_key, "shards.count": self.shards}


# The common options of a job command, declared once: (parameter, annotation, default, remote only).
_COMMON: tuple[tuple[str, Any, Any, bool], ...] = (
    ("use_modal", USE_MODAL, None, True),
    ("json_output", JSON, False, False),
    ("overwrite", OVERWRITE, False, False),
    ("config", CONFIG, None, False),
    ("profile", PROFILE, None, False),
    ("endpoint", ENDPOINT, None, True),
    ("api_key", API_KEY, None, True),
    ("detach", DETACH, False, True),
    ("no_cache", NO_CACHE, False, True),
    ("shards", SHARDS, None, True),
)


def with_common(local: bool = False, no_cache_help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a job command the common options; it receives them as one ``common: Common`` argument.

    ``local``: the command runs in this process only, so the remote options (--use-modal,
    --endpoint, --api-key, --detach, --no-cache) are left out. ``no_cache_help`` rewords
    --no-cache for a kind whose own cache it also bypasses.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)  # in the command's own module
        signature = inspect.signature(func)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values() if p.name != "common"]
        added = []
        for name, annotation, default, remote in _COMMON:
            if local and remote:
                continue
            if name == "no_cache" and no_cache_help:
                annotation = Annotated[bool, typer.Option("--no-cache", help=no_cache_help)]
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
            added.append(name)

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in added if name in kwargs}
            common = Common(
                json=bool(given.get("json_output", False)),
                use_modal=given.get("use_modal"),
                config=given.get("config"),
                profile=given.get("profile"),
                overwrite=bool(given.get("overwrite", False)),
                endpoint=given.get("endpoint"),
                api_key=given.get("api_key"),
                detach=bool(given.get("detach", False)),
                cache=not given.get("no_cache", False),
                shards=given.get("shards"),
            )
            return func(*args, common=common, **kwargs)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
