"""The Python API: the CLI's jobs, called from code.

Every function goes through the pipeline the CLI uses (``synapse_cli.pipeline``): the same
settings resolution (keyword > ``SYNAPSE_*`` env > ``.synapse.toml`` > default), the same
spec building and validation (each kind's own builder), the same backends, job store and
result cache. Nothing is rendered: you get the events.

- ``stream(kind, ...)`` / ``export(...)``, ``compile(...)``, ``infer(...)``, ``sample(...)``:
  a ``JobStream`` of the typed events (``Started``, ``Progress``, ``Log``, ``Artifact``,
  ``Finished``). Closing it early (``break``, ``close()``, leaving a ``with`` block, a
  ``KeyboardInterrupt``) cancels the job, as Ctrl-C does in the CLI.
- ``run(kind, ...)``: blocks, returns the ``Finished`` result or raises the CLI's exceptions
  (``UsageError``, ``JobError``, ``BackendError``, ``Interrupted``), each with its ``exit_code``.
- ``submit(kind, ...)``: a detached ``Job`` (``wait()``, ``cancel()``, ``events()``), as ``--detach``.
- ``stream_async``/``export_async``/...: the same events as an async iterator; the job runs in a
  thread of its own, so the event loop is never blocked.
- ``settings(...)``: the resolved settings and where each came from, as ``config show --json``.

Options are the command's own parameters, by their Python names (``synapse export --job
framing -o out.mp4`` is ``export("clip.mp4", job="framing", output="out.mp4")``), plus the
common ones (``RunOptions``): ``use_modal``, ``overwrite``, ``config``, ``profile``, ``endpoint``,
``api_key``, ``cache``, ``shards`` (``submit`` is ``--detach``); ``params={...}`` for export's ``--set KEY=VALUE``; and
``settings={"ffmpeg.preset": "veryfast"}`` (or nested TOML-style tables) for any config key.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping, Union

from synapse_cli.events import Event, Finished

PathLike = Union[str, "os.PathLike[str]"]

# and, made from the kinds' records on first use (``__getattr__`` below): ``export``, ``compile``,
# ``infer``, ``sample`` and their ``*_async`` twins, and the same for any kind a plugin adds
__all__ = ["Job", "JobStream", "run", "run_async", "settings", "stream", "stream_async", "submit"]

def _flat_settings(values: Mapping[str, Any] | None) -> dict[str, Any]:
    from synapse_cli.config import _flatten

    return {k: v for k, v in _flatten(dict(values or {})).items() if v is not None}


def _plan(kind: str, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
    """The pipeline's plan for these arguments: the same call ``synapse <kind>`` makes."""
    from synapse_cli import pipeline

    options = dict(options)
    flags = _flat_settings(options.pop("settings", None))
    common = pipeline.RunOptions.take(options)
    return pipeline.plan(kind, common, *args, flags=flags, **options)


# -- streams ---------------------------------------------------------------------------------


class JobStream(Iterator[Event]):
    """The events of one running job. Iterate it; ``close()`` it (or leave its ``with`` block,
    or ``break`` out of the loop) to cancel the job.

    Errors surface from ``next()`` as ``synapse_cli.errors`` exceptions with the CLI's exit codes.
    ``job_id`` is the job's id in the job store (``synapse jobs show``), set from the first event on.
    """

    def __init__(self, plan: Any) -> None:
        from synapse_cli.pipeline import job_events

        self._plan = plan
        self._events: Iterator[Event] | None = job_events(plan)

    @property
    def kind(self) -> str:
        return self._plan.kind

    @property
    def spec(self) -> Any:
        """The validated spec the job runs on (a dataclass: ``ExportSpec``, ``CompileSpec``...)."""
        return self._plan.spec

    @property
    def job_id(self) -> str | None:
        return self._plan.job_id

    def __iter__(self) -> "JobStream":
        return self

    def __next__(self) -> Event:
        if self._events is None:
            raise StopIteration
        try:
            return next(self._events)
        except BaseException:  # the end, an error, or Ctrl-C: the job's own cleanup has run; release the rest
            self.close()
            raise

    def close(self) -> None:
        """Cancel the job if it is still running (kill ffmpeg, remove partial outputs) and release the store and backend."""
        events, self._events = self._events, None
        try:
            if events is not None:
                events.close()  # type: ignore[attr-defined]
        finally:
            self._plan.close()

    def __enter__(self) -> "JobStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # ``for ev in stream: break`` drops the last reference: cancel as Ctrl-C would
        try:
            self.close()
        except Exception:
            pass


