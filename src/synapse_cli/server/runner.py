"""One job behind the endpoint: its folder, its spec rewritten to that folder, the worker thread, the stream.

Layout of a job's folder (``<work_dir>/jobs/<job id>/``)::

    in/<n>/<filename>     uploaded inputs (removed when the job ends)
    out/<k>/<basename>    output k of the spec (a file, or a directory such as compile's output_dir)
    artifacts.json        artifact number -> path inside the folder, for GET /v1/artifacts/<job id>.<number>
    .alive                touched every few seconds by the process that owns the job while it uploads or runs
    .done                 written when the job ends; the folder is swept ``artifact_ttl_s`` later

A job's child processes (ffmpeg, engine workers) are found through
``/proc/self/task/<job thread>/children``: Linux records which thread forked each child, so
the server can kill a job's processes the moment the job is cancelled (client gone, time
limit, shutdown) without waiting for the job's next event, and without the jobs' help.

The job generator runs in its own thread and hands events to the event loop
through ``_Channel``. Server paths never reach the client: messages and the
``finished`` result are translated back to the paths the client sent, and each
``artifact`` event's ``path`` becomes the download path
``/v1/artifacts/<id>?output=<field>[&index=<i>][&name=<relative path>]``.
A directory output is served as one artifact per file (``name`` is the file's
path inside the directory), in sorted order.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

from synapse_cli.errors import SynapseError
from synapse_cli.events import Artifact, Event, Failed, Finished, Log, Outcome, Progress, failed
from synapse_cli.jsonwalk import map_strings
from synapse_cli.server.processes import kill_children
from synapse_cli.server.uploads import is_within, remove_tree

log = logging.getLogger("synapse.server")


@dataclass
class Output:
    field: str
    index: int | None  # position in a list field, None for a plain path field
    server_path: Path
    client_path: str


@dataclass
class JobRun:
    job_id: str
    kind: str
    dir: Path
    spec: Any
    outputs: list[Output]
    uploads: list[Path]
    replacements: list[tuple[str, str]]  # (server path, client path), longest first
    artifacts: dict[str, str] = field(default_factory=dict)  # number -> path relative to dir
    thread: threading.Thread | None = None
    native_id: int | None = None  # the job thread's kernel id: its children are the job's processes
    channel: "Channel | None" = None
    cancel_reason: str | None = None
    shards: int = 1  # ?shards=N: the server splits the job across its own worker processes
    notify_url: str | None = None  # the spec's ``notify``: where the job's webhooks go (checked by the app's URL guard)
    notify_target: Any = None  # its notify.Target once the app checked it (server.webhooks.check_target)
    url_base: str | None = None  # the server's URL as the client reached it: webhooks name outputs by absolute URL
    storage: Any = None  # synapse_cli.storage.client.Storage (guarded): reads and writes the spec's URLs

    def cancel(self, reason: str, failure: Event | None = None) -> None:
        """Stop the job now: end its stream (with ``failure`` as the last line, if given) and kill its processes.

        The job's thread notices at its next event; until it has ended, any process it starts is killed too.
        """
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        if self.channel is not None:
            self.channel.end([failure] if failure is not None else [])
        threading.Thread(target=self._reap, name=f"synapse-reap-{self.job_id[:8]}", daemon=True).start()

    def _reap(self) -> None:
        while True:
            alive = self.thread is not None and self.thread.is_alive()
            kill_children(self.native_id)
            if not alive:
                return
            time.sleep(0.05)

    # -- server paths -> what the client sees ------------------------------------

    def _text(self, text: str) -> str:
        for server, client in self.replacements:
            if server in text:
                text = text.replace(server, client)
        return text

    def _value(self, value: Any) -> Any:
        return map_strings(value, self._text)

    def translate(self, event: Event) -> list[Event]:
        """The event(s) to stream for one job event."""
        if isinstance(event, Artifact):
            return self._artifact(event)
        if isinstance(event, Finished):
            return [Finished(result=self._value(event.result), elapsed_s=event.elapsed_s)]
        if isinstance(event, Log):
            return [Log(self._text(event.message), event.level, event.shard)]
        if isinstance(event, Progress) and event.message:
            return [Progress(event.done, event.total, event.phase, self._text(event.message))]
        if isinstance(event, Failed):
            return [Failed(event.code, self._text(event.message), event.error)]
        return [event]

    def _artifact(self, event: Artifact) -> list[Event]:
        if event.path.startswith("s3://"):  # uploaded to its object by the job's staging: nothing to serve
            return [event]
        path = Path(event.path)
        if not path.is_absolute():
            path = self.dir / path
        if not is_within(path, self.dir):
            return [Log(f"artifact {path.name!r} is outside the job's folder and is not served", "warning")]
        out, base = self._output_for(path)
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
        events: list[Event] = []
        for f in files:
            number = str(len(self.artifacts))
            self.artifacts[number] = f.relative_to(self.dir).as_posix()
            query: dict[str, Any] = {}
            if out is not None:
                query["output"] = out.field
                if out.index is not None:
                    query["index"] = out.index
                if f != out.server_path:
                    query["name"] = f.relative_to(base).as_posix()
                # where the client saves it: the output's path as sent (or as the server derived it), joined with name
                query["save"] = f"{out.client_path.rstrip('/')}/{query['name']}" if "name" in query else out.client_path
            else:
                query["name"] = f.relative_to(base).as_posix() if f != base else f.name
            events.append(Artifact(path=f"/v1/artifacts/{self.job_id}.{number}?{urlencode(query)}", bytes=f.stat().st_size))
        self._save_index()
        return events

    def _output_for(self, path: Path) -> tuple[Output | None, Path]:
        for out in self.outputs:
            if path == out.server_path or is_within(path, out.server_path):
                return out, out.server_path
        return None, path if path.is_dir() else path.parent

    def _save_index(self) -> None:
        tmp = self.dir / ".artifacts.json.part"
        try:
            tmp.write_text(json.dumps(self.artifacts))
            os.replace(tmp, self.dir / "artifacts.json")
        except OSError:  # the folder went away (job cancelled): nothing left to serve
            pass


def artifact_path(jobs_dir: Path, job_id: str, number: str) -> Path | None:
    """The file behind ``/v1/artifacts/<job_id>.<number>``, or None."""
    job_dir = jobs_dir / job_id
    try:
        index = json.loads((job_dir / "artifacts.json").read_text())
    except (OSError, ValueError):
        return None
    rel = index.get(number) if isinstance(index, dict) else None
    if not isinstance(rel, str):
        return None
    path = job_dir / rel
    return path if is_within(path, job_dir) and path.is_file() else None


# -- running it --------------------------------------------------------------------


class _Cancelled(Exception):
    """The stream's reader went away: stop the job."""


