"""``synapse compile``: JSON Schemas and constraint sets -> artefacts for constrained decoding."""

from __future__ import annotations

from typing import Annotated, Any, List, Optional

import typer

from synapse_cli.cli._options import with_common
from synapse_cli.cli._run import run_command
from synapse_cli.pipeline.options import RunOptions


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
    common: RunOptions,
) -> None:
    """Compile JSON Schemas or constraint sets into the artefact each decoding engine loads.

    For each input NAME, writes NAME.schema.json (normalized), NAME.lark (llguidance),
    NAME.regex (outlines), NAME.gbnf (llama.cpp) and NAME.report.json (what each engine
    enforces). With --check, every artefact is verified against labelled instances.

    Example: synapse compile schemas/ --check cases.jsonl --engine llguidance,outlines
    """
    run_command("compile", common, inputs, output_dir=output_dir, engine=engine, check=check, summarize=_summary)
