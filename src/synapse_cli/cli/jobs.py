from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Annotated, Any, Optional

import typer

from synapse_cli.cli._options import API_KEY, CONFIG, JSON, PROFILE
from synapse_cli.cli._run import exit_on_error, sigterm_as_interrupt
from synapse_cli.pipeline import RunOptions, settings_for
from synapse_cli.errors import BackendError, SynapseError, UsageError, one_line

app = typer.Typer(help="Jobs that outlive the terminal: list, show, wait, cancel, prune.", no_args_is_help=True, rich_markup_mode=None)

STATUS = Annotated[Optional[str], typer.Option("--status", help="pending | processing | completed | failed | cancelled")]
JOB_ID = Annotated[str, typer.Argument(help="Job id (a unique prefix is enough).", show_default=False)]


def _store(config, profile, api_key=None):
    from synapse_cli.store import JobStore

    settings = settings_for(RunOptions(config=config, profile=profile, api_key=api_key))
    return settings, JobStore.from_settings(settings)


def _fmt_s(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _output(job) -> str:
    result = job.result or {}
    return str(result.get("output") or result.get("output_dir") or "")


def _runner(job, settings):
    from synapse_cli.pipeline import runner_for

    return runner_for(job, settings)


def _ask_endpoint(job, store, settings, timeout_s: Optional[float] = None, retries: Optional[int] = None) -> Optional[dict]:
    """A running job sent to an endpoint (``--endpoint --detach``): the server's record of it, whose
    progress and any failure the backend writes to the store. None for other jobs, or (with a
    warning) when the endpoint cannot say: the local record still answers."""
    from synapse_cli.store import ACTIVE

    if not (job.remote and job.backend == "http" and job.status in ACTIVE):
        return None
    runner = _runner(job, settings)
    try:
        return runner.refresh(job, store, timeout_s=timeout_s, retries=retries)
    except SynapseError as exc:
        print(f"Warning: job {job.id}: {one_line(exc)}", file=sys.stderr)
        return None
    finally:
        runner.close()


def _endpoint_view(job, record: Optional[dict]) -> dict:
    """What ``list``/``show`` say of an endpoint job: the server's status, and whether its outputs are here yet."""
    if not record:
        return {}
    view = {"status": record.get("status") or job.status, "endpoint": f"{job.remote.get('endpoint')} (job {job.remote.get('id')})"}
    if view["status"] == "completed":
        view["outputs"] = f"not downloaded yet: synapse jobs wait {job.id}"
    return view


@app.command("list")
def list_jobs(status: STATUS = None, json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None, api_key: API_KEY = None) -> None:
    """Recent jobs, newest first, with their wall time and (for Modal) estimated cost, and the totals.

    A running job sent to an endpoint shows the endpoint's status and progress.

    Example: synapse jobs list --status processing
    """
    from synapse_cli.store import STATES

    with exit_on_error(json_output):
        if status and status not in STATES:
            raise UsageError(f"--status {status!r}: expected one of {', '.join(STATES)}")
        settings, store = _store(config, profile, api_key)
        views = {j.id: _endpoint_view(j, _ask_endpoint(j, store, settings, timeout_s=5.0, retries=0)) for j in store.list(status)}
        jobs = store.list(status)  # again: an endpoint may have ended some
        total_wall = sum(j.wall_s or 0 for j in jobs)
        total_cost = sum(j.cost_usd or 0 for j in jobs)
        if json_output:
            rows = [{**j.to_dict(), **views.get(j.id, {})} for j in jobs]
            typer.echo(json.dumps({"jobs": rows, "total_wall_s": round(total_wall, 3), "total_cost_usd": round(total_cost, 6)}))
            return
        typer.echo(f"{'ID':<14} {'KIND':<8} {'STATUS':<10} {'PROGRESS':<12} {'BACKEND':<7} {'TIME':>7} {'COST':>9}  OUTPUT")
        for j in jobs:
            progress = f"{j.done:g}/{j.total:g}" if j.done is not None and j.total else "-"
            cost = f"${j.cost_usd:.4f}" if j.cost_usd else "-"
            view = views.get(j.id, {})
            output = f"({view['outputs']})" if "outputs" in view else _output(j)
            typer.echo(f"{j.id:<14} {j.kind:<8} {view.get('status', j.status):<10} {progress:<12} {j.backend:<7} {_fmt_s(j.wall_s):>7} {cost:>9}  {output}")
        typer.echo(f"{len(jobs)} job(s), {_fmt_s(total_wall)} wall time, est. cost ${total_cost:.4f}", err=True)


@app.command("show")
def show(job_id: JOB_ID, json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None, api_key: API_KEY = None) -> None:
    """Status, progress, backend, params, timings, output path and error of one job.

    A running job sent to an endpoint is asked there for its status and progress.
    """
    with exit_on_error(json_output):
        settings, store = _store(config, profile, api_key)
        job = store.get(job_id)
        record = _ask_endpoint(job, store, settings)
        job = store.get(job.id)  # with the endpoint's progress, or its end
        data = {**job.to_dict(), **_endpoint_view(job, record)}
        shards = _shard_states(store, job.id, job.status)
        if job.status in ("pending", "processing") and (job.remote or {}).get("shards"):  # spawned shards: ask where they run
            try:
                shards = _runner(job, settings).shard_states(job)
            except BackendError as exc:
                print(f"Warning: {exc}; the shards' states are the job store's", file=sys.stderr)
        if shards:
            data["shards"] = shards
        deliveries = store.deliveries(job.id)
        if deliveries:
            data["webhooks"] = deliveries
        if json_output:
            typer.echo(json.dumps(data, default=str))
            return
        if shards:
            typer.echo(f"{'shards':<14} " + ", ".join(f"{s['shard']} {s['state']}" + _shard_progress(s) for s in shards))
        for key in ("id", "kind", "status", "backend", "endpoint", "progress", "phase", "wall_s", "gpu", "cost_usd", "error_code", "error_message", "outputs"):
            if data.get(key) is not None:
                typer.echo(f"{key:<14} {data[key]}")
        for key in ("created_at", "started_at", "finished_at"):
            if data.get(key):
                typer.echo(f"{key:<14} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(data[key]))}")
        if _output(job):
            typer.echo(f"{'output':<14} {_output(job)}")
        typer.echo(f"{'spec':<14} {json.dumps(job.spec)}")
        for d in deliveries:  # what became of each webhook (synapse_cli.notify)
            status = f" HTTP {d['http_status']}" if d["http_status"] is not None else ""
            detail = f": {d['detail']}" if d["detail"] and d["outcome"] != "delivered" else ""
            typer.echo(f"{'webhook':<14} {d['event']} {d['outcome']}{status} after {d['attempts']} attempt(s) to {d['target']}{detail}")


def _shard_progress(state: dict[str, Any]) -> str:
    done, total = state.get("done"), state.get("total")
    return f" {done or 0:g}/{total:g}" if total else ""


def _shard_states(store: Any, job_id: str, status: str) -> list[dict[str, str]]:
    """Each shard's state, from the ``log`` events a sharded run records (``shard`` = "i/n")."""
    states: dict[str, str] = {}
    for _, event in store.events(job_id):
        tag = event.get("shard") if event.get("type") == "log" else None
        if tag:
            finished = str(event.get("message", "")).startswith(f"shard {tag} finished")
            states[tag] = "finished" if finished else states.get(tag, "running")
    if status in ("failed", "cancelled"):
        states = {k: (v if v == "finished" else status) for k, v in states.items()}
    return [{"shard": k, "state": v} for k, v in sorted(states.items(), key=lambda kv: int(kv[0].split("/")[0]))]


@app.command("wait")
def wait(job_id: JOB_ID, json_output: JSON = False, config: CONFIG = None, profile: PROFILE = None, api_key: API_KEY = None) -> None:
    """Re-attach to a job: render its progress live until it ends, and exit with the job's exit code.

    A job sent to an endpoint is followed from where the last wait left off, then its outputs are downloaded.
    """
    from synapse_cli.render import choose_mode, default_summary, render
    from synapse_cli.store.recording import store_events

    with exit_on_error(json_output):
        settings, store = _store(config, profile, api_key)
        job = store.get(job_id)
        if job.status in ("pending", "processing"):  # still running: follow it where it runs
            events = _runner(job, settings).follow(job, store)
        else:
            events = store_events(store, job.id)
        with sigterm_as_interrupt():
            render(events, choose_mode(json_output), default_summary)


@app.command("cancel")
def cancel(job_id: JOB_ID, config: CONFIG = None, profile: PROFILE = None, api_key: API_KEY = None) -> None:
    """Cancel a running job: a local worker is stopped (and its ffmpeg with it); a Modal call is cancelled;
    an endpoint is asked to cancel its job (DELETE)."""
    with exit_on_error():
        settings, store = _store(config, profile, api_key)
        job = store.get(job_id)
        if job.status not in ("pending", "processing"):
            raise UsageError(f"job {job.id} is already {job.status}")
        _runner(job, settings).cancel(job, store)
        typer.echo(f"cancelled {job.id}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"--older-than expects a number and a unit (s, m, h, d, w), e.g. 7d; got {text!r}")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]


@app.command("prune")
def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Age of finished jobs to delete, e.g. 7d, 12h.")] = "7d",
    config: CONFIG = None,
    profile: PROFILE = None,
) -> None:
    """Delete finished jobs (and their events) older than the given age. Running jobs are kept."""
    with exit_on_error():
        seconds = parse_duration(older_than)
        _, store = _store(config, profile)
        typer.echo(f"pruned {store.prune(seconds)} job(s)")


@app.command("worker", hidden=True)
def worker(job_id: JOB_ID) -> None:
    """Run a detached job (started by --detach in its own session)."""
    from synapse_cli.pipeline import backend_for
    from synapse_cli.config import load_settings
    from synapse_cli.jobs import spec_from_dict
    from synapse_cli.notify import Target
    from synapse_cli.store.recording import record, step_summary, with_webhooks
    from synapse_cli.store import JobStore

    with exit_on_error():
        store = JobStore(os.environ["SYNAPSE_JOBS_DB"]) if os.environ.get("SYNAPSE_JOBS_DB") else JobStore.from_settings(load_settings({}))
        job = store.get(job_id)
        settings = load_settings(job.flags or {})
        spec = spec_from_dict(job.kind, job.spec)
        backend = backend_for(settings, local_only=job.backend == "local")
        try:
            target = Target.from_settings(settings, local=backend.name == "local")  # [notify] url / --notify: sent from here
        except SynapseError as exc:  # the client checked it; a changed environment can still refuse it
            store.finish(job.id, "failed", error_code=exc.exit_code, error_message=str(exc))
            raise
        if not store.start(job.id):  # cancelled, or reaped, before this worker got to it
            print(f"job {job.id} is already {store.get(job.id).status}: not running it", file=sys.stderr)
            return
        from synapse_cli.shards import job_events

        with sigterm_as_interrupt():
            events = record(store, job, lambda: job_events(job.kind, spec, backend, settings), on_end=step_summary)  # an error starting it fails the row
            for _ in with_webhooks(events, target, job.id, job.kind, store.path):  # the terminal delivery is waited for
                pass
        print(f"job {job.id} done", file=sys.stderr)
