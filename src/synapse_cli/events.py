"""Typed progress events: what every job yields, and the one wire format.

A job is a generator of these. Locally the renderer consumes them directly;
across Modal or HTTP they travel as plain dicts (``to_dict``/``from_dict``),
which is also exactly what ``--json`` prints, one object per line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union


@dataclass(frozen=True)
class Started:
    """The job began; ``total`` is the unit count progress will reach (frames, schemas), if known."""

    job: str
    total: float | None = None
    type: ClassVar[str] = "started"


@dataclass(frozen=True)
class Progress:
    done: float
    total: float | None = None
    phase: str | None = None
    message: str | None = None
    type: ClassVar[str] = "progress"


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"  # "info" | "warning"
    shard: str | None = None  # "3/8" when a sharded job's shard said it
    type: ClassVar[str] = "log"


@dataclass(frozen=True)
class Artifact:
    """A finished output file (already renamed into place)."""

    path: str
    bytes: int
    type: ClassVar[str] = "artifact"


@dataclass(frozen=True)
class Finished:
    result: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    type: ClassVar[str] = "finished"


@dataclass(frozen=True)
class Failed:
    """The last line of a failed stream. Jobs never yield it: they raise, and the edge encodes it."""

    code: int
    message: str
    error: str = "JobError"
    type: ClassVar[str] = "error"


@dataclass(frozen=True)
class Deliveries:
    """What became of a job's webhooks, told by where they were sent (``synapse serve``) to the client
    that asked (``?report_webhooks=true``): one dict per message, as ``GET /v1/jobs/{id}`` lists them.
    Not a job event: the job store keeps them as deliveries (``synapse jobs show``), and renderers never see one."""

    webhooks: list[dict[str, Any]] = field(default_factory=list)
    type: ClassVar[str] = "webhooks"


Event = Union[Started, Progress, Log, Artifact, Finished, Failed, Deliveries]
_TYPES: dict[str, type] = {cls.type: cls for cls in (Started, Progress, Log, Artifact, Finished, Failed, Deliveries)}
_OPTIONAL = {"phase", "message", "shard"}  # left out of the wire form when None


def to_dict(event: Event) -> dict[str, Any]:
    """The wire form: ``{"type": ..., **fields}``; optional fields that are None are left out."""
    out: dict[str, Any] = {"type": event.type}
    for f in fields(event):
        value = getattr(event, f.name)
        if value is None and f.name in _OPTIONAL:
            continue
        out[f.name] = value
    return out


def from_dict(data: dict[str, Any]) -> Event:
    """Inverse of ``to_dict``. Unknown keys are ignored so newer servers can add fields."""
    try:
        cls = _TYPES[data["type"]]
    except (KeyError, TypeError):
        raise ValueError(f"not a synapse event: {data!r:.200}") from None
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def failed(exc: BaseException) -> Failed:
    """Encode an exception as the stream's final ``error`` event."""
    from synapse_cli.errors import SynapseError

    if isinstance(exc, SynapseError):
        return Failed(code=exc.exit_code, message=str(exc), error=type(exc).__name__)
    if isinstance(exc, KeyboardInterrupt):
        return Failed(code=130, message="interrupted", error="Interrupted")
    return Failed(code=1, message=f"{type(exc).__name__}: {exc}", error="JobError")


class Outcome:
    """How a job's stream ends, modelled once for every consumer (the job store's recorders, the
    streams that follow a job, the server's runner, the HTTP client).

    ``finished`` carries the result, but a job may still fail after it: compile reports the inputs
    that failed with an ``error`` after its ``finished``. So ``finished`` ends a job only once the
    stream is over, and an ``error`` always ends it: ``failed`` (``cancelled`` for code 130),
    keeping the result if one came first, whose outputs stay.

    ``see(event)`` each event in order; ``ended`` says nothing more can follow (an ``error``),
    ``finished`` that the result came (only an ``error`` may follow), ``status`` and ``final()``
    the job's final state."""

    def __init__(self) -> None:
        self.finished: Finished | None = None
        self.failure: Failed | None = None

    def see(self, event: Event) -> None:
        if self.failure is not None:
            return
        if isinstance(event, Failed):
            self.failure = event
        elif isinstance(event, Finished) and self.finished is None:
            self.finished = event

    @property
    def ended(self) -> bool:
        """An ``error`` came: the stream is over, whatever came before it."""
        return self.failure is not None

    @property
    def result(self) -> dict[str, Any] | None:
        """The job's result, if ``finished`` came (kept by a job that failed after it)."""
        return self.finished.result if self.finished is not None else None

    @property
    def failed_after_result(self) -> bool:
        return self.failure is not None and self.finished is not None

    @property
    def status(self) -> str | None:
        """``completed``, ``failed``, ``cancelled``, or None while neither came."""
        if self.failure is not None:
            return "cancelled" if self.failure.code == 130 else "failed"
        return "completed" if self.finished is not None else None

    def final(self) -> dict[str, Any]:
        """The final state's fields (``result``, ``error_code``, ``error_message``) as a store's ``finish`` takes them."""
        out: dict[str, Any] = {"result": self.result}
        if self.failure is not None:
            out.update(error_code=self.failure.code, error_message=self.failure.message)
        return out


def failed_after_result(status: str | None, result: Any) -> bool:
    """A job record's ``status`` and ``result`` (``Outcome.final()`` stored): the job failed after its
    result (compile's inputs that failed), so its outputs stay, as a completed job's do."""
    return status == "failed" and isinstance(result, dict)
