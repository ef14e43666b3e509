"""``ModalBackend``: one job is one call of its kind's function (``.remote_gen()``), or a spawned call for a
detached job (``detached.py``). A sharded job whose fields are URLs is one call of ``<kind>_sharded``,
which splits, runs and merges it in a container (``inside.py``)."""

from __future__ import annotations

import itertools
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any, Callable, Iterator, Mapping

from synapse_cli.backends._remote import collect_outputs, retry_until_first_event, stage_paths
from synapse_cli.backends.base import Backend, Capabilities
from synapse_cli.backends.modal.credentials import require_credentials
from synapse_cli.backends.modal.detached import DetachedCalls
from synapse_cli.backends.modal.errors import _Deadline, _transient, map_modal_errors
from synapse_cli.backends.modal.files import _Files, _Uploads
from synapse_cli.errors import BackendError, UsageError
from synapse_cli.events import Event, Finished, Outcome, from_dict
from synapse_cli.jobs import get_kind

CALL_EVENT = "_call"  # the container's first item: its FunctionCall id, so that we can cancel it
SHARDED_SUFFIX = "_sharded"  # keep in sync with synapse_cli.modal_app: a kind's in-container split-and-merge function


class ModalBackend(DetachedCalls, Backend):
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
        # a spec with URL fields is split and merged in a container: this client may hold no credentials to probe it
        return Capabilities(detach=True, shards="remote", url_shards="server", detach_shards=True, scales_out=True,
                            shard_retries=self.shard_retries)

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
                self._lookup = lambda name: modal_app.FUNCTIONS[name]
            else:
                app_name = self.config["app_name"]
                self._lookup = lambda name: modal.Function.from_name(app_name, name, environment_name=env_name)
        if self._volume is None:
            self._volume = modal.Volume.from_name(self.config["volume"], create_if_missing=True, environment_name=env_name)

    def function(self, kind: str, deadline: _Deadline, suffix: str = "") -> Any:
        """The handle of ``kind``'s function (``suffix``: ``_sharded``, its split-and-merge function)."""
        from synapse_cli.jobs import JOBS

        if kind not in JOBS or not JOBS[kind].remote:
            raise UsageError(f"job kind {kind!r} does not run on Modal")
        fn = self._lookup(kind + suffix)  # type: ignore[misc]
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
        return self._call(kind, spec)

    def run_sharded(self, kind: str, spec: Any, shards: Any) -> Iterator[Event]:
        """The job split into ``shards`` (an int, or ``auto``: by size) where it runs: one call of
        ``<kind>_sharded``, which reads the URLs, splits, runs each shard as a call of its own,
        merges where the pieces are and writes the outputs (``url_shards``)."""
        return self._call(kind, spec, SHARDED_SUFFIX, self.shard_settings(shards))

    def shard_settings(self, shards: Any) -> dict[str, Any]:
        """What a container splits by: the ``[shards]`` settings, the count as asked."""
        section = dict(self.settings.section("shards")) if self.settings is not None else {}
        return {**section, "count": shards}

    def _credentials(self) -> None:
        require_credentials(self._env)

    def _call(self, kind: str, spec: Any, suffix: str = "", *extra: Any) -> Iterator[Event]:
        self._credentials()
        deadline = self._deadline()
        with self._errors():
            fn = self.function(kind, self._reach(deadline), suffix)
            files = _Files(self._volume, uuid.uuid4().hex, self._uploads)
            remote_spec = self.stage(kind, spec, files)
            try:
                events = self._stream(kind, fn, remote_spec, *extra)
                yield from self._localized(kind, files, events, time.time(), bool(getattr(spec, "overwrite", False)))
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
            calls = event.result.get("modal")
            if isinstance(calls, dict) and calls.get("calls"):  # split in a container: its shards' seconds, summed there
                cost = {**self.cost_info(kind, float(calls.get("seconds") or 0.0)), "calls": calls["calls"]}
            else:
                cost = self.cost_info(kind, seconds)
            result = {**files.localize(event.result), "modal": cost}
            return Finished(result=result, elapsed_s=event.elapsed_s)

        def ours() -> Iterator[Event]:  # modal's exceptions as ours already here, so that their text is named too
            with self._errors():
                yield from events

        # the one place where what the container says about the staged files is said about the user's
        return files.names().stream(collect_outputs(ours(), files.fetch, overwrite, f"Modal function {kind!r}", finish))

    def _stream(self, kind: str, fn: Any, remote_spec: dict[str, Any], *extra: Any) -> Iterator[Event]:
        """``remote_gen`` with retries for transient failures before the first event; never after it."""

        def start() -> tuple[Any, Any]:
            gen = fn.remote_gen(remote_spec, *extra)
            try:
                return gen, next(gen)
            except StopIteration:
                return gen, None
            except BaseException:
                _close(gen)
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
        outcome = Outcome()
        try:
            for item in itertools.chain([first], gen):
                if item.get("type") == CALL_EVENT:
                    call_id = item["function_call_id"]
                    continue
                event = from_dict(item)
                outcome.see(event)
                yield event
        finally:
            _close(gen)
            if call_id and outcome.status is None:  # Ctrl-C, or the consumer stopped: the call must not run on
                self._cancel(call_id)

    def _cancel(self, call_id: str) -> None:
        import modal

        try:
            _Deadline(10.0).run(lambda: modal.FunctionCall.from_id(call_id).cancel(), "the cancellation")
        except Exception:  # noqa: BLE001 - best effort while already failing or interrupted
            pass

    def close(self) -> None:
        self._stack.close()


def _close(gen: Any) -> None:
    """Close a ``remote_gen`` generator. While an exception unwinds (Ctrl-C above all), a failure to close must
    not take its place: a Ctrl-C that lands while modal's synchronous wrapper is still inside the generator's
    step makes ``close()`` raise ``RuntimeError: aclose(): asynchronous generator is already running``, and
    ``synapse export --use-modal`` ended with that line instead of ``Interrupted`` (seen on a loaded machine)."""
    unwinding = sys.exc_info()[1] is not None  # called from a ``finally`` or ``except`` clause
    try:
        gen.close()
    except Exception:
        if not unwinding:
            raise
