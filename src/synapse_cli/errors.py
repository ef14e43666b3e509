"""Every error synapse reports, and the exit code each maps to.

Modal pickles container-side exceptions back to the caller, so these keep
args-only constructors: ``JobError("ffmpeg exited 1: ...")`` round-trips.
"""

from __future__ import annotations


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), cut to ``limit``
    characters with an ellipsis: the one rule for every message that reaches a terminal, a log or a client."""
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


class SynapseError(Exception):
    """Base class: one line for people, one exit code for pipelines."""

    exit_code = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:  # always one line
        return one_line(self.message) or type(self).__name__


class UsageError(SynapseError):
    """Flags, config or input rejected before the job starts."""

    exit_code = 2


class JobError(SynapseError):
    """The job ran and failed: ffmpeg error, corrupt media, infeasible constraints."""

    exit_code = 1


class BackendError(SynapseError):
    """The backend (Modal, an HTTP endpoint) is unreachable or refused us."""

    exit_code = 3


class Interrupted(SynapseError):
    """Ctrl-C, or a cancelled remote call."""

    exit_code = 130


_BY_NAME = {cls.__name__: cls for cls in (SynapseError, UsageError, JobError, BackendError, Interrupted)}
_BY_CODE = {1: JobError, 2: UsageError, 3: BackendError, 130: Interrupted}


def error_from_wire(name: str | None, code: int | None, message: str) -> SynapseError:
    """Rebuild an error that crossed a process boundary as ``{"error", "code", "message"}``."""
    cls = _BY_NAME.get(name or "") or _BY_CODE.get(code or 1, JobError)
    return cls(message)
