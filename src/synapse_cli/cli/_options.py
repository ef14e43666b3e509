"""Options shared by every job command (the CLI contract: keep names exactly)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    typer.Option("--config", help="Config file (default: .synapse.toml from here upward; env SYNAPSE_CONFIG).", dir_okay=False),
]
PROFILE = Annotated[
    Optional[str], typer.Option("--profile", help="[profile.NAME] table of the config file to apply (env SYNAPSE_PROFILE).")
]
ENDPOINT = Annotated[
    Optional[str],
    typer.Option("--endpoint", help="Run on a synapse HTTP endpoint (env SYNAPSE_ENDPOINT, [modal] endpoint).", show_default=False),
]
API_KEY = Annotated[
    Optional[str],
    typer.Option("--api-key", help="API key for --endpoint (prefer env SYNAPSE_API_KEY: flags show up in process lists).", show_default=False),
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
        return {"backend": backend, "modal.endpoint": self.endpoint, "api_key": self.api_key, "shards.count": self.shards}
