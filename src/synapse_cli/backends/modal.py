"""The Modal backend: the same job generators, run by the Modal functions in ``modal_functions/app.py``.

Files never travel as call arguments (Modal inlines at most 2 MiB): inputs are
uploaded to the shared Volume under a content-hash key (skipped when the key
exists), the job reads and writes ``vol:`` paths, and each output is downloaded
to a temporary file beside the requested one as its ``artifact`` arrives; all are
renamed into place when ``finished`` arrives, or none (``_remote.collect_outputs``).
What the job says about its Volume copies (``/data/inputs/<sha256>/clip.mp4``) is said
about the user's paths (``_remote.StagedNames``).
Reaching Modal (connection, Volume and function lookups) has one budget,
``connect_timeout_s``; a call is retried (stamina) only before its first event.

This is the only module of synapse_cli that imports modal, and it does so
lazily: ``synapse --help`` never pays for it. Modal's exceptions are mapped to
ours here, at the edge.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from synapse_cli.backends._remote import ErrorMap, Outputs, PathField, StagedNames, collect_outputs, map_errors, retry_until_first_event, stage_paths
from synapse_cli.backends.base import Backend
from synapse_cli.container import VOL
from synapse_cli.errors import BackendError, JobError, UsageError
from synapse_cli.events import Artifact, Event, Finished, from_dict
from synapse_cli.hashing import sha256_file, sha256_tree
from synapse_cli.jobs import get_kind

PROGRESS_DICT = "synapse-progress"  # keep in sync with modal_functions.app
CALL_EVENT = "_call"  # the container's first item: its FunctionCall id, so that we can cancel it


# -- credentials: checked before any network call ---------------------------------------


def credentials_source(env: Mapping[str, str] | None = None) -> str | None:
    """Where Modal credentials would come from, or None. No network, no modal import."""
    env = os.environ if env is None else env
    if env.get("MODAL_TOKEN_ID") and env.get("MODAL_TOKEN_SECRET"):
        return "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"
    path = Path(env.get("MODAL_CONFIG_PATH") or Path(env.get("HOME", "~")).expanduser() / ".modal.toml")
    if not path.is_file():
        return None
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    wanted = env.get("MODAL_PROFILE")
    for name, profile in profiles.items():
        if not isinstance(profile, dict) or (wanted and name != wanted):
            continue
        if (wanted or profile.get("active") or len(profiles) == 1) and profile.get("token_id") and profile.get("token_secret"):
            return f"{path} [{name}]"
    return None


def require_credentials(env: Mapping[str, str] | None = None) -> str:
    source = credentials_source(env)
    if source is None:
        raise BackendError(
            "no Modal credentials: run `modal token new`, or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET "
            "(or run with --no-modal)"
        )
    return source


# -- errors -----------------------------------------------------------------------------


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


def _server() -> str:
    return os.environ.get("MODAL_SERVER_URL", "https://api.modal.com")


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


# -- the Volume: content-addressed inputs, per-job outputs -------------------------------------


class _Uploads:
    """What this client has uploaded already (local path -> ``vol:`` key), shared by a job's shards."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: dict[str, str] = {}


