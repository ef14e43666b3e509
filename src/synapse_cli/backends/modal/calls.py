"""Spawned calls: their progress and webhook deliveries as events, and each shard of a detached sharded job followed as one stream."""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from synapse_cli.backends._remote import stage_paths
from synapse_cli.events import Event
from synapse_cli.backends.modal.files import _Files

if TYPE_CHECKING:
    from synapse_cli.backends.modal.detached import DetachedCalls


WEBHOOKS_SUFFIX = "/webhooks"  # keep in sync with synapse_cli.modal_app


def _redact(url: str) -> str:
    from synapse_cli.netguard import redact  # (httpx's import, only for a job with webhooks)

    return redact(url)


def _with_deliveries(events: Iterator[Event], store: Any, job_id: str, deliveries: list[dict[str, Any]], target: str | None) -> Iterator[Event]:
    """``events``, then the webhook deliveries its container published, kept in the job store (``jobs show``)."""
    from synapse_cli.store.recording import Recorder

    try:
        yield from events
    finally:  # through the one Recorder: best effort, a store that fails warns once
        Recorder(store, job_id).deliveries([{**d, "target": d.get("target") or target} for d in deliveries])


class _ShardFollower:
    """``jobs wait``'s handle on one shard's spawned call (``shards.follow_detached`` runs one per
    thread): iterate for its events, its piece fetched into the shard spec's outputs. ``terminate()``,
    from any thread, stops following within a poll; cancelling the call is ``_follow_shards``' part."""

    def __init__(self, backend: DetachedCalls, kind: str, shard: dict[str, Any], part: Any) -> None:
        self.backend, self.kind, self.shard, self.part = backend, kind, shard, part
        self.stop = threading.Event()
        self._events: Any = None

    def __iter__(self) -> "_ShardFollower":
        if self._events is None:
            files = _Files(None, self.shard["key"])  # the Volume paths the shard was staged with, mapped to this run's folder
            stage_paths(self.kind, asdict(self.part), lambda p: files.output(p) if p.output else p.value)
            files.inputs = {k: Path(v) for k, v in self.shard.get("inputs", {}).items()}  # a record written before shards kept them has none
            self._events = self.backend.follow_call(self.kind, self.shard["key"], self.shard["call_id"], files, True, stop=self.stop)
        return self

    def __next__(self) -> Event:
        event: Event = next(iter(self)._events)
        return event

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


def shard_state(modal: Any, progress: Any, index: int, count: int, shard: Mapping[str, Any]) -> dict[str, Any]:
    """One shard's ``{shard, state, done, total}``: what its call published in ``progress`` (a ``modal.Dict``)
    and, when that says nothing final, what the call itself says."""
    state: dict[str, Any] = {"shard": f"{index + 1}/{count}", "state": "pending", "done": None, "total": None}
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
    return state
