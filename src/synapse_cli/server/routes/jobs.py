"""``POST /v1/jobs/{kind}``: admit the job, stream its upload into its folder, then stream its events
(NDJSON, as they happen) or queue it detached (202 and its id)."""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from synapse_cli.events import Failed
from synapse_cli.protocol import NDJSON
from synapse_cli.render.ndjson import encode
from synapse_cli.server import preparing, runner, webhooks
from synapse_cli.server.admission import Admission, admit
from synapse_cli.server.auth import keyed
from synapse_cli.server.responses import DRAIN_MAX_BYTES, drain, error, refuse
from synapse_cli.server.state import ServerOptions, forget, of, start_heartbeat
from synapse_cli.server.sweep import sweep
from synapse_cli.server.uploads import BadUpload, read_body, remove_tree

router = APIRouter(dependencies=[Depends(keyed)])


@router.post("/v1/jobs/{kind}")
async def run_job(kind: str, request: Request) -> Any:
    opts = of(request)
    admitted = admit(opts, request, kind)
    if isinstance(admitted, JSONResponse):
        return await refuse(request, admitted, opts.body_timeout_s or None)
    await sweep(opts)
    job_id = secrets.token_urlsafe(16)
    job_dir = opts.jobs_dir / job_id
    job_dir.mkdir()
    (job_dir / ".alive").touch()
    if admitted.detach:
        opts.waiting.add(job_id)  # before ``live``: an upload of a detached job never holds a slot
    opts.live[job_id] = job_dir
    start_heartbeat(opts)
    received = await _receive(opts, request, kind, job_id, job_dir, admitted)
    if isinstance(received, JSONResponse):
        return received
    run, spec = received
    if admitted.detach:
        assert opts.detached is not None
        try:
            answer = await anyio.to_thread.run_sync(opts.detached.submit, run, spec)
        except BaseException:
            _abandon(opts, job_id, job_dir)
            raise
        return JSONResponse(answer, status_code=202, headers={"Location": answer["links"]["self"], "Cache-Control": "no-store"})
    return StreamingResponse(stream(run, opts, admitted.report_webhooks), media_type=NDJSON,
                             headers={"X-Synapse-Job": job_id, "Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip


def _abandon(opts: ServerOptions, job_id: str, job_dir: Path) -> None:
    forget(opts, job_id)
    remove_tree(job_dir)


async def _receive(opts: ServerOptions, request: Request, kind: str, job_id: str, job_dir: Path,
                   admitted: Admission) -> tuple[runner.JobRun, Any] | JSONResponse:  # fmt: skip
    """The request body into the job's folder, and the job made from it; or the refusal, with nothing left behind."""
    from synapse_cli.jobs import spec_class

    try:
        cls = spec_class(kind)
        inputs: tuple[str, ...] | None = tuple(getattr(cls, "INPUTS", ()))
        installed: tuple[str, ...] = tuple(getattr(cls, "INSTALLED", ()))
    except ImportError:
        inputs, installed = None, ()  # prepare() explains
    body_stream = _BodyStream(request)
    try:
        body = await read_body(request.headers.get("content-type", ""), body_stream.chunks(), job_dir / "in", opts.max_bytes,
                               inputs=inputs, idle_timeout_s=opts.body_timeout_s or None, kind=kind, installed=installed)  # fmt: skip
        run = preparing.prepare(kind, body, job_dir, job_id, opts.models_dir, opts.storage)
        run.shards = admitted.shards
        if run.notify_url is not None:  # a stranger's URL this server will POST to: through the URL guard (a refusal is a 422)
            run.notify_target = await anyio.to_thread.run_sync(webhooks.check_target, opts, run.notify_url)
            run.url_base = str(request.base_url)
    except BadUpload as exc:
        _abandon(opts, job_id, job_dir)
        # refused before the body ended: a small rest is read and dropped, so the client (still
        # sending) gets the answer; a large one is not read at all, and the connection closes
        small = body_stream.received_all or (0 <= admitted.length <= DRAIN_MAX_BYTES and exc.status != 408)
        if small and not body_stream.received_all:
            small = await drain(request, opts.body_timeout_s or None)
        return error(exc.status, exc.message, close=not small)
    except ClientDisconnect:  # gone mid-upload: nothing to answer, nothing to keep
        _abandon(opts, job_id, job_dir)
        return error(400, "the client disconnected during the upload", close=True)
    except OSError as exc:  # a full disk, a name the file system refuses: the request fails, the server doesn't
        _abandon(opts, job_id, job_dir)
        return error(507 if exc.errno == 28 else 400, f"cannot store the upload: {exc.strerror or exc}", close=True)
    except BaseException:  # the client went away mid-upload, or a bug: leave nothing behind
        _abandon(opts, job_id, job_dir)
        raise
    return run, body.spec


class _BodyStream:
    """The request body as it arrives, remembering whether all of it came."""

    def __init__(self, request: Request) -> None:
        self.request, self.received_all = request, False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.received_all:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            self.received_all = not message.get("more_body", False)
            if message.get("body"):
                yield message["body"]


def _time_limit(run: runner.JobRun, opts: ServerOptions) -> threading.Timer | None:
    if not opts.job_timeout_s:
        return None
    limit = opts.job_timeout_s
    timer = threading.Timer(limit, run.cancel, (
        "time limit", Failed(1, f"the job ran longer than this server's limit of {limit:g} s (serve.job_timeout_s) and was stopped", "JobError")))  # fmt: skip
    timer.daemon = True
    return timer


async def stream(run: runner.JobRun, opts: ServerOptions, report: bool = False) -> AsyncIterator[bytes]:
    """Start the job and stream its events. A client that goes away, the job's time limit and the
    server's shutdown all cancel the job at once (``JobRun.cancel``: its processes are killed).

    While the job is silent, a blank line goes out every ``keepalive_s``: NDJSON readers skip
    blank lines, and the client's read timeout does not cut off a healthy job. With ``report``
    (``?report_webhooks=true``) and webhooks, the stream ends with what became of them, once its
    sender is done (the job's slot is free by then)."""
    channel = runner.Channel(asyncio.get_running_loop(), stall_timeout_s=opts.stall_timeout_s or None)
    opts.runs[run.job_id] = run
    timer = _time_limit(run, opts)

    def on_end(r: runner.JobRun, ok: bool) -> None:
        try:
            runner.conclude(r, ok, opts.on_job_end)
        finally:
            if timer is not None:
                timer.cancel()
            forget(opts, r.job_id)
            opts.runs.pop(r.job_id, None)

    feed = webhooks.start(opts, run)
    runner.run_in_thread(run, channel, on_end)
    if timer is not None:
        timer.start()
    if opts.closing:
        opts.cancel_all()
    done = False
    try:
        while not done:
            try:
                batch = await asyncio.wait_for(channel.get_batch(), opts.keepalive_s)
            except asyncio.TimeoutError:
                yield b"\n"
                continue
            lines: list[str] = []
            for item in batch:
                if item is runner.DONE:
                    done = True
                    break
                for ev in run.translate(item):
                    lines.append(encode(ev) + "\n")
                    if feed is not None:
                        feed.feed(ev)
            if lines:
                yield "".join(lines).encode("utf-8")
        if report:  # (a job without webhooks: an empty list)
            if feed is not None:
                feed.close(wait=False)
            async for line in webhooks.report(opts, run.job_id, opts.keepalive_s, b"\n", lambda: webhooks.sent(feed) if feed is not None else []):
                yield line
    finally:
        if not done:  # the client went away: stop the job now, not at its next event
            run.cancel("the client went away")
            if feed is not None:
                feed.cancel()
        channel.close()
        if feed is not None:
            feed.close(wait=False)  # the sender goes on retrying on its own: the stream (and its slot) need not wait
