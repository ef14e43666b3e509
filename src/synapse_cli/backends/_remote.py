"""Remote plumbing: what the Modal and HTTP backends (and the container and server sides) share.

- ``stage_paths``: the one walk over a spec's ``INPUTS`` and ``OUTPUTS`` (``jobs.path_values``
  is the rule for a bad value), replacing each path with what the other side should see.
- ``Outputs``/``collect_outputs``: the one outputs policy. Each output is fetched into a temporary
  sibling of its destination (``jobs._files.atomic_output``); all are committed when the job's
  ``finished`` arrives, or none: an error, a broken stream or Ctrl-C leaves no output behind.
- ``retry_until_first_event``: stamina's backoff around starting a job, a warning ``Log`` per
  retry; once the first event came the job is never replayed.
- ``map_errors``: a table from foreign exception classes to ours, the most specific match
  wins (httpx's ``map_httpcore_exceptions``), the foreign one kept as ``__cause__``.
- ``StagedNames``: the other side's copies of the user's files -> the paths the user gave, in the
  text that comes back (log lines, progress messages, errors), so that a remote run's messages
  name what a local run's would.

No typer, rich, httpx or modal here: the container imports ``stage_paths``.
"""

from __future__ import annotations

import logging
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, TypeVar

from synapse_cli.errors import BackendError, SynapseError, error_from_wire, one_line
from synapse_cli.events import Artifact, Deliveries, Event, Failed, Finished, Log, Progress
from synapse_cli.jobs import get_kind, path_values
from synapse_cli.jsonwalk import map_strings
from synapse_cli.jobs._files import atomic_output

# stamina logs each scheduled retry at WARNING; with no logging configured Python would print
# the bare "stamina.retry_scheduled" on stderr. We report retries ourselves, as Log events.
logging.getLogger("stamina").addHandler(logging.NullHandler())

T = TypeVar("T")


# -- paths ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathField:
    """One path of a spec: its field, its list index (None for a plain path) and its value."""

    field: str
    index: int | None
    value: str
    output: bool

    @property
    def is_dir(self) -> bool:
        """A directory output (a field named ``*_dir``, e.g. compile's ``output_dir``)."""
        return self.output and self.field.endswith("_dir")


def stage_paths(kind: str, data: Mapping[str, Any], place: Callable[[PathField], str]) -> dict[str, Any]:
    """A copy of spec dict ``data`` with every input and output path replaced by ``place(path)``.

    Inputs come first, then outputs, each in field order; a list stays a list. A URL
    (``s3://``, ``https://``) is no path: it stays as it is, never given to ``place``, so no
    backend uploads or downloads it; the job's own side reads and writes it (``synapse_cli.storage``).
    """
    from synapse_cli.storage.urls import is_url

    record = get_kind(kind)
    out = dict(data)
    for names, output in ((record.inputs, False), (record.outputs, True)):
        for name in names:
            placed = [(i, v if is_url(v) else place(PathField(name, i, v, output)))
                      for i, v in path_values(data.get(name), "output" if output else "input", name)]  # fmt: skip
            if placed:
                out[name] = placed[0][1] if placed[0][0] is None else [v for _, v in placed]
    return out


def path_fields(kind: str, data: Mapping[str, Any]) -> list[PathField]:
    """Every input and output path of ``data``, in ``stage_paths`` order."""
    found: list[PathField] = []
    def collect(p: PathField) -> str:
        found.append(p)
        return p.value

    stage_paths(kind, data, collect)
    return found


