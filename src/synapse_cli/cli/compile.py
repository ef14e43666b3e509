"""``synapse compile``: JSON Schemas and constraint sets -> artefacts for constrained decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from synapse_cli.cli._options import Common, with_common
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


@with_common(no_cache_help="Compile again: neither read nor write the compile cache, nor reuse an identical earlier job.")
def compile_command(
    inputs: Annotated[List[str], typer.Argument(metavar="INPUT", help="JSON Schema files, constraint sets, .jsonl files or directories.", show_default=False)],
    output_dir: Annotated[Optional[str], typer.Option("-o", "--output-dir", metavar="DIR", help="Where artefacts go: a folder or an s3://bucket/prefix/ (default: ./compiled, setting compile.output_dir).")] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", metavar="ENGINE,...", help="Comma-separated engines: llguidance,xgrammar,outlines,llama.cpp (default: all; setting compile.engines).")] = None,
    check: Annotated[Optional[str], typer.Option("--check", metavar="FILE.jsonl", help="JSONL of labelled instances {\"data\", \"valid\"} to verify every artefact against (a path or a URL).")] = None,
    *,
    common: Common,
) -> None:
    """Compile JSON Schemas or constraint sets into the artefact each decoding engine loads.

    For each input NAME, writes NAME.schema.json (normalized), NAME.lark (llguidance),
    NAME.regex (outlines), NAME.gbnf (llama.cpp) and NAME.report.json (what each engine
    enforces). With --check, every artefact is verified against labelled instances.

    Example: synapse compile schemas/ --check cases.jsonl --engine llguidance,outlines
    """
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
        from synapse_cli.storage.urls import is_url

        if check is not None and not is_url(check) and not Path(check).is_file():
            raise UsageError(f"--check file not found: {check}")
        cache_dir = settings["compile.cache_dir"]
        if cache_dir is None and common.cache:
            from synapse_cli.jobs.compile.cache import default_dir

            cache_dir = str(default_dir())
        return CompileSpec(
            inputs=list(inputs),
            output_dir=settings["compile.output_dir"],
            engines=list(engines),
            check=check,
            use_cache=common.cache,
            cache_dir=cache_dir,
            engine_timeout_s=settings["compile.engine_timeout_s"],
            overwrite=common.overwrite,
        )

    run_job("compile", build_spec, common, flags, _summary)