DONE = object()


class Channel:
    """Worker thread -> event loop, bounded, handing over everything queued at once (one chunk per batch).

    A reader that falls behind blocks the worker, for at most ``stall_timeout_s``: past that the
    channel closes (``stalled``) and the job is cancelled, so a client that stops reading cannot
    hold a job, its processes and its folder forever."""

    def __init__(self, loop: Any, maxsize: int = 4096, stall_timeout_s: float | None = None) -> None:
        import asyncio

        self._loop = loop
        self._items: deque[Any] = deque()
        self._lock = threading.Condition()
        self._ready = asyncio.Event()
        self._closed = False
        self._maxsize = maxsize
        self._stall_timeout_s = stall_timeout_s
        self.stalled = False

    def put(self, item: Any, final: bool = False) -> None:
        """Called from the worker; blocks while the reader is behind; raises ``_Cancelled`` once closed."""
        with self._lock:
            deadline = time.monotonic() + self._stall_timeout_s if self._stall_timeout_s else None
            while not final and len(self._items) >= self._maxsize and not self._closed:
                if deadline is not None and time.monotonic() > deadline:
                    self.stalled = True
                    self._closed = True
                    break
                self._lock.wait(0.5 if deadline is None else min(0.5, max(0.01, deadline - time.monotonic())))
            if self._closed:
                if final:
                    return
                raise _Cancelled()
            self._items.append(item)
            wake = len(self._items) == 1
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is gone (server shutting down)
                self.close()
                if not final:
                    raise _Cancelled() from None

    async def get_batch(self) -> list[Any]:
        while True:
            with self._lock:
                if self._items:
                    batch = list(self._items)
                    self._items.clear()
                    self._lock.notify_all()
                    return batch
                self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def end(self, items: list[Any]) -> None:
        """From any thread: queue ``items`` and the end of the stream, and refuse the worker's further events."""
        with self._lock:
            if self._closed:
                return
            self._items.extend([*items, DONE])
            self._closed = True
            self._lock.notify_all()
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:
            pass

    @property
    def closed(self) -> bool:
        return self._closed