class StagedNames:
    """Staged copies' paths -> the user's paths, in the text of what a job says (a Modal container
    reads ``/data/inputs/<sha256>/clip.mp4`` where the user typed ``clip.mp4``).

    ``names`` maps a *key* to the user's path. A key is the part of a staged path that nothing
    else contains (it holds a content hash or a job id), e.g. ``inputs/<sha256>/clip.mp4``: the
    other side may write it under any folder (where its storage is mounted is its business) or
    after one of ``schemes`` (``vol:``). A path below a staged folder keeps its relative part. A
    key that ends in ``/`` is a folder whose files all map into the user's folder (``""`` for
    the working directory): a job writes its output to a temporary sibling first.
    """

    def __init__(self, names: Mapping[str, str], schemes: Iterable[str] = ()) -> None:
        self.names = dict(names)
        keys = sorted(self.names, key=len, reverse=True)  # the most specific key wins
        alternatives = "|".join(re.escape(k) + ("" if k.endswith("/") else r"(?![\w-])") for k in keys)
        prefix = "|".join([*map(re.escape, schemes), r"(?:/[^/\s'\"]+)*/"])
        self._pattern = re.compile(f"(?:{prefix})?({alternatives})") if keys else None

    def text(self, text: str) -> str:
        """``text`` with every staged path replaced by the user's."""
        if self._pattern is None or not any(k in text for k in self.names):
            return text
        return self._pattern.sub(lambda m: self.names[m.group(1)], text)

    def value(self, value: Any) -> Any:
        """``text`` applied to every string of a JSON-like value (a ``finished`` result)."""
        return map_strings(value, self.text)

    def event(self, event: Event) -> Event:
        """The event as the user should read it: its message (or result) named."""
        if isinstance(event, (Log, Failed)) or (isinstance(event, Progress) and event.message):
            return replace(event, message=self.text(event.message or ""))
        if isinstance(event, Finished):
            return replace(event, result=self.value(event.result))
        return event

    def stream(self, events: Iterator[Event]) -> Iterator[Event]:
        """``events`` named, and the message of our error that ends them too (its class, cause and
        traceback kept). Closing this closes ``events``."""
        try:
            for event in events:
                yield self.event(event)
        except SynapseError as exc:
            if exc.args:
                exc.args = (self.text(str(exc.args[0])), *exc.args[1:])
            raise
        finally:
            close(events)


# -- outputs: all on finished, or none --------------------------------------------------------


class Outputs:
    """Outputs waiting in temporary siblings of their destinations until ``commit()``.

    ``with Outputs(overwrite) as outputs:`` — leaving the block without ``commit()`` removes
    every temporary file and any folder made for them.
    """

    def __init__(self, overwrite: bool) -> None:
        self.overwrite = overwrite
        self._stack = ExitStack()
        self._made: list[Path] = []  # folders created for a destination, removed if nothing is committed
        self._committed = False

    def receive(self, dest: Path, write: Callable[[Path], None]) -> None:
        """Fetch one output now: ``write(tmp)`` fills a temporary sibling of ``dest``."""
        missing = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._made.extend(reversed(missing))
        write(self._stack.enter_context(atomic_output(dest, self.overwrite)))

    def commit(self) -> None:
        """Rename every fetched output into place."""
        self._committed = True
        self._stack.close()

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._committed:
            return
        try:
            self._stack.__exit__(BackendError, BackendError("not committed"), None)  # unlink, do not commit
        finally:
            for folder in reversed(self._made):
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else lives there
                    pass


def collect_outputs(
    events: Iterable[Event],
    fetch: Callable[[Artifact, Outputs], Event],
    overwrite: bool,
    where: str,
    finish: Callable[[Finished], Finished] = lambda e: e,
    defer: bool = False,
) -> Iterator[Event]:
    """The remote events as local ones, under the one outputs policy.

    ``fetch(artifact, outputs)`` calls ``outputs.receive`` for the artifact's local destination
    and returns the event to report once committed (the local ``Artifact``, or a warning ``Log``).
    Fetching happens as each artifact arrives, or with ``defer`` once ``finished`` came (an
    HTTP endpoint serves a finished job's files). Artifacts are reported just before
    ``finished``, after every output was committed; an ``error`` event raises its own class, after
    ``finished`` too (the outputs committed stay: ``events.Outcome``). After ``finished`` only an
    endpoint's report of the job's webhooks (``Deliveries``) is passed on, for the job store.
    """
    finished = False
    try:
        with Outputs(overwrite) as outputs:
            pending: list[Artifact] = []
            reports: list[Event] = []
            for event in events:  # read to the end, so that the call ends as it should after ``finished``
                if isinstance(event, Failed):
                    raise error_from_wire(event.error, event.code, event.message)
                if finished:
                    if isinstance(event, Deliveries):
                        yield event
                    continue
                if isinstance(event, Artifact):
                    if defer:
                        pending.append(event)
                    else:
                        reports.append(fetch(event, outputs))
                    continue
                if isinstance(event, Finished):
                    reports.extend(fetch(e, outputs) for e in pending)
                    outputs.commit()
                    finished = True
                    yield from sorted(reports, key=lambda e: isinstance(e, Artifact))  # warnings first
                    yield finish(event)
                    continue
                yield event
    finally:
        close(events)  # an early close (or a failure) ends the remote stream too
    if not finished:
        raise BackendError(f"the stream from {where} ended before the job finished; nothing was saved")


