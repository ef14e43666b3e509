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
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

from synapse_cli.backends._remote import PathField, path_fields, stage_paths
from synapse_cli.errors import SynapseError, UsageError
from synapse_cli.jsonwalk import map_strings
from synapse_cli.events import Artifact, Event, Failed, Finished, Log, Progress, failed
from synapse_cli.jobs import get_kind, select_installed, settle_names
from synapse_cli.server.processes import kill_children
from synapse_cli.server.uploads import BadUpload, Body, installed_upload_refused, is_within, remove_tree, safe_filename
from synapse_cli.server.urls import check_urls

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


RUN_FILE = "run.json"  # a queued detached job's prepared run: a server restarted on the work dir starts it


def save_run(run: JobRun) -> None:
    """Write what ``restore_run`` needs into the job's folder (temp file, then renamed)."""
    from dataclasses import asdict

    data = {"kind": run.kind, "spec": asdict(run.spec), "shards": run.shards,
            "outputs": [[o.field, o.index, str(o.server_path), o.client_path] for o in run.outputs],
            "uploads": [str(p) for p in run.uploads], "replacements": [list(r) for r in run.replacements]}
    tmp = run.dir / f".{RUN_FILE}.part"
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, run.dir / RUN_FILE)


def restore_run(job_id: str, job_dir: Path) -> JobRun:
    """The run ``save_run`` wrote, checked again (a spec the kind no longer accepts raises BadUpload);
    OSError or ValueError when the file is missing or unreadable."""
    from synapse_cli.jobs import spec_class

    data = json.loads((job_dir / RUN_FILE).read_text())
    kind = data["kind"]
    for path in [*data["uploads"], *(o[2] for o in data["outputs"])]:
        if not is_within(Path(path), job_dir):
            raise ValueError(f"{RUN_FILE} names {path!r}, outside the job's folder")
    try:
        cls = spec_class(kind)
    except ImportError as exc:
        raise BadUpload(404, f"job kind {kind!r} is not available on this server ({exc})") from None
    spec = _check_types(kind, cls, data["spec"])
    run = JobRun(job_id, kind, job_dir, spec, [Output(f, i, Path(p), c) for f, i, p, c in data["outputs"]],
                 [Path(p) for p in data["uploads"]], [(a, b) for a, b in data["replacements"]])
    run.shards = int(data.get("shards", 1))
    return run


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


# -- preparing a job ---------------------------------------------------------------


@lru_cache(maxsize=None)
def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def _check_types(kind: str, cls: type, data: dict[str, Any]) -> Any:
    """Build the spec, checking each field's type against the dataclass annotations (422 naming the field)."""
    from pydantic import ValidationError

    try:
        adapter = _adapter(cls)
    except Exception:  # a spec pydantic cannot describe: fall back to the plain constructor
        try:
            return cls(**data)
        except TypeError as exc:
            raise BadUpload(422, f"bad {kind} spec: {exc}") from None
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise BadUpload(422, f"bad {kind} spec: {where}: {err['msg']}") from None


