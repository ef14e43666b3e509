"""The GitHub Action's logic (action.yml), kept here so it is testable.

- ``python ci.py requirement`` (run by path, before synapse is installed: standard library
  only at module level) prints what pip installs, from ``INPUT_VERSION``, ``INPUT_EXTRAS``
  and ``GITHUB_ACTION_PATH``.
- ``python -m synapse_cli.ci run`` runs ``synapse $INPUT_COMMAND --json``, folds its NDJSON
  into a log group, and writes the step outputs (``result``, ``outputs``, ``job-id``,
  ``seconds``, ``estimated-cost-usd``) to ``$GITHUB_OUTPUT``. A failure is also an ``::error``
  annotation; it exits with synapse's exit code. The step summary row is written by synapse
  itself (``runs.step_summary``).

Modal credentials come in as ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET`` (env, never arguments):
masked in the log, and dropped when empty so a runner's own Modal config still applies.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, MutableMapping, Sequence

OUTPUT_NAMES = ("result", "outputs", "job-id", "seconds", "estimated-cost-usd")


def requirement(env: Mapping[str, str]) -> str:
    """What to ``pip install``: ``synapse-cli[extras]==version``, or the action's own checkout when no version is given."""
    extras = ",".join(e.strip() for e in env.get("INPUT_EXTRAS", "").replace(" ", ",").split(",") if e.strip())
    suffix = f"[{extras}]" if extras else ""
    version = env.get("INPUT_VERSION", "").strip()
    if version:
        spec = version if version[0] in "<>=!~" else f"=={version}"
        return f"synapse-cli{suffix}{spec}"
    return f"synapse-cli{suffix} @ {Path(env.get('GITHUB_ACTION_PATH', '.')).resolve().as_uri()}"


def command_args(command: str) -> list[str]:
    """The command line after ``synapse``, with ``--json`` added unless it is there."""
    args = shlex.split(command)
    if args and args[0] == "synapse":
        args = args[1:]
    if not args:
        raise ValueError("the 'command' input is empty: give e.g. 'compile schemas/'")
    if "--json" not in args:
        args.append("--json")
    return args


def _option(args: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def write_outputs(path: str | None, outputs: Mapping[str, str]) -> None:
    """Append step outputs to ``$GITHUB_OUTPUT`` in its multi-line form (any value is safe)."""
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for name, value in outputs.items():
            delimiter = f"ghadelimiter_{uuid.uuid4()}"
            f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def _job_row(args: Sequence[str], since: float, kind: str) -> Any:
    """The job this run recorded: the newest of its kind in the store the command used."""
    from synapse_cli.config import load_settings
    from synapse_cli.store import JobStore

    try:
        settings = load_settings({}, _option(args, "--config"), _option(args, "--profile"))
        store = JobStore.from_settings(settings)
    except Exception:  # the store is optional to the outputs: the job's own result came on stdout
        return None
    try:
        return next((j for j in store.list() if j.kind == kind and j.created_at >= since - 1), None)
    finally:
        store.close()


def run(env: MutableMapping[str, str] | None = None, out: Any = None) -> int:
    from synapse_cli.render.plain import error_annotation

    env = dict(os.environ if env is None else env)
    out = out or sys.stdout
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        if env.get(name):
            print(f"::add-mask::{env[name]}", file=out, flush=True)
        else:
            env.pop(name, None)
    try:
        args = command_args(env.get("INPUT_COMMAND", ""))
    except ValueError as exc:
        print(error_annotation("synapse: bad input", str(exc)), file=out, flush=True)
        return 2
    kind = args[0]
    print(f"synapse {shlex.join(args)}", file=out, flush=True)
    since = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "synapse_cli", *args], stdout=subprocess.PIPE, text=True, env=env)
    events: list[dict[str, Any]] = []
    print("::group::synapse events (NDJSON)", file=out, flush=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line.rstrip("\n"), file=out, flush=True)
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            events.append(data)
    code = proc.wait()
    print("::endgroup::", file=out, flush=True)

    finished = next((e for e in reversed(events) if e.get("type") == "finished"), None)
    error = next((e for e in reversed(events) if e.get("type") == "error"), None)
    detached = next((e for e in events if "job_id" in e and "type" not in e), None)  # --detach prints the id only
    row = None if detached else _job_row(args, since, kind)
    result = finished["result"] if finished else (detached or error or {})
    cost = ((result.get("modal") or {}).get("estimated_cost_usd") if isinstance(result, dict) else None)
    if cost is None and row is not None:
        cost = row.cost_usd
    seconds = finished.get("elapsed_s") if finished else (row.wall_s if row is not None and row.wall_s is not None else None)
    outputs = {
        "result": json.dumps(result, separators=(",", ":"), default=str),
        "outputs": json.dumps([e["path"] for e in events if e.get("type") == "artifact"]),
        "job-id": (detached or {}).get("job_id") or (row.id if row is not None else ""),
        "seconds": "" if seconds is None else f"{float(seconds):.3f}",
        "estimated-cost-usd": f"{float(cost or 0):.6f}",
    }
    write_outputs(env.get("GITHUB_OUTPUT"), outputs)
    if code != 0:
        message = (error or {}).get("message") or f"synapse exited {code}"
        label = (error or {}).get("error") or "Error"
        print(error_annotation(f"synapse {kind}: {label}", message), file=out, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["requirement"]:
        print(requirement(os.environ))
        return 0
    if argv[:1] == ["run"]:
        return run()
    print("usage: python -m synapse_cli.ci {requirement|run}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
