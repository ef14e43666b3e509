"""A compiled unit's report: its engines summarised, its files written atomically, its row of the result and its events."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator

from synapse_cli import __version__
from synapse_cli.errors import JobError
from synapse_cli.events import Artifact, Event, Log, Progress
from synapse_cli.jobs._files import atomic_output
from synapse_cli.jobs.compile.units import UnitRun, artefact_suffix

if TYPE_CHECKING:
    from synapse_cli.jobs.compile.job import CompileSpec


def reason(row: dict) -> str:
    if row.get("error"):
        return row["error"]
    return "; ".join(row.get("problems", [])[:2]) or row["status"]


def failure(failed: list[dict[str, Any]], total: int) -> JobError:
    """The one-line error of a job whose inputs ``failed`` (rows of its result), naming the first five."""
    names = "; ".join(f"{r['name']} ({reason(r)})" for r in failed[:5])
    more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
    return JobError(f"{len(failed)} of {total} inputs failed: {names}{more}")


def finish(run: UnitRun, spec: CompileSpec, versions: dict[str, str]) -> dict[str, Any]:
    """Summarise the unit's engines, write its files atomically, return its row of the result."""
    unit = run.unit
    problems: list[str] = []
    report_engines = {engine: _engine_row(run, engine, versions, problems) for engine in run.engines}
    if not any(row["supported"] for row in report_engines.values()):
        problems.insert(0, "no engine compiled it")
    status = "ok" if not problems else ("warning" if unit.severity == "warning" else "failed")
    report = {
        "name": unit.name,
        "source": unit.source,
        "kind": unit.kind,
        "severity": unit.severity,
        "description": unit.description,
        "content_hash": f"sha256:{unit.content_hash}",
        "synapse_version": __version__,
        "engines": report_engines,
        "instances": len(run.tests),
        "status": status,
        "problems": problems,
    }
    outputs = _write_files(run, report, spec.overwrite)
    return {
        "name": unit.name,
        "source": unit.source,
        "kind": unit.kind,
        "status": status,
        "problems": problems,
        "outputs": [p for p, _ in outputs],
        "support": {e: row["supported"] for e, row in report_engines.items()},
        "engines": report_engines,
        "cached": all(run.results.get(e, {}).get("cached") for e in run.engines),
        "_sizes": [b for _, b in outputs],
    }


def _engine_row(run: UnitRun, engine: str, versions: dict[str, str], problems: list[str]) -> dict[str, Any]:
    """One engine's entry in the report (its check against the labelled instances included); its problems added to ``problems``."""
    from synapse_cli.jobs.compile.verify import summarize

    unit = run.unit
    r = run.results.get(engine, {})
    supported = r.get("artefact") is not None
    row: dict[str, Any] = {
        "supported": supported,
        "ignored_keywords": list(r.get("ignored_keywords") or []),
        "error": r.get("error"),
        "compile_ms": r.get("compile_ms"),
        "artefact_bytes": len(r["artefact"].encode("utf-8")) if supported else None,  # grammar size, bounded by lower.py
        "artefact": f"{unit.name}.{artefact_suffix(engine, unit.kind)}" if supported else None,
        "version": versions[engine],
    }
    if supported and run.tests:
        if "accepted" in r:
            # ignored keywords are keywords of the schema the engine compiled (same meaning as the input)
            check = summarize(run.tests, r["accepted"], run.payload(engine), row["ignored_keywords"], unit.kind)
            row["check"] = check
            if not check["ok"]:
                problems.append(f"{engine}: " + ", ".join(check["failures"][:2]))
        else:
            row["check"] = {"error": r.get("check_error", "not checked")}
            problems.append(f"{engine}: check failed: {r.get('check_error')}")
    return row


def _write_files(run: UnitRun, report: dict[str, Any], overwrite: bool) -> list[tuple[str, int]]:
    """The unit's artefacts and its report, each written atomically: ``(path, bytes)`` of each."""
    files = run.files()
    files[f"{run.unit.name}.report.json"] = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    outputs = []
    for fname, text in files.items():
        dest = run.out_dir / fname
        with atomic_output(dest, overwrite=overwrite) as tmp:
            tmp.write_text(text, encoding="utf-8")
        outputs.append((str(dest), len(text.encode("utf-8"))))
    return outputs


def unit_events(run: UnitRun, row: dict, done: int, total: int) -> Iterator[Event]:
    sizes = row.pop("_sizes")
    for path, size in zip(row["outputs"], sizes):
        yield Artifact(path=path, bytes=size)
    if row["status"] != "ok":
        yield Log(f"{row['name']}: {row['status']}: {reason(row)}", level="warning")
    yield Progress(done=done, total=total, phase="schema", message=row["name"])
