"""compile in shards: groups of inputs (``split``), their count (``size``), merged into the one output folder (``merge``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from synapse_cli.events import Artifact, Event, Finished
from synapse_cli.jobs._files import atomic_output
from synapse_cli.jobs.compile.inputs import BadInput
from synapse_cli.jobs.compile.report import failure
from synapse_cli.jobs.compile.units import SUFFIXES, spec_items

if TYPE_CHECKING:
    from synapse_cli.jobs.compile.job import CompileSpec


def compile_units(spec: CompileSpec) -> float:
    """How many inputs (schemas, constraint sets) the job has: what ``--shards auto`` divides."""
    return float(len(spec_items(spec)))


def split_compile(spec: CompileSpec, n: int, workdir: Path, settings: Any = None) -> list[CompileSpec]:
    """Up to ``n`` shard specs over contiguous groups of inputs, each writing into its own folder in ``workdir``.

    The whole job, unsplit, when there is one input, or when an output exists already and
    ``--overwrite`` is not given (each clash is then reported exactly as an unsharded run does).
    """
    from dataclasses import replace

    items = spec_items(spec)
    if len(items) < 2:
        return [spec]
    out_dir = Path(spec.output_dir)
    if not spec.overwrite and out_dir.is_dir():
        names = {item.name for item in items if not isinstance(item, BadInput)}
        if any((out_dir / f"{name}.{suffix}").exists() for name in names for suffix in SUFFIXES):
            return [spec]
    marks = sorted({round(len(items) * k / n) for k in range(n + 1)})
    return [
        replace(spec, part=[a, b], output_dir=str(workdir / f"part{i:03d}"), overwrite=True)
        for i, (a, b) in enumerate(zip(marks, marks[1:]))
    ]


def merge_compile(spec: CompileSpec, parts: list[CompileSpec], results: list[dict[str, Any]], workdir: Path) -> Iterator[Event]:
    """Move every shard's files into the one output folder and sum the shards' results into one."""
    import shutil

    t0 = time.perf_counter()
    out_dir = Path(spec.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for part, result in zip(parts, results):
        piece = str(Path(part.output_dir))
        for row in result.get("inputs", []):
            moved = []
            for path in row.get("outputs", []):
                dest = out_dir / Path(path).relative_to(piece)
                with atomic_output(dest, overwrite=spec.overwrite) as tmp:
                    shutil.copyfile(path, tmp)
                moved.append(str(dest))
                yield Artifact(path=str(dest), bytes=dest.stat().st_size)
            rows.append({**row, "outputs": moved})
    total = sum(int(r.get("total", 0)) for r in results)
    failed = [r for r in rows if r.get("status") in ("failed", "invalid")]
    merged = {
        "output_dir": str(out_dir),
        "engines": results[0].get("engines", []) if results else [],
        "total": total,
        "compiled": sum(int(r.get("compiled", 0)) for r in results),
        "failed": len(failed),
        "cache_hits": sum(int(r.get("cache_hits", 0)) for r in results),
        "inputs": rows,
    }
    yield Finished(result=merged, elapsed_s=round(time.perf_counter() - t0, 3))
    if failed:
        raise failure(failed, total)
