"""The options every job takes besides its kind's own, declared once.

``RunOptions`` is what the CLI's common flags, the Python API's keyword arguments and the
pipeline all share. Each field's metadata (``Opt``) says how the command line spells it;
``cli/_options.py`` turns that into typer options, and the API accepts the fields it marks
``api`` as keyword arguments. Plain data only: nothing here imports typer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Opt:
    """How one common option reads on the command line.

    ``flags`` are click's declarations (``"--use-modal/--no-modal"``); ``remote`` options only
    exist for kinds that can run elsewhere; ``api`` options are keyword arguments of the
    Python API (``json`` is about rendering and ``detach`` is the API's ``submit``, so they are the CLI's alone); ``cli_name`` is the
    command's parameter name where it differs from the field's (``--no-cache`` sets ``cache``
    to False through a ``no_cache`` flag).
    """

    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    remote: bool = False
    api: bool = True
    cli_name: str | None = None
    path: bool = False


def _opt(default: Any, *flags: str, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"opt": Opt(flags, help, **kw)})


@dataclass(frozen=True)
class RunOptions:
    """The common options of a job (the CLI contract: names and flags kept exactly)."""

    use_modal: Optional[bool] = _opt(
        None, "--use-modal/--no-modal", help="Run on Modal, or in this process. Default: the 'backend' setting.", remote=True
    )
    json: bool = _opt(False, "--json", help="Print NDJSON events on stdout, one per line.", api=False, cli_name="json_output")
    overwrite: bool = _opt(False, "--overwrite", help="Replace existing output files.")
    config: Optional[Path] = _opt(
        None, "--config", metavar="FILE.toml", help="Config file (default: .synapse.toml from here upward; env SYNAPSE_CONFIG).", path=True
    )
    profile: Optional[str] = _opt(None, "--profile", metavar="NAME", help="[profile.NAME] table of the config file to apply (env SYNAPSE_PROFILE).")
    endpoint: Optional[str] = _opt(
        None, "--endpoint", metavar="URL", help="Run on a synapse HTTP endpoint (env SYNAPSE_ENDPOINT, [http] endpoint).", remote=True
    )
    api_key: Optional[str] = _opt(
        None, "--api-key", metavar="KEY", remote=True,
        help="API key for --endpoint (prefer env SYNAPSE_API_KEY: flags show up in process lists).",
    )  # fmt: skip
    detach: bool = _opt(False, "--detach", help="Start the job in the background, print its id and return (see synapse jobs).", remote=True, api=False)
    cache: bool = _opt(True, "--no-cache", help="Run even if an identical job already has a result.", remote=True, cli_name="no_cache")
    shards: Optional[str] = _opt(
        None, "--shards", remote=True,
        help="Split the job into N shards run at once, or 'auto' ([shards] count; auto is 1 locally).",
    )  # fmt: skip

    def flags(self) -> dict[str, Any]:
        """The settings these options stand for, as flags (None: not given)."""
        backend = None if self.use_modal is None else ("modal" if self.use_modal else "local")
        shards = None if self.shards is None else str(self.shards)
        return {"backend": backend, "http.endpoint": self.endpoint, "api_key": self.api_key, "shards.count": shards}

    @classmethod
    def options(cls) -> tuple[tuple[str, Any, Opt], ...]:
        """Each field's name, default and ``Opt``, in declaration order."""
        return tuple((f.name, f.default, f.metadata["opt"]) for f in fields(cls))

    @classmethod
    def api_names(cls) -> tuple[str, ...]:
        return tuple(name for name, _, opt in cls.options() if opt.api)

    @classmethod
    def take(cls, given: dict[str, Any]) -> "RunOptions":
        """Pop the API's common keyword arguments out of ``given`` and return them as options."""
        values: dict[str, Any] = {}
        for name, _, opt in cls.options():
            if opt.api and name in given:
                value = given.pop(name)
                if value is not None and opt.path:
                    value = Path(value)
                values[name] = value
        for name in ("overwrite", "detach", "cache"):
            if name in values:
                values[name] = bool(values[name])
        return cls(**values)
