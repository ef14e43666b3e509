"""The sweep: expired outputs, folders of dead processes and old detached jobs leave the work dir.

``sweep`` runs before each new job and, while the app runs (its lifespan), on a timer every
``min(60 s, artifact_ttl_s)``, idle or not (``sweep_timer``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio

from synapse_cli.server.state import HEARTBEAT_STALE_S, ServerOptions
from synapse_cli.server.uploads import remove_tree

log = logging.getLogger("synapse.server")

SWEEP_EVERY_S = 60.0
SWEEP_TIMER_MIN_S = 1.0  # artifact_ttl_s=0 (each submit sweeps) must not make the timer spin


def _expired(opts: ServerOptions, folder: Path, now: float) -> bool:
    """A finished job's age is its ``.done``; a job still uploading or running (here or in another
    process sharing the work dir) keeps a fresh ``.alive`` and is never removed, however long it runs."""
    done = folder / ".done"
    if done.exists():
        return now - done.stat().st_mtime > opts.artifact_ttl_s
    if (folder / ".alive").exists():
        return now - (folder / ".alive").stat().st_mtime > HEARTBEAT_STALE_S
    return now - folder.stat().st_mtime > max(opts.artifact_ttl_s, HEARTBEAT_STALE_S)  # neither: an older server's folder


async def sweep(opts: ServerOptions) -> None:
    """Remove job folders whose artifacts expired, and those of jobs whose process died; and the
    detached jobs that ended more than ``keep_jobs_days`` ago (``DetachedJobs.prune``)."""
    now = time.time()
    if now - opts.last_sweep < min(SWEEP_EVERY_S, opts.artifact_ttl_s):
        return
    opts.last_sweep = now

    def run() -> None:
        if opts.detached is not None:
            opts.detached.prune()
        for job_dir in opts.jobs_dir.iterdir():
            if opts.sweeps_stop.is_set():  # the server is stopping: the rest waits for the next sweep
                return
            if job_dir.name in opts.live:
                continue
            try:
                expired = _expired(opts, job_dir, now)
            except OSError:
                continue
            if expired:
                remove_tree(job_dir)

    await anyio.to_thread.run_sync(run)


async def sweep_timer(opts: ServerOptions) -> None:
    """``sweep`` every ``min(60 s, artifact_ttl_s)`` while the app runs, idle or not, from its start:
    outputs expire and old jobs are pruned without waiting for the next job. A sweep a request ran
    meanwhile counts (``last_sweep``); a sweep that fails is one warning line, and the next one is due
    as usual. Runs in the app's lifespan, which cancels it."""
    every = max(min(SWEEP_EVERY_S, opts.artifact_ttl_s), SWEEP_TIMER_MIN_S)
    while not opts.sweeps_stop.is_set():
        try:
            await sweep(opts)
        except Exception as exc:  # noqa: BLE001 - e.g. the jobs folder gone, a locked store: try again later
            log.warning("synapse serve: the sweep of %s failed (%s: %s); the next is in %g s", opts.jobs_dir, type(exc).__name__, exc, every)
        # sleep until the next sweep is due; at least a little, should the clock say it is already
        await anyio.sleep(max(opts.last_sweep + every - time.time(), 0.05))
