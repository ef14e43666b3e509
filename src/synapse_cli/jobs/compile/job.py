"""``compile``: constraint sets and JSON Schemas -> verified artefacts for constrained decoding.

For each input NAME it writes, into ``output_dir``: ``NAME.schema.json`` (normalized),
``NAME.lark`` (llguidance), ``NAME.regex`` (outlines-core), ``NAME.gbnf`` (llama.cpp)
and ``NAME.report.json`` (per engine: supported, ignored keywords, error, compile time,
and the verification counts when labelled instances are given).

Engine work runs in worker processes bounded by ``engine_timeout_s``; results are
cached by the content hash of the normalized input and the engine versions, so an
unchanged schema costs a cache read and the file writes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Generator, Iterator

from synapse_cli import __version__
from synapse_cli.errors import UsageError
from synapse_cli.events import Event, Finished, Log, Progress, Started
from synapse_cli.jobs.compile import cache as _cache
from synapse_cli.jobs.compile.checks import load_checks, tests_for
from synapse_cli.jobs.compile.engines import ENGINES, PACKAGES
from synapse_cli.jobs.compile.inputs import BadInput, Unit
from synapse_cli.jobs.compile.report import failure, finish, unit_events
from synapse_cli.jobs.compile.units import SUFFIXES, UnitRun, engine_task, open_cache, spec_items


@dataclass
class CompileSpec:
    """What to compile, for which engines, and where the artefacts go (plain data: it crosses Modal and HTTP)."""

    inputs: list[str]
    output_dir: str = "compiled"
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    check: str | None = None  # JSONL of labelled instances
    use_cache: bool = True
    cache_dir: str | None = None
    engine_timeout_s: float = 10.0
    overwrite: bool = False
    workers: int = 0  # engine worker processes; 0: one per core, at most 4
    # A shard: only the inputs [start, end) of the expanded list (every .json, and every line of a .jsonl)
    part: list[int] | None = None
    # What the reports and the result call each input: the paths as the user gave them (None:
    # ``inputs``, filled in when the spec is made). A remote run's staging rewrites ``inputs``
    # (Volume copies, upload folders) and leaves this alone, so a report's ``source`` is a local
    # run's wherever it ran; and the result cache keys on it, so a cached report never names another path.
    input_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.input_names is None:
            self.input_names = [str(p) for p in self.inputs]

    INPUTS: ClassVar[tuple[str, ...]] = ("inputs", "check")
    OUTPUTS: ClassVar[tuple[str, ...]] = ("output_dir",)
    SERVER_CAPS: ClassVar[dict[str, float]] = {"workers": 8, "engine_timeout_s": 120}  # synapse serve refuses more (422)


def compile_names(data: dict[str, Any], output_dir: Any = None) -> dict[str, Any]:
    """The compile kind's ``names`` hook: ``output_dir`` defaults to the ``compile.output_dir``
    setting's default, ``compiled`` (what ``synapse compile`` writes into without ``-o``)."""
    if data.get("output_dir") is None:
        data["output_dir"] = output_dir or CompileSpec.output_dir
    return data


def engine_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for engine in ENGINES:
        try:
            out[engine] = version(PACKAGES[engine])
        except PackageNotFoundError:
            out[engine] = "missing"
    out["llama.cpp"] = f"synapse-gbnf-{__version__}+llguidance-{out['llama.cpp']}"
    return out


def _rules_hash() -> str:
    """Our side of every artefact (converter, keyword tables): a code change invalidates the cache."""
    import hashlib

    h = hashlib.sha256(__version__.encode())
    for name in ("engines.py", "gbnf.py", "rewrite.py", "lower.py"):
        try:
            h.update((Path(__file__).parent / name).read_bytes())
        except OSError:  # a zipped install: the version alone
            pass
    return h.hexdigest()[:16]


def compile_constraints(spec: CompileSpec) -> Iterator[Event]:
    """Compile every input for every engine, verify against labelled instances, write artefacts."""
    t0 = time.perf_counter()
    engines = _engines(spec)
    everyone, by_name = load_checks(spec.check) if spec.check else ([], {})
    cache = open_cache(spec)
    items = spec_items(spec, cache)
    if not items:
        raise UsageError("no inputs: the directories given hold no .json or .jsonl files")
    single = len(spec.inputs) == 1 and not Path(spec.inputs[0]).is_dir() and len(items) == 1
    if single and isinstance(items[0], BadInput):
        raise UsageError(items[0].message)
    out_dir = _output_dir(spec)
    runs, bad = _units(spec, items, engines, single, lambda unit: UnitRun(unit, engines, tests_for(unit, everyone, by_name), out_dir))
    total = len(runs) + len(bad)
    yield Started(job="compile", total=total)
    for b in bad:
        yield Log(b.message, level="warning")
    finished: list[dict[str, Any]] = []
    hits = yield from _run_units(spec, runs, engines, cache, finished, len(bad), total)
    order = {run.unit.name: i for i, run in enumerate(runs)}
    finished.sort(key=lambda r: order.get(r["name"], 0))
    for b in bad:
        finished.append({"name": b.name, "source": b.source, "status": "invalid", "error": b.message, "outputs": []})
    failed = [r for r in finished if r["status"] in ("failed", "invalid")]
    result = {
        "output_dir": str(out_dir),
        "engines": engines,
        "total": total,
        "compiled": sum(1 for r in finished if r["status"] in ("ok", "warning")),
        "failed": len(failed),
        "cache_hits": hits,
        "inputs": finished,
    }
    yield Finished(result=result, elapsed_s=round(time.perf_counter() - t0, 3))
    if failed:
        raise failure(failed, total)


