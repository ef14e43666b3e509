"""``compile``'s spec builder: the options of ``synapse compile`` (or ``compile(...)``) into a ``CompileSpec``.

``--output-dir`` and ``--engine`` are settings (``compile.output_dir``, ``compile.engines``), so the
kind's record maps them to those keys and the builder reads them from ``settings``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from synapse_cli.config import ENGINES, Settings
from synapse_cli.errors import UsageError

PathLike = Union[str, "os.PathLike[str]"]


def build_spec(
    settings: Settings,
    inputs: Union[PathLike, list[PathLike]],
    *,
    check: Optional[PathLike] = None,
    overwrite: bool = False,
    cache: bool = True,
) -> Any:
    """Compile INPUTS (JSON Schema files, constraint sets, .jsonl files or directories) into each engine's
    artefact; ``check``: labelled instances to verify every artefact against. ``output_dir`` and
    ``engine`` (a list, or ``"a,b"``) are settings (``compile.output_dir``, ``compile.engines``)."""
    from synapse_cli.jobs.compile.job import CompileSpec

    engines = settings["compile.engines"]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise UsageError(f"unknown engine {unknown[0] if unknown else '(none)'!r}; expected some of {', '.join(ENGINES)}")
    from synapse_cli.storage.urls import is_url

    if check is not None and not is_url(os.fspath(check)) and not Path(check).is_file():
        raise UsageError(f"--check file not found: {check}")
    cache_dir = settings["compile.cache_dir"]
    if cache_dir is None and cache:
        from synapse_cli.jobs.compile.cache import default_dir

        cache_dir = str(default_dir())
    listed = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    return CompileSpec(
        inputs=[os.fspath(i) for i in listed],
        output_dir=settings["compile.output_dir"],
        engines=list(engines),
        check=os.fspath(check) if check is not None else None,
        use_cache=cache,
        cache_dir=cache_dir,
        engine_timeout_s=settings["compile.engine_timeout_s"],
        overwrite=overwrite,
    )
