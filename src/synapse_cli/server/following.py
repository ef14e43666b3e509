"""Following a detached job: ``GET /v1/jobs/{id}/events`` as NDJSON or server-sent events, live until its last event."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from synapse_cli.events import Outcome, from_dict
from synapse_cli.server import webhooks
from synapse_cli.store import ACTIVE

if TYPE_CHECKING:
    from synapse_cli.server.detached import DetachedJobs
    from synapse_cli.store import Job

TERMINAL = ("finished", "error")
_READ_BATCH = 1000  # events per store read while following
_POLL_OTHER_S = 1.0  # a job of another process sharing the work dir: no notification reaches us
KEEPALIVE = b'{"type":"keepalive"}\n'


def wire(event: dict[str, Any], index: int) -> dict[str, Any]:
    """A stored event as ``/events`` sends it: the streamed event's JSON plus its ``index``."""
    return {**event, "index": index}


def ndjson_line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode("utf-8")


def sse_message(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)
    return f"id: {event['index']}\nevent: {event['type']}\ndata: {data}\n\n".encode("utf-8")


async def follow(jobs: "DetachedJobs", job_id: str, after: int, sse: bool, keepalive_s: float, report: bool = False) -> AsyncIterator[bytes]:
    """The job's events from index ``after``, then live until its last event; with ``report`` (NDJSON
    only), then what became of its webhooks (one ``webhooks`` line, once its sender is done)."""
    import asyncio

    import anyio

    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    waiter = (loop, wake)
    with jobs._waiters_lock:
        jobs._waiters.setdefault(job_id, set()).add(waiter)

    def read(after_seq: int) -> tuple[list[tuple[int, dict[str, Any]]], "Job | None"]:
        with jobs.lock:  # the row first: if it is final, its last event is already stored
            job = jobs.store.find(job_id)
            return jobs.store.events(job_id, after_seq, limit=_READ_BATCH), job

    index = after
    last_sent = time.monotonic()
    outcome = Outcome()
    try:
        while True:
            wake.clear()  # before reading: a notification that lands during the read wakes the next wait
            rows, job = await anyio.to_thread.run_sync(read, index)
            chunk = []
            for seq, ev in rows:
                index = seq  # the next index to send is seq (index = seq - 1)
                chunk.append(sse_message(wire(ev, seq - 1)) if sse else ndjson_line(wire(ev, seq - 1)))
                if ev.get("type") in TERMINAL:
                    outcome.see(from_dict(ev))
                    if outcome.ended:
                        break
            if chunk:
                yield b"".join(chunk)
                last_sent = time.monotonic()
            # after ``finished`` only an ``error`` may follow, stored with it in one step: this read has it
            if outcome.ended or (outcome.finished is not None and len(rows) < _READ_BATCH):
                break
            if job is None:
                return
            if job.status not in ACTIVE and not rows:
                break
            if len(rows) == _READ_BATCH:
                continue
            ours = job_id in jobs.opts.runs or any(r.job_id == job_id for r in list(jobs.queue))
            wait = max(0.0, keepalive_s - (time.monotonic() - last_sent))
            if not ours:
                wait = min(wait, _POLL_OTHER_S)
            try:
                await asyncio.wait_for(wake.wait(), wait)
            except asyncio.TimeoutError:
                if time.monotonic() - last_sent >= keepalive_s:
                    yield b": keepalive\n\n" if sse else KEEPALIVE
                    last_sent = time.monotonic()
        if report and not sse:  # the job is over: what became of its webhooks, once its sender is done

            def deliveries() -> list[dict[str, Any]]:
                with jobs.lock:
                    return jobs.store.deliveries(job_id)

            async for line in webhooks.report(jobs.opts, job_id, keepalive_s, KEEPALIVE, deliveries):
                yield line
    finally:
        with jobs._waiters_lock:
            waiters = jobs._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del jobs._waiters[job_id]