def _output_dir(spec: CompileSpec) -> Path:
    out_dir = Path(spec.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out_dir}: {exc.strerror}") from None
    return out_dir


def _engines(spec: CompileSpec) -> list[str]:
    """The spec's engines in ``ENGINES`` order, or a UsageError for an unknown one or a missing extra."""
    unknown = [e for e in spec.engines if e not in ENGINES]
    if unknown or not spec.engines:
        raise UsageError(f"unknown engine {unknown[0] if unknown else '(none)'}; expected some of {', '.join(ENGINES)}")
    try:
        import jsonschema  # noqa: F401  (meta-schema checks, labels)
    except ImportError:
        raise UsageError("synapse compile needs its extra: pip install 'synapse-cli[compile]'") from None
    return [e for e in ENGINES if e in spec.engines]


def _units(spec: CompileSpec, items: list[Unit | BadInput], engines: list[str], single: bool,
           unit_run: Callable[[Unit], UnitRun]) -> tuple[list[UnitRun], list[BadInput]]:
    """This shard's units to run, and its inputs refused (bad, a duplicate output name, an output that exists)."""
    seen: dict[str, str] = {}
    runs: list[UnitRun] = []
    bad: list[BadInput] = []
    lo, hi = (int(spec.part[0]), int(spec.part[1])) if spec.part is not None else (0, len(items))
    out_dir = Path(spec.output_dir)
    for index, item in enumerate(items):
        if not lo <= index < hi:  # another shard's: still named here, so a duplicate name is caught the same way
            if not isinstance(item, BadInput):
                seen.setdefault(item.name, item.source)
            continue
        if isinstance(item, BadInput):
            bad.append(item)
            continue
        if item.name in seen:
            bad.append(BadInput(item.source, item.name, f"{item.source}: output name {item.name!r} already used by {seen[item.name]}"))
            continue
        seen[item.name] = item.source
        if not spec.overwrite:
            clash = [p for p in (out_dir / f"{item.name}.{s}" for s in SUFFIXES) if p.exists()]
            if clash:
                msg = f"{clash[0]} already exists (use --overwrite to replace it)"
                if single:
                    raise UsageError(msg)
                bad.append(BadInput(item.source, item.name, f"{item.source}: {msg}"))
                continue
        runs.append(unit_run(item))
    return runs, bad


def _tasks(spec: CompileSpec, runs: list[UnitRun], engines: list[str], cache: _cache.Cache, versions: dict[str, str]) -> list[Any]:
    """The engine work the cache does not hold, as ``((run, engine, key, tests key, cached), task)``; what it holds is filled in."""
    rules = _rules_hash()
    tasks = []
    for run in runs:
        tests_key = _cache.key(*[json.dumps(t, sort_keys=True) for t in run.tests]) if run.tests else ""
        for engine in engines:
            # the timeout is part of the key: a timed-out compile is cached as such, for that timeout only
            ckey = _cache.key("compile", run.unit.content_hash, engine, versions[engine], __version__, rules,
                              f"{spec.engine_timeout_s:g}")
            entry = cache.get(ckey)
            need_check = bool(run.tests)
            if entry is not None and need_check and entry.get("artefact") is not None:
                checked = cache.get(_cache.key(ckey, "check", tests_key))
                if checked is not None:
                    entry = {**entry, "accepted": checked["accepted"]}
                    need_check = False
            elif entry is not None:
                need_check = need_check and entry.get("artefact") is not None
            if entry is not None and not need_check:
                run.results[engine] = {**entry, "cached": True}
                run.pending.discard(engine)
                continue
            tasks.append(((run, engine, ckey, tests_key, entry is not None), engine_task(run, engine, entry, need_check)))
    return tasks


def _run_units(spec: CompileSpec, runs: list[UnitRun], engines: list[str], cache: _cache.Cache,
               finished: list[dict[str, Any]], done: int, total: int) -> Generator[Event, None, int]:
    """Run the engine work in worker processes, appending each unit's row to ``finished`` as it completes; returns the
    units served whole from the cache (those finish first). ``done``: how many count as done before any runs."""
    versions = engine_versions()
    tasks = _tasks(spec, runs, engines, cache, versions)
    hits = 0
    for run in runs:
        if not run.pending:
            hits += 1
            finished.append(finish(run, spec, versions))
            yield from unit_events(run, finished[-1], done + len(finished), total)
    if tasks:
        workers = spec.workers or min(os.cpu_count() or 1, 4)
        from synapse_cli.jobs.compile.pool import WorkerPool

        with WorkerPool(min(workers, len(tasks)), spec.engine_timeout_s, warm=tuple(engines)) as pool:
            for (run, engine, ckey, tests_key, was_cached), result in pool.run(tasks):
                result.setdefault("cached", was_cached)
                run.results[engine] = result
                run.pending.discard(engine)
                _store(cache, ckey, tests_key, result, was_cached)
                status = "ok" if result.get("artefact") is not None else "unsupported"
                yield Progress(done=done + len(finished), total=total, phase=engine, message=f"{run.unit.name}: {status}")
                if not run.pending:
                    finished.append(finish(run, spec, versions))
                    yield from unit_events(run, finished[-1], done + len(finished), total)
    return hits


def _store(cache: _cache.Cache, ckey: str, tests_key: str, result: dict, was_cached: bool) -> None:
    if not was_cached:
        entry = {k: result.get(k) for k in ("artefact", "ignored_keywords", "compile_ms", "error")}
        cache.put(ckey, entry)
    if tests_key and "accepted" in result:
        cache.put(_cache.key(ckey, "check", tests_key), {"accepted": result["accepted"]})
