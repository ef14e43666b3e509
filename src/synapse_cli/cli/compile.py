"""``synapse compile``: JSON Schemas and constraint sets -> artefacts for constrained decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from typing_extensions import Annotated

from synapse_cli.cli._options import API_KEY, CONFIG, DETACH, ENDPOINT, JSON, OVERWRITE, PROFILE, USE_MODAL, Common
from synapse_cli.cli._run import run_job
from synapse_cli.config import ENGINES, Settings
from synapse_cli.errors import UsageError


def _summary(result: dict[str, Any]) -> str:
    rows = result.get("inputs", [])
    ok = [r for r in rows if r["status"] in ("ok", "warning")]
    bad = [r for r in rows if r["status"] not in ("ok", "warning")]
    line = f"compiled {len(ok)} of {result.get('total', len(rows))} inputs into {result.get('output_dir')}"
    if result.get("cache_hits"):
        line += f" ({result['cache_hits']} from cache)"
    if len(rows) <= 10:
        for r in ok:
            support = ", ".join(e for e, s in r.get("support", {}).items() if s) or "no engine"
            line += f"\n  {r['name']}: {support}"
    if bad:
        line += "\nfailed: " + "; ".join(
            f"{r['name']} ({r.get('error') or '; '.join(r.get('problems', [])[:2]) or r['status']})" for r in bad[:10]
        )
        if len(bad) > 10:
            line += f"; and {len(bad) - 10} more"
    return line


def compile_command(
    inputs: Annotated[List[str], typer.Argument(metavar="INPUT", help="JSON Schema files, constraint sets, .jsonl files or directories.", show_default=False)],
    output_dir: Annotated[Optional[Path], typer.Option("-o", "--output-dir", help="Where artefacts go (default: ./compiled, setting compile.output_dir).", file_okay=False)] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="Comma-separated engines: llguidance,xgrammar,outlines,llama.cpp (default: all; setting compile.engines).")] = None,
    check: Annotated[Optional[Path], typer.Option("--check", help="JSONL of labelled instances {\"data\", \"valid\"} to verify every artefact against.", dir_okay=False)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Compile again: neither read nor write the compile cache, nor reuse an identical earlier job.")] = False,
    use_modal: USE_MODAL = None,
    json_output: JSON = False,
    overwrite: OVERWRITE = False,
    config: CONFIG = None,
    profile: PROFILE = None,
    endpoint: ENDPOINT = None,
    api_key: API_KEY = None,
    detach: DETACH = False,
) -> None:
    """Compile JSON Schemas or constraint sets into the artefact each decoding engine loads.

    For each input NAME, writes NAME.schema.json (normalized), NAME.lark (llguidance),
    NAME.regex (outlines), NAME.gbnf (llama.cpp) and NAME.report.json (what each engine
    enforces). With --check, every artefact is verified against labelled instances.

    Example: synapse compile schemas/ --check cases.jsonl --engine llguidance,outlines
    """
    common = Common(json=json_output, use_modal=use_modal, config=config, profile=profile, overwrite=overwrite,
                    endpoint=endpoint, api_key=api_key, detach=detach, cache=not no_cache)
    flags: dict[str, Any] = {
        "compile.output_dir": str(output_dir) if output_dir else None,
        "compile.engines": engine,
    }

    def build_spec(settings: Settings):
        from synapse_cli.jobs.compile.job import CompileSpec

        engines = settings["compile.engines"]
        unknown = [e for e in engines if e not in ENGINES]
        if unknown or not engines:
            raise UsageError(f"unknown engine {unknown[0] if unknown else '(none)'!r}; expected some of {', '.join(ENGINES)}")
        if check is not None and not check.is_file():
            raise UsageError(f"--check file not found: {check}")
        cache_dir = settings["compile.cache_dir"]
        if cache_dir is None and not no_cache:
            from synapse_cli.jobs.compile.cache import default_dir

            cache_dir = str(default_dir())
        return CompileSpec(
            inputs=list(inputs),
            output_dir=settings["compile.output_dir"],
            engines=list(engines),
            check=str(check) if check else None,
            use_cache=not no_cache,
            cache_dir=cache_dir,
            engine_timeout_s=settings["compile.engine_timeout_s"],
            overwrite=overwrite,
        )

    run_job("compile", build_spec, common, flags, _summary)


def register(root: typer.Typer) -> None:
    root.command("compile")(compile_command)
