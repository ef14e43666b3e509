"""Modal's exceptions as synapse's (``BackendError`` and its reasons), what is transient, and a deadline for each blocking step."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable

from synapse_cli.backends._remote import ErrorMap, map_errors
from synapse_cli.errors import BackendError, JobError
from synapse_cli.backends.modal.credentials import _server


@functools.lru_cache(maxsize=1)
def _modal_errors() -> ErrorMap:
    """modal's exceptions -> ours (built on first use: importing modal costs ~0.5 s)."""
    import modal.exception as mx

    return {
        mx.AuthError: (BackendError, "Modal rejected the credentials: {detail}"),
        mx.NotFoundError: (BackendError, "Modal app {app_name!r} not found{where} ({detail}): run `synapse deploy` first"),
        mx.FunctionTimeoutError: (JobError, "the Modal function timed out: {detail}"),
        mx.ConnectionError: (BackendError, "cannot reach Modal: {detail}"),
        mx.RemoteError: (JobError, "the job failed on Modal: {detail}"),
        mx.ExecutionError: (BackendError, "Modal could not run the job: {name}: {detail}"),
        mx.InternalFailure: (BackendError, "Modal could not run the job: {name}: {detail}"),
        mx.InternalError: (BackendError, "Modal could not run the job: {name}: {detail}"),
        mx.ServiceError: (BackendError, "Modal could not run the job: {name}: {detail}"),
        mx.Error: (BackendError, "Modal error: {name}: {detail}"),
    }


def map_modal_errors(app_name: str, environment: str | None) -> Any:
    """``with map_modal_errors(app, env):`` translates modal's exceptions into ours (``_modal_errors``)."""
    where = f" in environment {environment!r}" if environment else ""
    return map_errors(_modal_errors, app_name=app_name, where=where)


def _transient(exc: Exception) -> bool:
    """What is worth starting a call again for: Modal lost the worker, or was briefly unavailable."""
    import modal.exception as mx

    return isinstance(exc, (mx.ConnectionError, mx.InternalFailure, mx.InternalError, mx.ServiceError, mx.ResourceExhaustedError))


class _Deadline:
    """One budget for reaching Modal, shared by the connection, the lookups and the first RPCs.

    The modal client alone retries a dead connection for about a minute, so each step runs in
    a helper thread that we stop waiting for (and leave behind) when the budget is spent.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def run(self, fn: Callable[[], Any], what: str) -> Any:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(max(self.at - time.monotonic(), 0.0))
        if worker.is_alive():
            raise BackendError(f"cannot reach Modal at {_server()}: no answer to {what} within {self.seconds:g} s")
        if "error" in box:
            raise box["error"]
        return box.get("value")
