"""What every job command shares around the pipeline: one call to it, errors mapped to exit codes in one place."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import typer

from synapse_cli.errors import SynapseError, one_line
from synapse_cli.events import failed
from synapse_cli.pipeline.options import RunOptions


@contextmanager
def exit_on_error(json_output: bool = False) -> Iterator[None]:
    """Map every failure to one stderr line and its exit code (and a last NDJSON ``error`` line with --json)."""

    def fail(exc: BaseException, label: str, message: str, code: int) -> None:
        if json_output:
            from synapse_cli.render.ndjson import encode

            ev = failed(exc)
            sys.stdout.write(encode(type(ev)(code=code, message=message, error=ev.error)) + "\n")
            sys.stdout.flush()
        print(f"{label}: {one_line(message)}", file=sys.stderr, flush=True)
        if not json_output:  # with --json the caller (e.g. python -m synapse_cli.ci) annotates from the error line
            from synapse_cli.render.plain import error_annotation, in_github_actions

            if in_github_actions():
                print(error_annotation(f"synapse: {label}", message), file=sys.stderr, flush=True)
        raise typer.Exit(code)

    try:
        yield
    except typer.Exit:
        raise
    except SynapseError as exc:
        if os.environ.get("SYNAPSE_TRACEBACK") == "1":
            raise
        fail(exc, "Interrupted" if exc.exit_code == 130 else type(exc).__name__, str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        fail(exc, "Interrupted", "interrupted", 130)
    except Exception as exc:  # a bug of ours or an unmapped foreign error: still one line
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            # whoever read stdout went away (`synapse jobs list | head -3`), and the job's cleanup has run on
            # the way here: stop quietly, with the code of a process that SIGPIPE ends, and give the
            # interpreter's last flush somewhere to go
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        if os.environ.get("SYNAPSE_TRACEBACK") == "1":
            raise
        fail(exc, "Error", f"{type(exc).__name__}: {exc} (set SYNAPSE_TRACEBACK=1 for details)", 1)


def _stdout_gone() -> bool:
    """Is stdout a pipe whose reader has gone? (polling its write end then reports an error.)"""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout has no file descriptor (a test's capture)
        return False


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """``synapse jobs cancel`` sends SIGTERM: treat it like Ctrl-C, so the job's cleanup runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(kind: str, common: RunOptions, /, *args: Any, summarize: Callable[[dict[str, Any]], str] | None = None, **options: Any) -> dict[str, Any]:
    """A job command's one call: plan the job with the pipeline, then detach it or render its events."""
    from synapse_cli import pipeline
    from synapse_cli.render import choose_mode, default_summary, render

    with exit_on_error(common.json):
        plan = pipeline.plan(kind, common, *args, **options)
        try:
            if common.detach:
                return detach(plan)
            stream = pipeline.job_events(plan)
            try:
                with sigterm_as_interrupt():
                    return render(stream, choose_mode(common.json), summarize or default_summary)
            finally:
                stream.close()  # on Ctrl-C this runs the job's cleanup (kill ffmpeg, remove temp files)
        finally:
            plan.close()
    return {}


def detach(plan: Any) -> dict[str, Any]:
    """Start the job where it survives this terminal and print its id."""
    import json

    from synapse_cli.pipeline import start_detached

    job = start_detached(plan)
    if plan.options.json:
        typer.echo(json.dumps({"job_id": job.id, "status": "pending", "kind": plan.kind, "backend": plan.backend.name}))
    else:
        typer.echo(job.id)
        print(f"{plan.kind}: detached as job {job.id} (synapse jobs wait {job.id})", file=sys.stderr)
    return {"job_id": job.id}
