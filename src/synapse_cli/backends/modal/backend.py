"""``ModalBackend``: one job is one call of its kind's function (``.remote_gen()``), or a spawned call for a detached job."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from synapse_cli.backends._remote import collect_outputs, retry_until_first_event, stage_paths
from synapse_cli.backends.base import Backend, Capabilities
from synapse_cli.errors import BackendError, UsageError
from synapse_cli.events import Event, Finished, from_dict
from synapse_cli.jobs import get_kind
from synapse_cli.backends.modal.credentials import require_credentials
from synapse_cli.backends.modal.errors import _Deadline, _transient, map_modal_errors
from synapse_cli.backends.modal.files import _Files, _Uploads
from synapse_cli.backends.modal.calls import WEBHOOKS_SUFFIX, _ShardFollower, _call_ids, _redact, _with_deliveries, shard_state

PROGRESS_DICT = "synapse-progress"  # keep in sync with synapse_cli.modal_app
CALL_EVENT = "_call"  # the container's first item: its FunctionCall id, so that we can cancel it


class ModalBackend(Backend):
    """Runs jobs on Modal through ``Function.remote_gen()``.

    Collaborators come in through the constructor: ``lookup(kind)`` returns the
    function handle and ``volume`` the Volume. By default they are the deployed
    app's (``modal.Function.from_name``) or, in ephemeral mode, the functions of the
    app module ``app()`` returns (``synapse_cli.modal_app``) inside ``app.run()``.
    """

    name = "modal"
    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]  # shard retries come from the [modal] settings
        # each remote_gen call runs in its own container; a detached job spawns one call per shard, ``jobs wait`` merges them
        return Capabilities(detach=True, shards="remote", detach_shards=True, scales_out=True, shard_retries=self.shard_retries)

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
        app: Callable[[], Any] | None = None,
    ) -> None:
        self.config = dict(config)
        self._app = app
        self.settings = settings  # the [shards] settings a detached job is split by (None: it runs whole)
        self._lookup = lookup
        self._volume = volume
        self._env = env
        self._stack = ExitStack()
        self._connect_lock = threading.Lock()
        self._uploads = _Uploads()

    @classmethod
    def from_settings(cls, settings: Any, app: Callable[[], Any] | None = None) -> "ModalBackend":
        return cls({**settings.section("modal"), "prices": settings["jobs.gpu_prices_usd_per_hour"]}, settings=settings, app=app)

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
                if self._app is None:
                    raise UsageError("[modal] mode = \"ephemeral\" needs the app module (synapse_cli.modal_app)")
                modal_app = self._app()
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

    def run_shard(self, kind: str, spec: Any) -> Iterator[Event]:
        """One shard is one more call, in a container of its own."""
        return self.run(kind, spec)

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
        if volume is None:
            return

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

    def spawn(self, kind: str, spec: Any, job_id: str, parts: list[Any] | None = None, split_in: Path | None = None,
              notify: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start ``kind`` on Modal and return at once: one call, or one per shard spec in ``parts``.
        Returns the record for the job store. If a call cannot be started, none runs on.

        ``notify`` (one call only): the webhook target the container sends the job's events to."""
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
                    extra = [notify] if notify else []  # an app deployed before webhooks takes two arguments: given only when used
                    calls.append(fn.spawn(self.stage(kind, spec, files), job_id, *extra).object_id)
                    return {
                        "call_id": calls[0],
                        **({"notify_target": _redact(notify["url"])} if notify else {}),
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
        notify = self._notify(len(parts))
        remote = self.spawn(kind, spec, job.id, parts if len(parts) > 1 else None, split_in, notify)
        try:
            store.set_remote(job.id, remote, gpu=self.gpu_for(kind))
            store.start(job.id, pid=None)
        except BaseException:  # the row will say "could not start": its calls must not run on unseen
            self._abandon(job.id, _call_ids(remote), [s["key"] for s in remote.get("shards", [])])
            raise

    def _notify(self, calls: int) -> dict[str, Any] | None:
        """The webhook target a detached call sends to from its container ([notify] url, --notify), or None."""
        if self.settings is None:
            return None
        from synapse_cli.notify import Target

        target = Target.from_settings(self.settings)  # https:// (or [notify] allow_http), signed with SYNAPSE_NOTIFY_SECRET
        if target is None:
            return None
        if calls > 1:
            raise UsageError("--notify with --detach --shards on Modal is not supported yet: the shards are merged where "
                             "`synapse jobs wait` runs, so no container has the finished result to send; run it attached, or unsharded")
        return target.for_call(self.settings["serve.allow_hosts"])

    def follow(self, job: Any, store: Any) -> Iterator[Event]:
        from synapse_cli.store.recording import record

        remote = job.remote or {}
        if remote.get("shards"):
            events = self._follow_shards(job.kind, job.id, job.spec, remote)
        else:
            files = _Files(None, job.id)
            files.local_of = {k: Path(v) for k, v in remote["local_of"].items()}
            files.output_dirs = {k: Path(v) for k, v in remote["output_dirs"].items()}
            deliveries: list[dict[str, Any]] = []
            events = self.follow_call(job.kind, job.id, remote["call_id"], files, bool(remote.get("overwrite")), deliveries=deliveries)
            return _with_deliveries(record(store, job, events), store, job.id, deliveries, remote.get("notify_target"))
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
        self, kind: str, key: str, call_id: str, files: _Files, overwrite: bool, stop: threading.Event | None = None, poll_s: float = 0.5,
        deliveries: list[dict[str, Any]] | None = None,
    ) -> Iterator[Event]:
        """The events a detached call publishes under Dict ``key``, as they come; outputs are downloaded
        on the way (``files`` maps them) and committed on ``finished``. ``stop`` (set from any thread)
        ends the stream within ``poll_s``, before its ``finished``. ``deliveries``: filled, once the
        call has ended, with what became of its webhooks (published by the container)."""
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
                        if deliveries is not None:
                            deliveries.extend(progress.get(key + WEBHOOKS_SUFFIX) or [])
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
            return [shard_state(modal, progress, index, len(shards), shard) for index, shard in enumerate(shards)]

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
