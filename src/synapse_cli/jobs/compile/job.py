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
from typing import Any, ClassVar, Iterator

from synapse_cli import __version__
from synapse_cli.errors import JobError, UsageError
from synapse_cli.events import Artifact, Event, Finished, Log, Progress, Started
from synapse_cli.jobs.compile import cache as _cache
from synapse_cli.jobs.compile.engines import ARTEFACT_SUFFIX, ENGINES, PACKAGES
from synapse_cli.jobs.compile.inputs import BadInput, Unit, expand, load, safe_name
from synapse_cli.jobs._files import atomic_output


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


# -- labelled instances from --check -------------------------------------------------------


def load_checks(path: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """``(for_all, by_name)``: instances for every input, and instances addressed to one input."""
    everyone: list[dict] = []
    by_name: dict[str, list[dict]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --check file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
        if isinstance(row, dict) and isinstance(row.get("tests"), list):
            target = safe_name(str(row.get("id", row.get("input", ""))))
            for i, t in enumerate(row["tests"]):
                by_name.setdefault(target, []).append(_check_row(t, f"{where}#/tests/{i}"))
            continue
        test = _check_row(row, where)
        named = row.get("input") if isinstance(row, dict) else None
        if named:
            by_name.setdefault(safe_name(str(named)), []).append(test)
        else:
            everyone.append(test)
    return everyone, by_name


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict) or "data" not in row or not isinstance(row.get("valid"), bool):
        raise UsageError(f'{where}: a check line needs "data" and a boolean "valid"')
    return {"data": row["data"], "valid": row["valid"], "description": str(row.get("description", ""))}


def _tests_for(unit: Unit, everyone: list[dict], by_name: dict[str, list[dict]]) -> list[dict]:
    tests = list(unit.tests)
    tests += by_name.get(unit.name, [])
    short = unit.name.rsplit(".", 1)[-1]
    if short != unit.name:
        tests += by_name.get(short, [])
    for t in everyone:
        if unit.kind == "json_schema" or isinstance(t["data"], str):
            tests.append(t)
    return tests


# -- per-unit state --------------------------------------------------------------------------


class _UnitRun:
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
                fname = f"{name}.{_suffix(engine, self.unit.kind)}"
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


_SUFFIXES = ("schema.json", "regex", "gbnf", "lark", "report.json")


def _suffix(engine: str, kind: str) -> str:
    if engine == "xgrammar":
        return {"json_schema": "schema.json", "regex": "regex", "grammar": "gbnf"}[kind]
    return ARTEFACT_SUFFIX[engine]


def _engine_task(run: _UnitRun, engine: str, entry: dict | None, need_check: bool) -> Any:
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


def compile_constraints(spec: CompileSpec) -> Iterator[Event]:
    """Compile every input for every engine, verify against labelled instances, write artefacts."""
    t0 = time.perf_counter()
    unknown = [e for e in spec.engines if e not in ENGINES]
    if unknown or not spec.engines:
        raise UsageError(f"unknown engine {unknown[0] if unknown else '(none)'}; expected some of {', '.join(ENGINES)}")
    engines = [e for e in ENGINES if e in spec.engines]
    try:
        import jsonschema  # noqa: F401  (meta-schema checks, labels)
    except ImportError:
        raise UsageError("synapse compile needs its extra: pip install 'synapse-cli[compile]'") from None
    everyone, by_name = load_checks(spec.check) if spec.check else ([], {})

    cache = _cache.Cache(Path(spec.cache_dir) if spec.cache_dir else _cache.default_dir()) if spec.use_cache else _cache.Cache(None)
    items: list[Unit | BadInput] = []
    for path, label in _expand(spec):
        items.extend(load(path, cache if spec.use_cache else None, label))
    if not items:
        raise UsageError("no inputs: the directories given hold no .json or .jsonl files")
    single = len(spec.inputs) == 1 and not Path(spec.inputs[0]).is_dir() and len(items) == 1
    if single and isinstance(items[0], BadInput):
        raise UsageError(items[0].message)

    out_dir = Path(spec.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out_dir}: {exc.strerror}") from None

    seen: dict[str, str] = {}
    runs: list[_UnitRun] = []
    bad: list[BadInput] = []
    lo, hi = (int(spec.part[0]), int(spec.part[1])) if spec.part is not None else (0, len(items))
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
            clash = [p for p in (out_dir / f"{item.name}.{s}" for s in _SUFFIXES) if p.exists()]
            if clash:
                msg = f"{clash[0]} already exists (use --overwrite to replace it)"
                if single:
                    raise UsageError(msg)
                bad.append(BadInput(item.source, item.name, f"{item.source}: {msg}"))
                continue
        runs.append(_UnitRun(item, engines, _tests_for(item, everyone, by_name), out_dir))

    total = len(runs) + len(bad)
    yield Started(job="compile", total=total)
    for b in bad:
        yield Log(b.message, level="warning")

    versions = engine_versions()
    rules = _rules_hash()
    hits = 0
    done = len(bad)
    finished: list[dict[str, Any]] = []
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
            task = _engine_task(run, engine, entry, need_check)
            tasks.append(((run, engine, ckey, tests_key, entry is not None), task))

    # units fully served from the cache finish first
    for run in runs:
        if not run.pending:
            hits += 1
            done += 1
            finished.append(_finish(run, spec, versions))
            yield from _unit_events(run, finished[-1], done, total)

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
                yield Progress(done=done, total=total, phase=engine, message=f"{run.unit.name}: {status}")
                if not run.pending:
                    done += 1
                    finished.append(_finish(run, spec, versions))
                    yield from _unit_events(run, finished[-1], done, total)

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
        names = "; ".join(f"{r['name']} ({_reason(r)})" for r in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise JobError(f"{len(failed)} of {total} inputs failed: {names}{more}")


# -- shards: groups of inputs, merged into the one output folder ------------------------------


def _items(spec: CompileSpec) -> list[Unit | BadInput]:
    cache = _cache.Cache(Path(spec.cache_dir) if spec.cache_dir else _cache.default_dir()) if spec.use_cache else None
    items: list[Unit | BadInput] = []
    for path, label in _expand(spec):
        items.extend(load(path, cache, label))
    return items


def _expand(spec: CompileSpec) -> list[tuple[Path, str]]:
    names = spec.input_names
    if names is not None and len(names) != len(spec.inputs):
        raise UsageError(f"input_names lists {len(names)} name(s) for {len(spec.inputs)} input(s)")
    return expand(spec.inputs, names)


def compile_units(spec: CompileSpec) -> float:
    """How many inputs (schemas, constraint sets) the job has: what ``--shards auto`` divides."""
    return float(len(_items(spec)))


def split_compile(spec: CompileSpec, n: int, workdir: Path, settings: Any = None) -> list[CompileSpec]:
    """Up to ``n`` shard specs over contiguous groups of inputs, each writing into its own folder in ``workdir``.

    The whole job, unsplit, when there is one input, or when an output exists already and
    ``--overwrite`` is not given (each clash is then reported exactly as an unsharded run does).
    """
    from dataclasses import replace

    items = _items(spec)
    if len(items) < 2:
        return [spec]
    out_dir = Path(spec.output_dir)
    if not spec.overwrite and out_dir.is_dir():
        names = {item.name for item in items if not isinstance(item, BadInput)}
        if any((out_dir / f"{name}.{suffix}").exists() for name in names for suffix in _SUFFIXES):
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
        names = "; ".join(f"{r['name']} ({_reason(r)})" for r in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise JobError(f"{len(failed)} of {total} inputs failed: {names}{more}")


def _reason(row: dict) -> str:
    if row.get("error"):
        return row["error"]
    return "; ".join(row.get("problems", [])[:2]) or row["status"]


def _store(cache: _cache.Cache, ckey: str, tests_key: str, result: dict, was_cached: bool) -> None:
    if not was_cached:
        entry = {k: result.get(k) for k in ("artefact", "ignored_keywords", "compile_ms", "error")}
        cache.put(ckey, entry)
    if tests_key and "accepted" in result:
        cache.put(_cache.key(ckey, "check", tests_key), {"accepted": result["accepted"]})


def _finish(run: _UnitRun, spec: CompileSpec, versions: dict[str, str]) -> dict[str, Any]:
    """Summarise the unit's engines, write its files atomically, return its row of the result."""
    from synapse_cli.jobs.compile.verify import summarize

    unit = run.unit
    report_engines: dict[str, Any] = {}
    problems: list[str] = []
    for engine in run.engines:
        r = run.results.get(engine, {})
        supported = r.get("artefact") is not None
        row: dict[str, Any] = {
            "supported": supported,
            "ignored_keywords": list(r.get("ignored_keywords") or []),
            "error": r.get("error"),
            "compile_ms": r.get("compile_ms"),
            "artefact_bytes": len(r["artefact"].encode("utf-8")) if supported else None,  # grammar size, bounded by lower.py
            "artefact": f"{unit.name}.{_suffix(engine, unit.kind)}" if supported else None,
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
        report_engines[engine] = row
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
    files = run.files()
    files[f"{unit.name}.report.json"] = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    outputs = []
    for fname, text in files.items():
        dest = run.out_dir / fname
        with atomic_output(dest, overwrite=spec.overwrite) as tmp:
            tmp.write_text(text, encoding="utf-8")
        outputs.append((str(dest), len(text.encode("utf-8"))))
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


def _unit_events(run: _UnitRun, row: dict, done: int, total: int) -> Iterator[Event]:
    sizes = row.pop("_sizes")
    for path, size in zip(row["outputs"], sizes):
        yield Artifact(path=path, bytes=size)
    if row["status"] != "ok":
        yield Log(f"{row['name']}: {row['status']}: {_reason(row)}", level="warning")
    yield Progress(done=done, total=total, phase="schema", message=row["name"])
