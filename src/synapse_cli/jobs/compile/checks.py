"""``--check``: labelled instances from a JSONL file, for every input or addressed to one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synapse_cli.errors import UsageError
from synapse_cli.jobs.compile.inputs import Unit, safe_name


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


def tests_for(unit: Unit, everyone: list[dict], by_name: dict[str, list[dict]]) -> list[dict]:
    tests = list(unit.tests)
    tests += by_name.get(unit.name, [])
    short = unit.name.rsplit(".", 1)[-1]
    if short != unit.name:
        tests += by_name.get(short, [])
    for t in everyone:
        if unit.kind == "json_schema" or isinstance(t["data"], str):
            tests.append(t)
    return tests