def stream(kind: str, /, *args: Any, **options: Any) -> JobStream:
    """Start job ``kind`` and return its events. Settings and spec are checked here: a bad option raises now."""
    return JobStream(_plan(kind, args, options))



def _drain(events: Iterator[Event]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for event in events:
        if isinstance(event, Finished):
            result = event.result
    return result


def run(kind: str, /, *args: Any, **options: Any) -> dict[str, Any]:
    """Run job ``kind`` to the end and return its result (the ``finished`` event's ``result``).

    ``run("compile", inputs=["schemas/"], output_dir="out")``. Raises ``UsageError`` (exit code 2),
    ``JobError`` (1), ``BackendError`` (3) or ``Interrupted`` (130), as the CLI exits.
    """
    with stream(kind, *args, **options) as events:
        return _drain(events)


# -- detached jobs ---------------------------------------------------------------------------


class Job:
    """A detached job (``submit``): it runs in a worker process or a spawned Modal call, and
    outlives this process. ``Job(id)`` re-attaches to one started elsewhere (``--detach``)."""

    def __init__(self, id: str, *, config: PathLike | None = None, profile: str | None = None,
                 settings: Mapping[str, Any] | None = None, _resolved: Any = None) -> None:
        self.id = id
        self._resolved = _resolved if _resolved is not None else _settings_object(config, profile, settings)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def _store(self) -> Any:
        from synapse_cli.store import JobStore

        return JobStore.from_settings(self._resolved)

    def info(self) -> dict[str, Any]:
        """The job's row in the store, as ``synapse jobs show --json`` prints it."""
        store = self._store()
        try:
            return store.get(self.id).to_dict()
        finally:
            store.close()

    @property
    def status(self) -> str:
        """pending | processing | completed | failed | cancelled"""
        return self.info()["status"]

    def events(self) -> Iterator[Event]:
        """Its events from the start, then live until it ends (as ``synapse jobs wait``); a failure raises its error.
        Closing this iterator stops following; it does not cancel the job (``cancel()`` does)."""
        from synapse_cli.pipeline import runner_for
        from synapse_cli.store.recording import store_events
        from synapse_cli.store import ACTIVE

        store = self._store()
        runner = None
        try:
            row = store.get(self.id)
            if row.status in ACTIVE:
                runner = runner_for(row, self._resolved)
                yield from runner.follow(row, store)
            else:
                yield from store_events(store, row.id)
        finally:
            if runner is not None:
                runner.close()
            store.close()

    def wait(self) -> dict[str, Any]:
        """Block until the job ends; return its result or raise its error (with the job's exit code)."""
        events = self.events()
        try:
            return _drain(events)
        finally:
            events.close()  # type: ignore[attr-defined]

    def cancel(self) -> bool:
        """Cancel it (a local worker is stopped with its ffmpeg; a Modal call is cancelled). False if it had already ended."""
        from synapse_cli.pipeline import runner_for
        from synapse_cli.store import ACTIVE

        store = self._store()
        try:
            row = store.get(self.id)
            if row.status not in ACTIVE:
                return False
            runner = runner_for(row, self._resolved)
            try:
                runner.cancel(row, store)
            finally:
                runner.close()
            return True
        finally:
            store.close()


def submit(kind: str, /, *args: Any, **options: Any) -> Job:
    """Start job ``kind`` detached (as ``--detach``) and return its handle at once.

    ``job = submit("infer", "match.mp4", task="track")``; then ``job.wait()``, ``job.cancel()``, ``job.events()``.
    """
    from synapse_cli.pipeline import start_detached

    plan = _plan(kind, args, options)
    try:
        row = start_detached(plan)
        return Job(row.id, _resolved=plan.settings)
    finally:
        plan.close()


# -- async -----------------------------------------------------------------------------------

_END = object()


async def stream_async(kind: str, /, *args: Any, **options: Any) -> AsyncIterator[Event]:
    """``stream`` for asyncio: ``async for event in stream_async("export", "clip.mp4", job="framing")``.

    The job runs in a thread of its own (its job store connection lives there too), so the
    event loop never waits on it. Leaving the loop early (``break``, task cancellation) cancels
    the job at its next event; use ``contextlib.aclosing`` to have that happen at once.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any, exc: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, exc))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def produce() -> None:
        try:
            with stream(kind, *args, **options) as events:
                for event in events:
                    put(event)
                    if stop.is_set():
                        break  # leaving the with block cancels the job
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            put(None, exc)
        else:
            put(_END)

    worker = threading.Thread(target=produce, name=f"synapse-{kind}", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        await asyncio.shield(asyncio.to_thread(worker.join))



async def run_async(kind: str, /, *args: Any, **options: Any) -> dict[str, Any]:
    """``run`` for asyncio: ``result = await run_async("compile", ["schemas/"], output_dir="out")``."""
    result: dict[str, Any] = {}
    async for event in stream_async(kind, *args, **options):
        if isinstance(event, Finished):
            result = event.result
    return result


# -- one shortcut per kind, made from its record --------------------------------------------------


def _shortcut(kind: str, asynchronous: bool) -> Any:
    """``export(input, **options)`` for kind ``export`` (``export_async`` with ``asynchronous``):
    ``stream(kind, ...)``/``stream_async(kind, ...)`` under the kind's name, with its builder's
    parameters and docstring, so ``help(synapse.export)`` says what it takes."""
    import inspect

    from synapse_cli.pipeline import RunOptions
    from synapse_cli.pipeline.planning import get_record

    record = get_record(kind)
    target = stream_async if asynchronous else stream

    def shortcut(*args: Any, **options: Any) -> Any:
        return target(kind, *args, **options)

    name = f"{kind}_async" if asynchronous else kind
    shortcut.__name__ = shortcut.__qualname__ = name
    shortcut.__module__ = __name__
    if record.build:
        builder = record.hook("build")
        params = [p for n, p in inspect.signature(builder).parameters.items() if n not in ("settings", "overwrite", "cache")]
        keyword = inspect.Parameter.KEYWORD_ONLY
        params += [inspect.Parameter(n, keyword, default=None) for n in record.options]
        params += [inspect.Parameter(n, keyword, default=d) for n, d, o in RunOptions.options() if o.api]
        params.append(inspect.Parameter("settings", keyword, default=None))
        shortcut.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        shortcut.__doc__ = f"``synapse {kind}`` from Python: {'an async iterator of' if asynchronous else 'a JobStream of'} its events. {builder.__doc__ or ''}".strip()
    return shortcut


def shortcut_kind(name: str) -> str | None:
    """The kind that ``name`` is a shortcut of (``export``, ``export_async``), if one is registered."""
    from synapse_cli.jobs import JOBS

    kind = name[: -len("_async")] if name.endswith("_async") else name
    return kind if kind in JOBS and JOBS[kind].build else None


def __getattr__(name: str) -> Any:
    kind = shortcut_kind(name)
    if kind is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _shortcut(kind, name.endswith("_async"))
    globals()[name] = value
    return value


# -- settings --------------------------------------------------------------------------------


def _settings_object(config: PathLike | None, profile: str | None, values: Mapping[str, Any] | None, **common: Any) -> Any:
    from synapse_cli.pipeline import RunOptions, settings_for

    options = RunOptions(config=Path(config) if config is not None else None, profile=profile, **common)
    return settings_for(options, _flat_settings(values))


def settings(
    *,
    config: PathLike | None = None,
    profile: str | None = None,
    settings: Mapping[str, Any] | None = None,
    use_modal: bool | None = None,
    endpoint: str | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Every setting, its value and its source, as ``synapse config show --json`` prints them:
    ``{"config_file": ..., "settings": {"ffmpeg.preset": {"value": "fast", "source": "default"}, ...}}``."""
    resolved = _settings_object(config, profile, settings, use_modal=use_modal, endpoint=endpoint, api_key=api_key)
    return resolved.report()