class _Files:
    """Maps a spec's local paths to Volume paths and back, uploading and downloading as needed."""

    def __init__(self, volume: Any, job_id: str, uploads: "_Uploads | None" = None) -> None:
        self.uploads = uploads or _Uploads()
        self.volume = volume
        self.job_id = job_id
        self.local_of: dict[str, Path] = {}  # "vol:..." -> local path
        self.output_dirs: dict[str, Path] = {}  # "vol:outputs/<id>/<dir>" -> local dir
        self.inputs: dict[str, Path] = {}  # "vol:inputs/<sha256>/<name>" -> local path (for messages only)

    def place(self, path: PathField) -> str:
        """``stage_paths``'s callback: an input uploaded, an output pointed into the job's folder."""
        return self.output(path) if path.output else self.upload(path.value)

    def _exists(self, remote: str) -> bool:
        import modal.exception

        try:
            return bool(self.volume.listdir(remote))
        except (FileNotFoundError, modal.exception.NotFoundError):
            return False

    def upload(self, local: str) -> str:
        path = Path(local)
        if not path.exists():
            raise UsageError(f"input not found: {path}")
        with self.uploads.lock:  # concurrent shards of one job: the first uploads, the others reuse its key
            remote = self.uploads.done.get(str(path.resolve())) or self._upload(path)
            self.uploads.done[str(path.resolve())] = remote
        self.local_of[remote] = path
        self.inputs[remote] = path
        return remote

    def _upload(self, path: Path) -> str:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            key = f"inputs/{sha256_tree(path)}/{path.name}"
            if not self._exists(key):
                with self.volume.batch_upload(force=True) as batch:
                    for f in files:
                        batch.put_file(str(f), f"/{key}/{f.relative_to(path).as_posix()}")
        else:
            key = f"inputs/{sha256_file(path)}/{path.name}"
            if not self._exists(key):
                with self.volume.batch_upload(force=True) as batch:
                    batch.put_file(str(path), f"/{key}")
        return VOL + key

    def output(self, path: PathField) -> str:
        # one folder per field (and list index), so two outputs with the same file name cannot meet
        local = Path(path.value)
        slot = path.field if path.index is None else f"{path.field}/{path.index}"
        remote = f"{VOL}outputs/{self.job_id}/{slot}/{local.name}"
        self.local_of[remote] = local
        if path.is_dir:
            self.output_dirs[remote] = local
        return remote

    def local_path(self, remote: str) -> Path | None:
        if remote in self.local_of:
            return self.local_of[remote]
        for prefix, folder in self.output_dirs.items():
            if remote.startswith(prefix + "/"):
                return folder / remote[len(prefix) + 1 :]
        return None

    def fetch(self, event: Artifact, outputs: Outputs) -> Event:
        """``collect_outputs``'s callback: download ``vol:...`` into a temporary sibling of its local place."""
        from synapse_cli.storage.urls import is_url

        if is_url(event.path):  # written to its URL by the container: nothing comes through this client
            return event
        dest = self.local_path(event.path)
        if dest is None:
            raise BackendError(f"the job reported an unexpected output {event.path}")
        written = 0

        def write(tmp: Path) -> None:
            nonlocal written
            with tmp.open("wb") as f:
                for chunk in self.volume.read_file(event.path[len(VOL) :]):
                    written += f.write(chunk)

        outputs.receive(dest, write)
        return Artifact(path=str(dest), bytes=written)

    def names(self) -> StagedNames:
        """What the container calls the staged files (``/data/inputs/<sha256>/clip.mp4``, or its
        ``vol:`` form) -> the user's paths, for the text of its messages. An output's Volume folder
        maps to the output's own folder: the job writes a temporary sibling there first."""
        names: dict[str, str] = {}
        for remote, local in {**self.inputs, **self.local_of}.items():
            key = remote[len(VOL) :]
            names[key] = str(local)
            if key.startswith("outputs/"):
                parent = str(local.parent)
                names[key.rsplit("/", 1)[0] + "/"] = "" if parent == "." else parent.rstrip("/") + "/"
        return StagedNames(names, schemes=(VOL,))

    def localize(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(VOL):
            local = self.local_path(value)
            return str(local) if local is not None else value
        if isinstance(value, list):
            return [self.localize(v) for v in value]
        if isinstance(value, dict):
            return {k: self.localize(v) for k, v in value.items()}
        return value


# -- the backend ------------------------------------------------------------------------


class ModalBackend(Backend):
    """Runs jobs on Modal through ``Function.remote_gen()``.

    Collaborators come in through the constructor: ``lookup(kind)`` returns the
    function handle and ``volume`` the Volume. By default they are the deployed
    app's (``modal.Function.from_name``) or, in ephemeral mode, the functions of
    ``modal_functions.app`` inside ``app.run()``.
    """

    name = "modal"
    scales_out = True  # each remote_gen call runs in its own container
    detaches_shards = True  # one spawned call per shard; ``jobs wait`` merges them

    @property
    def shard_retries(self) -> int:
        return int(self.config.get("max_retries", 0))

    def __init__(
        self,
        config: Mapping[str, Any],
        lookup: Callable[[str], Any] | None = None,
        volume: Any | None = None,
        env: Mapping[str, str] | None = None,
        settings: Any = None,
    ) -> None:
        self.config = dict(config)
        self.settings = settings  # the [shards] settings a detached job is split by (None: it runs whole)
        self._lookup = lookup
        self._volume = volume
        self._env = env
        self._stack = ExitStack()
        self._connect_lock = threading.Lock()
        self._uploads = _Uploads()

    @classmethod
    def from_settings(cls, settings: Any) -> "ModalBackend":
        return cls({**settings.section("modal"), "prices": settings["jobs.gpu_prices_usd_per_hour"]}, settings=settings)

    def gpu_for(self, kind: str) -> str | None:
        return self.config["gpu"] if get_kind(kind).gpu else None

    def cost_info(self, kind: str, seconds: float) -> dict[str, Any]:
        """An estimate: seconds × the configured price of the function's GPU (or CPU)."""
        gpu = self.gpu_for(kind)
        price = dict(self.config.get("prices") or {}).get(gpu or "CPU")
        cost = None if price is None else round(seconds * price / 3600, 6)
        return {"gpu": gpu, "seconds": round(seconds, 3), "estimated_cost_usd": cost}

    def _errors(self) -> Any:
        return map_modal_errors(self.config["app_name"], self.config.get("environment"))

    def _deadline(self) -> _Deadline:
        return _Deadline(float(self.config["connect_timeout_s"]))

    def _reach(self, deadline: _Deadline) -> _Deadline:
        """Connect (``import modal`` included) and look the Volume up within ``deadline``, which is
        returned for the function lookups that follow."""
        deadline.run(self._connect, "the connection")
        hydrate = getattr(self._volume, "hydrate", None)
        if hydrate is not None:  # the first RPC: Volume.from_name is lazy
            deadline.run(hydrate, f"the lookup of Volume {self.config['volume']!r}")
        return deadline

    def _connect(self) -> None:
        with self._connect_lock:  # shards call at once; connect (and enter an ephemeral app) once
            self._connect_once()

    def _connect_once(self) -> None:
        import modal

        env_name = self.config.get("environment")
        if self._lookup is None:
            if self.config.get("mode") == "ephemeral":
                from modal_functions import app as modal_app

                self._stack.enter_context(modal_app.app.run(environment_name=env_name))
                self._lookup = lambda kind: modal_app.STREAMING[kind]
            else:
                app_name = self.config["app_name"]
                self._lookup = lambda kind: modal.Function.from_name(app_name, kind, environment_name=env_name)
        if self._volume is None:
            self._volume = modal.Volume.from_name(self.config["volume"], create_if_missing=True, environment_name=env_name)

    def function(self, kind: str, deadline: _Deadline) -> Any:
        from synapse_cli.jobs import JOBS

        if kind not in JOBS or not JOBS[kind].remote:
            raise UsageError(f"job kind {kind!r} does not run on Modal")
        fn = self._lookup(kind)  # type: ignore[misc]
        hydrate = getattr(fn, "hydrate", None)
        if hydrate is not None:
            deadline.run(hydrate, f"the lookup of {kind!r}")
        return fn

    def stage(self, kind: str, spec: Any, files: _Files) -> dict[str, Any]:
        """The spec as the container sees it: inputs uploaded, outputs pointed at the job's Volume folder."""
        record = get_kind(kind)
        data = stage_paths(kind, asdict(spec), files.place)
        for name in record.host_fields:
            if name not in record.inputs + record.outputs:
                data.pop(name, None)  # a local binary or cache path means nothing in the container
        return data

    def run(self, kind: str, spec: Any) -> Iterator[Event]:
        require_credentials(self._env)
        deadline = self._deadline()
        with self._errors():
            fn = self.function(kind, self._reach(deadline))
            files = _Files(self._volume, uuid.uuid4().hex, self._uploads)
            remote_spec = self.stage(kind, spec, files)
            try:
                yield from self._localized(kind, files, self._stream(kind, fn, remote_spec), time.time(), bool(getattr(spec, "overwrite", False)))
            finally:
                self._remove_outputs(files.job_id)

    def _remove_outputs(self, job_id: str) -> None:
        """The job's Volume folder goes once its outputs are downloaded, or once it failed: nothing partial stays."""
        volume = self._volume

        def remove() -> None:
            try:
                volume.remove_file(f"outputs/{job_id}", recursive=True)
            except Exception:  # noqa: BLE001 - nothing was written there, or Modal is unreachable: best effort
                pass

        try:
            _Deadline(10.0).run(remove, "the clean-up")
        except BackendError:
            pass

    def _localized(self, kind: str, files: _Files, events: Iterator[Event], started: float | None, overwrite: bool) -> Iterator[Event]:
        """Remote events as local ones: outputs downloaded and committed on ``finished``, ``vol:`` paths
        mapped, messages (and the error that ends the stream) naming the user's paths instead of the
        staged copies (``_Files.names``), cost added. ``started``: wall-clock (epoch) seconds when the
        call was made; None: the cost counts the job's own ``elapsed_s``."""

        def finish(event: Finished) -> Finished:
            seconds = event.elapsed_s if started is None else time.time() - started
            result = {**files.localize(event.result), "modal": self.cost_info(kind, seconds)}
            return Finished(result=result, elapsed_s=event.elapsed_s)

        def ours() -> Iterator[Event]:  # modal's exceptions as ours already here, so that their text is named too
            with self._errors():
                yield from events

        # the one place where what the container says about the staged files is said about the user's
        return files.names().stream(collect_outputs(ours(), files.fetch, overwrite, f"Modal function {kind!r}", finish))

    # -- detached: .spawn() a wrapper that publishes events to a Dict -------------------------
    #
    # One call, or with shards one call per shard over the one upload. The job store's ``remote``
    # record holds what ``follow``/``cancel``/``shard_states`` need later: for one call its id and
    # where its outputs go; for shards each call's id and Dict key, the shard specs, and the folder
    # they were split in (``shards.split_detached``). The merge happens where ``jobs wait`` runs.

    def _check_detach(self) -> None:
        require_credentials(self._env)
        if self.config.get("mode") == "ephemeral":
            raise UsageError("--detach needs a deployed app ([modal] mode = \"deployed\"): an ephemeral app ends with this process")

    def spawn(self, kind: str, spec: Any, job_id: str, parts: list[Any] | None = None, split_in: Path | None = None) -> dict[str, Any]:
        """Start ``kind`` on Modal and return at once: one call, or one per shard spec in ``parts``.
        Returns the record for the job store. If a call cannot be started, none runs on."""
        self._check_detach()
        deadline = self._deadline()
        started = time.time()
        calls: list[str] = []
        keys: list[str] = []
        with self._errors():
            self._reach(deadline)  # ``import modal`` included: an unreachable Modal costs connect_timeout_s, no more
            import modal

            name = f"{kind}_detached"
            fn = modal.Function.from_name(self.config["app_name"], name, environment_name=self.config.get("environment"))
            deadline.run(fn.hydrate, f"the lookup of {name}")
            overwrite = bool(getattr(spec, "overwrite", False))
            try:
                if not parts:
                    files = _Files(self._volume, job_id)
                    calls.append(fn.spawn(self.stage(kind, spec, files), job_id).object_id)
                    return {
                        "call_id": calls[0],
                        "local_of": {k: str(v) for k, v in files.local_of.items()},
                        "output_dirs": {k: str(v) for k, v in files.output_dirs.items()},
                        "overwrite": overwrite,
                        "started": started,
                    }
                uploads = _Uploads()  # the input goes up once; every shard reads it from the Volume
                shards = []
                for index, part in enumerate(parts):
                    key = f"{job_id}/{index}"  # its Dict key, and its folder inside the job's Volume folder
                    files = _Files(self._volume, key, uploads)
                    calls.append(fn.spawn(self.stage(kind, part, files), key).object_id)
                    keys.append(key)
                    # its staged inputs, so that what `jobs wait` shows of the shard names the user's files
                    shards.append({"call_id": calls[-1], "key": key, "inputs": {k: str(v) for k, v in files.inputs.items()}})
                return {
                    "shards": shards,
                    "parts": [asdict(part) for part in parts],
                    "split_in": str(split_in),
                    "overwrite": overwrite,
                    "started": started,
                }
            except BaseException:
                self._abandon(job_id, calls, keys)
                raise

    def detach(self, kind: str, spec: Any, job: Any, store: Any, env: Mapping[str, str]) -> None:
        self._check_detach()  # before the input is probed for --shards auto
        parts: list[Any] = [spec]
        split_in = None
        if self.settings is not None:
            from synapse_cli.shards import split_detached

            parts, split_in = split_detached(kind, spec, self, self.settings)
        remote = self.spawn(kind, spec, job.id, parts if len(parts) > 1 else None, split_in)
        try:
            store.set_remote(job.id, remote, gpu=self.gpu_for(kind))
            store.start(job.id, pid=None)
        except BaseException:  # the row will say "could not start": its calls must not run on unseen
            self._abandon(job.id, _call_ids(remote), [s["key"] for s in remote.get("shards", [])])
            raise

    def follow(self, job: Any, store: Any) -> Iterator[Event]:
        from synapse_cli.runs import record

        remote = job.remote or {}
        if remote.get("shards"):
            events = self._follow_shards(job.kind, job.id, job.spec, remote)
        else:
            files = _Files(None, job.id)
            files.local_of = {k: Path(v) for k, v in remote["local_of"].items()}
            files.output_dirs = {k: Path(v) for k, v in remote["output_dirs"].items()}
            events = self.follow_call(job.kind, job.id, remote["call_id"], files, bool(remote.get("overwrite")))
        return record(store, job, events)

    def cancel(self, job: Any, store: Any) -> None:
        remote = job.remote or {}
        self.cancel_calls(_call_ids(remote))
        if remote.get("shards"):  # nobody will merge them: their pieces go
            self._forget(job.id, [s["key"] for s in remote["shards"]])
        store.finish(job.id, "cancelled", error_code=130, error_message="cancelled by synapse jobs cancel")

    def _follow_shards(self, kind: str, job_id: str, spec_data: dict[str, Any], remote: dict[str, Any]) -> Iterator[Event]:
        """``jobs wait`` on a sharded job: each shard's events followed and its piece fetched, merged
        here into one stream and one output (``shards.follow_detached``, as an attached sharded run).
        Unless it ends with the merged ``finished``, every shard's call is cancelled; the job's
        Volume folder and Dict entries go either way."""
        from synapse_cli.jobs import spec_from_dict
        from synapse_cli.shards import follow_detached

        shards = remote["shards"]
        spec = spec_from_dict(kind, spec_data)
        parts = [spec_from_dict(kind, data) for data in remote["parts"]]
        finished = False
        try:
            for event in follow_detached(
                kind, spec, parts, Path(remote["split_in"]), lambda i, part: _ShardFollower(self, kind, shards[i], part), self.shard_retries
            ):
                finished = finished or isinstance(event, Finished)
                yield event
        finally:
            if not finished:
                self._abandon(job_id, [s["call_id"] for s in shards], [s["key"] for s in shards])
            else:
                self._forget(job_id, [s["key"] for s in shards])

    def follow_call(
        self, kind: str, key: str, call_id: str, files: _Files, overwrite: bool, stop: threading.Event | None = None, poll_s: float = 0.5
    ) -> Iterator[Event]:
        """The events a detached call publishes under Dict ``key``, as they come; outputs are downloaded
        on the way (``files`` maps them) and committed on ``finished``. ``stop`` (set from any thread)
        ends the stream within ``poll_s``, before its ``finished``."""
        require_credentials(self._env)
        deadline = self._deadline()
        with self._errors():
            self._reach(deadline)  # ``import modal`` included
            import modal

            files.volume = self._volume
            progress = modal.Dict.from_name(PROGRESS_DICT, create_if_missing=True, environment_name=self.config.get("environment"))
            call = modal.FunctionCall.from_id(call_id)

            def published() -> Iterator[Event]:
                seen, finished = 0, False
                while stop is None or not stop.is_set():
                    items = progress.get(key) or []
                    for item in items[seen:]:
                        yield from_dict(item)
                        if item.get("type") == "error":
                            return
                        # finished ends the job only with the call: an error may follow it (compile's failed inputs)
                        finished = finished or item.get("type") == "finished"
                    seen = len(items)
                    try:  # the call's own outcome: its last event, or a crash that published nothing more
                        last = call.get(timeout=poll_s)
                    except TimeoutError:
                        continue
                    items = progress.get(key) or []
                    if len(items) <= seen:
                        if not (finished and last.get("type") == "finished"):
                            yield from_dict(last)
                        return

            # the cost counts the job's own seconds: `jobs wait` may come long after the call ended
            yield from self._localized(kind, files, published(), None, overwrite)

    def cancel_calls(self, call_ids: list[str], settle_s: float = 10.0) -> None:
        """Cancel spawned calls (and so the jobs they run); a BackendError if Modal cannot be reached in time.

        Then wait (``settle_s`` at most) until each has ended, so that what is removed next (the job's
        Volume folder, its Dict entries) is not written again by a container still stopping."""
        require_credentials(self._env)
        deadline = self._deadline()

        def cancel() -> list[Any]:
            import modal

            calls = [modal.FunctionCall.from_id(call_id) for call_id in call_ids]
            for call in calls:
                call.cancel()
            return calls

        with self._errors():
            calls = deadline.run(cancel, "the cancellation")  # ``import modal`` included

        def settle() -> None:
            until = time.monotonic() + settle_s
            for call in calls:
                try:
                    call.get(timeout=max(0.0, until - time.monotonic()))
                except Exception:  # noqa: BLE001 - a cancelled call raises; ended is all we wait for
                    pass

        try:
            _Deadline(settle_s + 1.0).run(settle, "the cancelled calls' end")
        except BackendError:
            pass  # still stopping: what they write now may outlive the clean-up

    def shard_states(self, job: Any) -> list[dict[str, Any]] | None:
        """Each shard's state of a detached sharded job, read from what its call published (and, when
        that says nothing final, from the call itself): ``{shard, state, done, total}`` with state
        ``pending``, ``running``, ``finished``, ``failed`` or ``cancelled``. None for a job without shards."""
        shards = (job.remote or {}).get("shards")
        if not shards:
            return None
        require_credentials(self._env)
        deadline = self._deadline()
        with self._errors():
            deadline.run(self._connect, "the connection")  # ``import modal`` included
            import modal
            import modal.exception

            progress = modal.Dict.from_name(PROGRESS_DICT, create_if_missing=True, environment_name=self.config.get("environment"))
            deadline.run(progress.hydrate, f"the lookup of Dict {PROGRESS_DICT!r}")
            states = []
            for index, shard in enumerate(shards):
                state: dict[str, Any] = {"shard": f"{index + 1}/{len(shards)}", "state": "pending", "done": None, "total": None}
                for item in progress.get(shard["key"]) or []:
                    _apply(state, item)
                if state["state"] in ("pending", "running"):
                    try:
                        _apply(state, modal.FunctionCall.from_id(shard["call_id"]).get(timeout=0))
                    except TimeoutError:
                        pass  # still running (or waiting for a container)
                    except modal.exception.ConnectionError:
                        raise  # Modal unreachable: says nothing about the shard
                    except Exception:  # noqa: BLE001 - crashed, timed out or cancelled without a word (a body's own exception comes back as itself)
                        state["state"] = "failed"
                states.append(state)
            return states

    def _forget(self, job_id: str, keys: list[str]) -> None:
        """Best effort, once nothing more will be read: the job's Volume folder and its Dict entries go."""
        try:
            self._reach(_Deadline(10.0))
        except Exception:  # noqa: BLE001 - Modal unreachable: nothing can be removed
            return
        self._remove_outputs(job_id)

        def pop() -> None:
            import modal

            progress = modal.Dict.from_name(PROGRESS_DICT, create_if_missing=True, environment_name=self.config.get("environment"))
            for key in keys:
                progress.pop(key, None)

        if keys:
            try:
                _Deadline(10.0).run(pop, "the clean-up")
            except Exception:  # noqa: BLE001 - a stale entry costs nothing but space
                pass

    def _abandon(self, job_id: str, call_ids: list[str], keys: list[str] | None = None) -> None:
        """Best effort, while already failing: cancel the calls, then forget the job's traces on Modal."""
        if call_ids:
            try:
                self.cancel_calls(call_ids)
            except Exception:  # noqa: BLE001 - the original failure is what the caller reports
                pass
        self._forget(job_id, keys or [])

    def _stream(self, kind: str, fn: Any, remote_spec: dict[str, Any]) -> Iterator[Event]:
        """``remote_gen`` with retries for transient failures before the first event; never after it."""

        def start() -> tuple[Any, Any]:
            gen = fn.remote_gen(remote_spec)
            try:
                return gen, next(gen)
            except StopIteration:
                return gen, None
            except BaseException:
                gen.close()
                raise

        gen, first = yield from retry_until_first_event(
            start,
            _transient,
            int(self.config.get("max_retries", 0)),
            int(self.config.get("initial_backoff_ms", 1000)) / 1000,
            f"{kind} on Modal",
        )
        if first is None:
            return
        call_id = None
        finished = False
        try:
            for item in itertools.chain([first], gen):
                if item.get("type") == CALL_EVENT:
                    call_id = item["function_call_id"]
                    continue
                event = from_dict(item)
                finished = isinstance(event, Finished)
                yield event
        finally:
            gen.close()
            if call_id and not finished:  # Ctrl-C, or the consumer stopped: the call must not run on
                self._cancel(call_id)

    def _cancel(self, call_id: str) -> None:
        import modal

        try:
            _Deadline(10.0).run(lambda: modal.FunctionCall.from_id(call_id).cancel(), "the cancellation")
        except Exception:  # noqa: BLE001 - best effort while already failing or interrupted
            pass

    def close(self) -> None:
        self._stack.close()


# -- detached shards: following one, and its state --------------------------------------------


class _ShardFollower:
    """``jobs wait``'s handle on one shard's spawned call (``shards.follow_detached`` runs one per
    thread): iterate for its events, its piece fetched into the shard spec's outputs. ``terminate()``,
    from any thread, stops following within a poll; cancelling the call is ``_follow_shards``' part."""

    def __init__(self, backend: ModalBackend, kind: str, shard: dict[str, Any], part: Any) -> None:
        self.backend, self.kind, self.shard, self.part = backend, kind, shard, part
        self.stop = threading.Event()
        self._events: Any = None

    def __iter__(self) -> Iterator[Event]:
        files = _Files(None, self.shard["key"])  # the Volume paths the shard was staged with, mapped to this run's folder
        stage_paths(self.kind, asdict(self.part), lambda p: files.output(p) if p.output else p.value)
        files.inputs = {k: Path(v) for k, v in self.shard.get("inputs", {}).items()}  # a record written before shards kept them has none
        self._events = self.backend.follow_call(self.kind, self.shard["key"], self.shard["call_id"], files, True, stop=self.stop)
        return self._events

    def terminate(self) -> None:
        self.stop.set()

    def close(self) -> None:
        self.stop.set()
        if self._events is not None:
            self._events.close()


def _call_ids(remote: Mapping[str, Any]) -> list[str]:
    """Every call a detached job's record names: its one call, or one per shard."""
    if remote.get("shards"):
        return [s["call_id"] for s in remote["shards"]]
    return [remote["call_id"]] if remote.get("call_id") else []


def _apply(state: dict[str, Any], item: Mapping[str, Any] | None) -> None:
    """One published event (or a call's returned last event) applied to a shard's state."""
    kind = (item or {}).get("type")
    if kind == "started":
        state.update(state="running", total=item.get("total"))  # type: ignore[union-attr]
    elif kind == "progress":
        state.update(state="running", done=item.get("done"), total=item.get("total") or state["total"])  # type: ignore[union-attr]
    elif kind == "finished":
        state.update(state="finished", done=state["total"] if state["total"] is not None else state["done"])
    elif kind == "error":
        state["state"] = "cancelled" if item.get("code") == 130 else "failed"  # type: ignore[union-attr]
