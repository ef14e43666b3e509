"""``ModalBackend``'s detached half: ``.spawn()`` a wrapper that publishes events to a Dict, follow it, cancel it.

A mixin of ``ModalBackend`` (``backend.py``), kept apart because it is a concern of its own: the job
store's ``remote`` record, spawned calls, their Dict entries and their clean-up.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from synapse_cli.backends.modal.calls import WEBHOOKS_SUFFIX, _ShardFollower, _call_ids, _redact, _with_deliveries, shard_state
from synapse_cli.backends.modal.credentials import require_credentials
from synapse_cli.backends.modal.errors import _Deadline
from synapse_cli.backends.modal.files import _Files, _Uploads
from synapse_cli.errors import BackendError, UsageError
from synapse_cli.events import Event, Outcome, from_dict

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

PROGRESS_DICT = "synapse-progress"  # keep in sync with synapse_cli.modal_app


class DetachedCalls:
    if TYPE_CHECKING:  # what this half uses of ``ModalBackend``
        config: dict[str, Any]
        settings: Any
        _env: Mapping[str, str] | None
        _volume: Any

        @property
        def shard_retries(self) -> int: ...
        def _errors(self) -> AbstractContextManager[None]: ...
        def _deadline(self) -> _Deadline: ...
        def _reach(self, deadline: _Deadline) -> _Deadline: ...
        def _connect(self) -> None: ...
        def stage(self, kind: str, spec: Any, files: _Files) -> dict[str, Any]: ...
        def gpu_for(self, kind: str) -> str | None: ...
        def shard_settings(self, shards: Any) -> dict[str, Any]: ...
        def _remove_outputs(self, job_id: str) -> None: ...
        def _localized(self, kind: str, files: _Files, events: Iterator[Event], started: float | None, overwrite: bool) -> Iterator[Event]: ...

    # -- detached: .spawn() a wrapper that publishes events to a Dict -------------------------
    #
    # One call, or with shards one call per shard over the one upload. The job store's ``remote``
    # record holds what ``follow``/``cancel``/``shard_states`` need later: for one call its id and
    # where its outputs go; for shards each call's id and Dict key, the shard specs, and the folder
    # they were split in (``shards.split_detached``). The merge happens where ``jobs wait`` runs,
    # unless no client may be there to do it: a job with URL fields or webhooks is one call of
    # ``<kind>_sharded_detached``, which splits, runs and merges it in a container (``inside.py``).

    def _check_detach(self) -> None:
        require_credentials(self._env)
        if self.config.get("mode") == "ephemeral":
            raise UsageError("--detach needs a deployed app ([modal] mode = \"deployed\"): an ephemeral app ends with this process")

    def spawn(self, kind: str, spec: Any, job_id: str, parts: list[Any] | None = None, split_in: Path | None = None,
              notify: dict[str, Any] | None = None, shards: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start ``kind`` on Modal and return at once: one call, or one per shard spec in ``parts``.
        Returns the record for the job store. If a call cannot be started, none runs on.

        ``notify`` (one call only): the webhook target the container sends the job's events to.
        ``shards`` (one call only; ``shard_settings``): the call splits and merges the job in its container."""
        self._check_detach()
        deadline = self._deadline()
        started = time.time()
        calls: list[str] = []
        keys: list[str] = []
        with self._errors():
            self._reach(deadline)  # ``import modal`` included: an unreachable Modal costs connect_timeout_s, no more
            import modal

            name = f"{kind}_sharded_detached" if shards is not None else f"{kind}_detached"
            fn = modal.Function.from_name(self.config["app_name"], name, environment_name=self.config.get("environment"))
            deadline.run(fn.hydrate, f"the lookup of {name}")
            overwrite = bool(getattr(spec, "overwrite", False))
            try:
                if not parts:
                    files = _Files(self._volume, job_id)
                    # an app deployed before webhooks takes two arguments: the third given only when used
                    extra = [notify, shards] if shards is not None else [notify] if notify else []
                    calls.append(fn.spawn(self.stage(kind, spec, files), job_id, *extra).object_id)
                    return {
                        "call_id": calls[0],
                        **({"merged_in_container": True} if shards is not None else {}),
                        **({"notify_target": _redact(notify["url"])} if notify else {}),
                        "local_of": {k: str(v) for k, v in files.local_of.items()},
                        "output_dirs": {k: str(v) for k, v in files.output_dirs.items()},
                        "overwrite": overwrite,
                        "started": started,
                    }
                uploads = _Uploads()  # the input goes up once; every shard reads it from the Volume
                followed: list[dict[str, Any]] = []
                for index, part in enumerate(parts):
                    key = f"{job_id}/{index}"  # its Dict key, and its folder inside the job's Volume folder
                    files = _Files(self._volume, key, uploads)
                    calls.append(fn.spawn(self.stage(kind, part, files), key).object_id)
                    keys.append(key)
                    # its staged inputs, so that what `jobs wait` shows of the shard names the user's files
                    followed.append({"call_id": calls[-1], "key": key, "inputs": {k: str(v) for k, v in files.inputs.items()}})
                return {
                    "shards": followed,
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
        notify = self._notify()
        if self._url_shards(kind, spec):  # this client may not read them: the container splits by [shards] as asked
            remote = self.spawn(kind, spec, job.id, notify=notify, shards=self.shard_settings(self.settings["shards.count"]))
        else:
            parts: list[Any] = [spec]
            split_in = None
            if self.settings is not None:
                from synapse_cli.shards import split_detached

                parts, split_in = split_detached(kind, spec, self, self.settings)
            if len(parts) > 1 and notify is not None:  # whoever sends `finished` must hold the merged result: a container
                remote = self.spawn(kind, spec, job.id, notify=notify, shards=self.shard_settings(len(parts)))
            else:
                remote = self.spawn(kind, spec, job.id, parts if len(parts) > 1 else None, split_in, notify)
        try:
            store.set_remote(job.id, remote, gpu=self.gpu_for(kind))
            store.start(job.id, pid=None)
        except BaseException:  # the row will say "could not start": its calls must not run on unseen
            self._abandon(job.id, _call_ids(remote), [s["key"] for s in remote.get("shards", [])])
            raise

    def _url_shards(self, kind: str, spec: Any) -> bool:
        """Whether a detached job is split and merged in a container because its fields are URLs
        (``url_shards``), unless it is asked to run as one call."""
        from synapse_cli.jobs import get_kind
        from synapse_cli.storage.urls import has_urls

        if self.settings is None or not get_kind(kind).shardable or self.settings["shards.count"] == 1:
            return False
        return has_urls(kind, spec)

    def _notify(self) -> dict[str, Any] | None:
        """The webhook target a detached call sends to from its container ([notify] url, --notify), or None."""
        if self.settings is None:
            return None
        from synapse_cli.notify import Target

        target = Target.from_settings(self.settings)  # https:// (or [notify] allow_http), signed with SYNAPSE_NOTIFY_SECRET
        if target is None:
            return None
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
            events = self._then_forget(job.id, self.follow_call(job.kind, job.id, remote["call_id"], files, bool(remote.get("overwrite")),
                                                                deliveries=deliveries))  # fmt: skip
            return _with_deliveries(record(store, job, events), store, job.id, deliveries, remote.get("notify_target"))
        return record(store, job, events)

    def _then_forget(self, job_id: str, events: Iterator[Event]) -> Iterator[Event]:
        """``events``; once they ended well (the outputs are here), the job's Volume folder and Dict entries go."""
        yield from events
        self._forget(job_id, [job_id, f"{job_id}{WEBHOOKS_SUFFIX}"])

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
        outcome = Outcome()
        try:
            for event in follow_detached(
                kind, spec, parts, Path(remote["split_in"]), lambda i, part: _ShardFollower(self, kind, shards[i], part), self.shard_retries
            ):
                outcome.see(event)
                yield event
        finally:
            if outcome.finished is None:
                self._abandon(job_id, [s["call_id"] for s in shards], [s["key"] for s in shards])
            else:
                self._forget(job_id, [s["key"] for s in shards])

    def follow_call(self, kind: str, key: str, call_id: str, files: _Files, overwrite: bool, stop: threading.Event | None = None, poll_s: float = 0.5,
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