def prepare(kind: str, body: Body, job_dir: Path, job_id: str, models_dir: str | Path | None = None, storage: Any = None) -> JobRun:
    """Check the spec and point its INPUTS at the uploaded files and its OUTPUTS into ``job_dir/out``.

    ``INSTALLED`` fields (infer's ``model``) name a model the server's owner installed
    (the bundled default, or a file in ``models_dir``); an uploaded model file is refused.
    A field that is a URL needs no file part: ``check_urls`` vets it now, and ``storage`` reads or
    writes it when the job runs (``synapse_cli.storage.staging``).
    """
    from synapse_cli.storage.urls import is_url
    from synapse_cli.jobs import spec_class

    try:
        cls = spec_class(kind)
    except ImportError as exc:
        raise BadUpload(404, f"job kind {kind!r} is not available on this server ({exc})") from None
    data = dict(body.spec)
    notify_url = data.pop("notify", None)  # not a field of the kind's spec: the job's webhook target (synapse_cli.notify)
    if notify_url is not None and (not isinstance(notify_url, str) or not notify_url):
        raise BadUpload(422, "bad notify: expected a URL (https://…) or null")
    names = {f.name: f for f in fields(cls)}
    extra = sorted(set(data) - set(names))
    if extra:
        raise BadUpload(422, f"unknown {kind} spec field(s): {', '.join(extra)}")
    inputs: tuple[str, ...] = tuple(getattr(cls, "INPUTS", ()))
    outputs: tuple[str, ...] = tuple(getattr(cls, "OUTPUTS", ()))
    refused = sorted({u.field for u in body.files} & set(get_kind(kind).installed))
    if refused:
        raise installed_upload_refused(kind, refused)
    stray = sorted({u.field for u in body.files} - set(inputs))
    if stray:
        raise BadUpload(400, f"file part(s) {', '.join(map(repr, stray))} are not inputs of {kind} (inputs: {', '.join(inputs) or 'none'})")

    try:  # the outputs a spec leaves out get the CLI's names, derived from the inputs' (the kind's names hook)
        data = settle_names(kind, data)
    except UsageError as exc:
        raise BadUpload(422, f"bad {kind} spec: {exc}") from None
    # the spec as sent, with those names: what a detached job's record calls its artifacts
    body.spec = {**body.spec, **{name: data[name] for name in outputs if data.get(name) is not None}}
    try:
        paths = path_fields(kind, data)
    except UsageError as exc:
        raise BadUpload(422, f"{kind} {exc}") from None
    for name in inputs:  # each input path has its file part, in order
        parts = [u for u in body.files if u.field == name]
        listed = [p for p in paths if p.field == name]
        if data.get(name) is None and parts:
            raise BadUpload(422, f"a file was uploaded for {name!r} but the spec's {name} is null")
        if isinstance(data.get(name), str) and is_url(data[name]):
            if parts:
                raise BadUpload(422, f"{kind} input {name!r} is a URL; a file part was uploaded for it too")
            continue
        if isinstance(data.get(name), str) and len(parts) != 1:
            raise BadUpload(422, f"{kind} input {name!r} needs exactly one file part named {name!r} (got {len(parts)})")
        if isinstance(data.get(name), list) and len(parts) != len(listed):
            raise BadUpload(422, f"{kind} input {name!r} lists {len(listed)} path(s) but {len(parts)} file part(s) came")

    replacements: list[tuple[str, str]] = []
    outs: list[Output] = []

    def place(path: PathField) -> str:
        """An input: its uploaded file; an output: a file (or folder) of its own under ``out/``."""
        if not path.output:
            server = str([u for u in body.files if u.field == path.field][path.index or 0].path)
        else:
            folder = job_dir / "out" / str(len(outs))
            folder.mkdir(parents=True)
            try:
                base = safe_filename(Path(path.value).name)
            except BadUpload:
                base = "output" + Path(path.value).suffix
            outs.append(Output(path.field, path.index, folder / base, path.value))
            server = str(outs[-1].server_path)
            # the job writes a temporary sibling first (jobs._files.atomic_output): a message naming it
            # names the client's folder, as a local run's would
            parent = str(Path(path.value).parent)
            replacements.append((f"{folder}/", "" if parent == "." else parent.rstrip("/") + "/"))
        replacements.append((server, path.value))
        return server

    data = stage_paths(kind, data, place)

    # host fields (a binary, a cache dir) mean nothing here, and obeying them would let a
    # client pick a binary or a folder on the server: the spec's default applies
    for name in get_kind(kind).host_fields:
        if name in names and name not in inputs and name not in outputs:
            data.pop(name, None)  # the spec's default: whatever this server has
    try:
        data = select_installed(kind, data, models_dir)
    except SynapseError as exc:
        raise BadUpload(422, str(exc)) from None
    spec = _check_types(kind, cls, data)
    for name, cap in getattr(cls, "SERVER_CAPS", {}).items():
        value = getattr(spec, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            raise BadUpload(422, f"bad {kind} spec: {name}: {value:g} is over this server's cap of {cap:g}")
    check_urls(kind, asdict(spec), storage)
    replacements.sort(key=lambda r: len(r[0]), reverse=True)
    return JobRun(job_id, kind, job_dir, spec, outs, [u.path for u in body.files], replacements, notify_url=notify_url, storage=storage)


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

    ``ok``: the job reached ``finished`` and was not cancelled. A job may still fail after its
    ``finished`` (compile with inputs that failed): the stream then ends ``finished``, ``error``,
    and the finished outputs are served all the same."""
    def work() -> None:
        run.native_id = threading.get_native_id()
        gen: Iterator[Event] | None = None
        finished = False
        try:
            gen = _events(run)
            for event in gen:
                channel.put(event)
                finished = finished or isinstance(event, Finished)
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
                # the outputs stay if the job reached ``finished``, even if it raised after it: compile reports
                # the inputs that failed that way, and the others' outputs are good (the client downloads them)
                on_end(run, finished and run.cancel_reason is None)
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
