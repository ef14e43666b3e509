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


Event = Union[Started, Progress, Log, Artifact, Finished, Failed]
_TYPES: dict[str, type] = {cls.type: cls for cls in (Started, Progress, Log, Artifact, Finished, Failed)}
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