def _sharded(run: JobRun, spec: Any) -> Iterator[Event]:
    """The job as ``run.shards`` shards in worker processes here, merged into one stream (synapse_cli.shards)."""
    from synapse_cli.backends.local import LocalBackend
    from synapse_cli.config import registry
    from synapse_cli.shards import job_events

    defaults = {key: setting.default for key, setting in registry().items() if key.startswith("shards.")}
    settings = {**defaults, "shards.count": run.shards, "modal.max_retries": 0}
    return job_events(run.kind, spec, LocalBackend(), settings)  # (``spec``'s URLs are staged already: see _events)


def _events(run: JobRun) -> Iterator[Event]:
    """The job's events: one call or shards, its URL fields staged around the whole (read and written here)."""
    from synapse_cli.jobs import load_job

    def start(spec: Any) -> Iterator[Event]:
        return load_job(run.kind)(spec) if run.shards <= 1 else _sharded(run, spec)

    from synapse_cli.storage.urls import has_urls

    if run.storage is None or not has_urls(run.kind, run.spec):
        return start(run.spec)
    from synapse_cli.storage.staging import staged

    return staged(run.kind, run.spec, run.storage, start, workdir=run.dir)


def run_in_thread(run: JobRun, channel: Channel, on_end: Any) -> threading.Thread:
    """Start the job generator in a daemon thread feeding ``channel``; ``on_end(run, ok)`` cleans up.

    ``ok``: the job reached its result and was not cancelled; an ``error`` after the result (the job
    failed after it: ``events.Outcome``) ends the stream, and the finished outputs are served all the same."""
    def work() -> None:
        run.native_id = threading.get_native_id()
        gen: Iterator[Event] | None = None
        outcome = Outcome()
        try:
            gen = _events(run)
            for event in gen:
                channel.put(event)
                outcome.see(event)
        except _Cancelled:
            if channel.stalled:
                run.cancel("the client stopped reading")
            log.info("job %s cancelled: %s", run.job_id, run.cancel_reason or "the client went away")
        except BaseException as exc:  # noqa: BLE001 - every failure becomes the stream's last line
            if not isinstance(exc, SynapseError):  # a job's own errors are the client's business; bugs are ours
                log.warning("job %s failed", run.job_id, exc_info=True)
            if run.cancel_reason is None:
                channel.put(failed(exc), final=True)
        finally:
            if gen is not None:
                try:
                    gen.close()  # type: ignore[attr-defined]  # (a job's generator) a cancelled job kills its ffmpeg child and removes its temp files here
                except Exception:  # noqa: BLE001
                    log.warning("job %s: error while closing", run.job_id, exc_info=True)
            try:
                on_end(run, outcome.finished is not None and run.cancel_reason is None)  # the outputs stay
            finally:
                channel.put(DONE, final=True)

    thread = threading.Thread(target=work, name=f"synapse-job-{run.job_id[:8]}", daemon=True)
    run.thread, run.channel = thread, channel
    thread.start()
    return thread


def conclude(run: JobRun, ok: bool, on_job_end: Any) -> None:
    """``finish``, then the owner's hook when the job reached ``finished`` (Modal: commit the Volume). An error here is
    logged, not raised: the job is over either way."""
    try:
        finish(run, ok)
        if ok and on_job_end is not None:
            on_job_end()
    except Exception:  # noqa: BLE001 - the job is over either way
        log.warning("job %s: error after the job", run.job_id, exc_info=True)


def finish(run: JobRun, ok: bool) -> None:
    """After the job: inputs go; outputs stay for download only if it reached ``finished`` (``ok``),
    whether or not it reported a failure after that (a partial failure: some inputs failed)."""
    kill_children(run.native_id)  # whatever the job left running
    (run.dir / ".alive").unlink(missing_ok=True)
    if not ok:
        remove_tree(run.dir)
        return
    for path in run.uploads:
        remove_tree(path)
        try:
            path.parent.rmdir()
        except OSError:
            pass
    try:
        (run.dir / "in").rmdir()
    except OSError:
        pass
    try:
        (run.dir / ".done").touch()
    except OSError:
        pass
