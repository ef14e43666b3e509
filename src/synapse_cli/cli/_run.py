"""The one pipeline every job command goes through: resolve → spec → backend → render → exit code."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import typer

from synapse_cli.cli._options import Common
from synapse_cli.config import Settings, load_settings
from synapse_cli.errors import SynapseError
from synapse_cli.events import failed


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def exit_on_error(json_output: bool = False) -> Iterator[None]:
    """Map every failure to one stderr line and its exit code (and a last NDJSON ``error`` line with --json)."""

    def fail(exc: BaseException, label: str, message: str, code: int) -> None:
        if json_output:
            from synapse_cli.render.ndjson import encode

            ev = failed(exc)
            sys.stdout.write(encode(type(ev)(code=code, message=message, error=ev.error)) + "\n")
            sys.stdout.flush()
        print(f"{label}: {_one_line(message)}", file=sys.stderr, flush=True)
        raise typer.Exit(code)

    try:
        yield
    except typer.Exit:
        raise
    except SynapseError as exc:
        if os.environ.get("SYNAPSE_TRACEBACK") == "1":
            raise
        fail(exc, type(exc).__name__, str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        fail(exc, "Interrupted", "interrupted", 130)
    except Exception as exc:  # a bug of ours or an unmapped foreign error: still one line
        if os.environ.get("SYNAPSE_TRACEBACK") == "1":
            raise
        fail(exc, "Error", f"{type(exc).__name__}: {exc} (set SYNAPSE_TRACEBACK=1 for details)", 1)


def settings_for(common: Common, flags: dict[str, Any] | None = None) -> Settings:
    return load_settings({**common.flags(), **(flags or {})}, common.config, common.profile)


def backend_for(settings: Settings):
    """The backend the settings select: local (in-process), an HTTP endpoint, or Modal.

    An endpoint only matters for remote runs: with ``--use-modal`` (or ``backend = "modal"``)
    and an endpoint configured, the endpoint is used, as teams that front Modal with a web
    endpoint expect. ``--endpoint`` given on the command line selects it by itself.
    """
    endpoint = settings["modal.endpoint"]
    if endpoint and (settings["backend"] == "modal" or settings.source("modal.endpoint") == "flag"):
        from synapse_cli.backends.http import HttpBackend

        return HttpBackend.from_settings(settings)
    if settings["backend"] == "modal":
        from synapse_cli.backends.modal import ModalBackend

        return ModalBackend.from_settings(settings)
    from synapse_cli.backends.local import LocalBackend

    return LocalBackend()


def run_job(
    kind: str,
    build_spec: Callable[[Settings], Any],
    common: Common,
    flags: dict[str, Any] | None = None,
    summarize: Callable[[dict[str, Any]], str] | None = None,
    local_only: bool = False,
) -> dict[str, Any]:
    """Resolve settings, build and validate the spec, run it on the chosen backend and render its events."""
    from synapse_cli.render import choose_mode, default_summary, render

    with exit_on_error(common.json):
        settings = settings_for(common, flags)
        spec = build_spec(settings)
        if local_only:
            from synapse_cli.backends.local import LocalBackend

            backend = LocalBackend()
        else:
            backend = backend_for(settings)
        try:
            events = backend.run(kind, spec)
            try:
                return render(events, choose_mode(common.json), summarize or default_summary)
            finally:
                close = getattr(events, "close", None)
                if close:
                    close()  # on Ctrl-C this runs the job's cleanup (kill ffmpeg, remove temp files)
        finally:
            backend.close()
    return {}