def close(events: Iterable[Any]) -> None:
    """Close an event stream if it can be closed (a generator: its ``finally`` ends the call behind it)."""
    stop = getattr(events, "close", None)
    if stop is not None:
        stop()


# -- retries before the first event -------------------------------------------------------------


def retry_until_first_event(
    start: Callable[[], T],
    on: Callable[[Exception], bool | float],
    retries: int,
    backoff_s: float,
    what: str,
    describe: Callable[[Exception], str] = lambda exc: one_line(exc, 200) or type(exc).__name__,
) -> Generator[Log, None, T]:
    """``start()`` until it returns, retrying what ``on`` allows (stamina: exponential backoff with
    jitter; a float from ``on`` is the exact wait, e.g. Retry-After). Yields a warning ``Log``
    before each retry and returns ``start()``'s value: ``x = yield from retry_until_first_event(...)``.
    The last failure propagates as it is.
    """
    import stamina

    last: Exception | None = None
    for attempt in stamina.retry_context(  # (stamina >= 26.2 types ``on`` for any BaseException; only ours are retried)
        on=lambda exc: isinstance(exc, Exception) and on(exc), attempts=retries + 1, timeout=None, wait_initial=backoff_s, wait_max=max(30.0, backoff_s), wait_jitter=backoff_s
    ):
        if last is not None:
            yield Log(f"{what}: {describe(last)}; retry {attempt.num - 1} of {retries}", level="warning")
        with attempt:
            try:
                return start()
            except Exception as exc:
                last = exc
                raise
    raise AssertionError("unreachable")  # pragma: no cover


# -- errors -----------------------------------------------------------------------------------

ErrorMap = Mapping[type, "tuple[type[SynapseError], str]"]


def mapped_error(exc: BaseException, table: ErrorMap | Callable[[], ErrorMap], **context: Any) -> SynapseError | None:
    """Our error for ``exc`` by ``table`` (the most specific class that matches), or None.

    ``table`` may be a function that builds it, called only now: modal's exception classes
    cost an ``import modal`` (~0.5 s), which a run that goes well pays later, inside its deadline.
    """
    table = table() if callable(table) else table
    best: type | None = None
    for cls in table:
        if isinstance(exc, cls) and (best is None or issubclass(cls, best)):
            best = cls
    if best is None:
        return None
    ours, template = table[best]
    detail = one_line(exc, 200) or type(exc).__name__
    return ours(template.format(detail=detail, name=type(exc).__name__, **context))


@contextmanager
def map_errors(table: ErrorMap | Callable[[], ErrorMap], **context: Any) -> Iterator[None]:
    """Translate foreign exceptions at the backend's edge: ``with map_errors(TABLE, url=url):``.

    A template sees ``{detail}`` (the exception's text on one line), ``{name}`` (its class)
    and ``context``. Our own errors pass untouched; the foreign one stays as ``__cause__``.
    """
    try:
        yield
    except SynapseError:
        raise
    except Exception as exc:
        ours = mapped_error(exc, table, **context)
        if ours is None:
            raise
        raise ours from exc
