"""A compile job's inputs as units, and each unit's state while its engines run: what each engine
compiles, the engine work as a coroutine for the worker pool, and the artefacts' file names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synapse_cli.errors import UsageError
from synapse_cli.jobs.compile import cache as _cache
from synapse_cli.jobs.compile.engines import ARTEFACT_SUFFIX
from synapse_cli.jobs.compile.inputs import BadInput, Unit, expand, load

if TYPE_CHECKING:
    from synapse_cli.jobs.compile.job import CompileSpec


def _spec_inputs(spec: CompileSpec) -> list[tuple[Path, str]]:
    names = spec.input_names
    if names is not None and len(names) != len(spec.inputs):
        raise UsageError(f"input_names lists {len(names)} name(s) for {len(spec.inputs)} input(s)")
    return expand(spec.inputs, names)


def open_cache(spec: CompileSpec) -> _cache.Cache:
    """The compile cache the spec asks for (one that holds nothing when ``use_cache`` is off)."""
    return _cache.Cache(Path(spec.cache_dir) if spec.cache_dir else _cache.default_dir()) if spec.use_cache else _cache.Cache(None)


def spec_items(spec: CompileSpec, cache: _cache.Cache | None = None) -> list[Unit | BadInput]:
    """Every input's units (or one-line input errors), in order; ``cache`` (default: the spec's) memoises checked schemas."""
    memo = (cache if cache is not None else open_cache(spec)) if spec.use_cache else None
    items: list[Unit | BadInput] = []
    for path, label in _spec_inputs(spec):
        items.extend(load(path, memo, label))
    return items


class UnitRun:
    def __init__(self, unit: Unit, engines: list[str], tests: list[dict], out_dir: Path) -> None:
        from synapse_cli.jobs.compile.normalize import keywords_used

        self.unit = unit
        self.tests = tests
        self.out_dir = out_dir
        self.used = sorted(keywords_used(unit.payload)) if unit.kind == "json_schema" else []
        self.lowered = self.lowered_gbnf = unit.payload
        if unit.kind == "json_schema":
            from synapse_cli.jobs.compile.lower import lower

            self.lowered = lower(unit.payload)  # same meaning, in keywords the engines hold
            self.lowered_gbnf = lower(unit.payload, property_names=False)
            if self.lowered_gbnf == self.lowered:
                self.lowered_gbnf = self.lowered
        self.results: dict[str, dict[str, Any]] = {}
        self.pending = set(engines)
        self.engines = engines
        self.cands: list[list[str]] | None = None

    def candidates(self) -> list[list[str]]:
        if self.cands is None:
            from synapse_cli.jobs.compile.verify import candidates

            self.cands = [candidates(self.unit.kind, t["data"], self.unit.payload) for t in self.tests]
            if self.lowered is not self.unit.payload:  # the rewrite may declare properties in another order
                for cands, t in zip(self.cands, self.tests):
                    cands.extend(c for c in candidates(self.unit.kind, t["data"], self.lowered) if c not in cands)
        return self.cands

    def payload(self, engine: str) -> Any:
        """What ``engine`` compiles: the lowered schema (``lower``), except for xgrammar, whose artefact is
        NAME.schema.json, and outlines where the rewrite needs what it does not read (``false`` subschemas)."""
        if engine == "xgrammar" or self.lowered is self.unit.payload:
            return self.unit.payload
        if engine == "llama.cpp":
            return self.lowered_gbnf
        if engine == "outlines" and not _outlines_reads(self.lowered):
            return self.unit.payload
        return self.lowered

    def files(self) -> dict[str, str]:
        """Output file name -> contents."""
        name, out = self.unit.name, {}
        if self.unit.kind == "json_schema":
            out[f"{name}.schema.json"] = json.dumps(self.unit.payload, indent=2, ensure_ascii=False) + "\n"
        for engine in self.engines:
            r = self.results.get(engine, {})
            if r.get("artefact") is not None:
                fname = f"{name}.{artefact_suffix(engine, self.unit.kind)}"
                out.setdefault(fname, r["artefact"])
        return out


def _outlines_reads(schema: Any) -> bool:
    """outlines-core refuses a ``false`` subschema, and recurses without end through a ``#`` reference
    under a rewritten root: the rewrites that use them are not handed to it."""
    from synapse_cli.jobs.compile.normalize import children, walk

    for _, node in walk(schema):
        if node.get("$ref") == "#" or any(sub is False for _, sub in children(node)):
            return False
    return True


SUFFIXES = ("schema.json", "regex", "gbnf", "lark", "report.json")


def artefact_suffix(engine: str, kind: str) -> str:
    if engine == "xgrammar":
        return {"json_schema": "schema.json", "regex": "regex", "grammar": "gbnf"}[kind]
    return ARTEFACT_SUFFIX[engine]


def engine_task(run: UnitRun, engine: str, entry: dict | None, need_check: bool) -> Any:
    """Compile (unless cached), then check (if labelled instances and not cached)."""
    result = dict(entry) if entry else None
    if result is None:
        response = yield ("compile", engine, run.unit.kind, run.payload(engine), run.used)
        if response[0] != "ok":
            return {"artefact": None, "error": response[1], "timed_out": response[0] == "timeout", "stage": "compile"}
        result = dict(response[1])
    if need_check and result.get("artefact") is not None:
        response = yield ("check", engine, run.unit.kind, result["artefact"], run.candidates())
        if response[0] != "ok":
            result["check_error"] = response[1]
            result["check_timed_out"] = response[0] == "timeout"
        else:
            result["accepted"] = response[1]
    return result
