"""Detached jobs: ``POST /v1/jobs/{kind}?detach=true`` and the ``/v1/jobs`` routes that follow them.

A detached job runs in the server whatever its client does. It is a ``runner.JobRun`` like a
streamed one (its own thread, its processes killed at once on cancel), but its events go to the
server's job store (``<work dir>/jobs.db``, a ``synapse_cli.store.JobStore``) instead of a
connection: the store is the record, so any request, or a restarted server, can read them back.
Followers of ``/events`` are woken by an in-process notification per job and read the new rows;
a job run by another process sharing the work dir is polled once a second instead.

- Concurrency: a detached job takes one of ``max_concurrent_jobs`` slots while it runs, as a
  streamed job does. Past the limit it waits as ``pending``, first in first out; at most
  ``max_queued_jobs`` wait (uploads in progress included), and past that ``POST`` answers 429.
- A job's record: its row (status, progress, times, result, error code and message) and its events
  (``seq`` = index + 1). The row goes final in the same locked step that stores the job's last event
  (``finished``, or an ``error``), so a follower that saw the end and then reads the record sees it final.
  A job that fails after its ``finished`` (compile with inputs that failed) ends ``finished``, ``error``,
  stored in one step: the row is ``failed`` with the error and keeps the result, and the outputs stay.
- Restart: when the next server starts on the work dir (or another server sharing it sees the dead
  one's rows), rows left ``processing`` by a server that died (its pid is gone) are marked ``failed``
  ("interrupted by a server restart: the server stopped while this job was running") with an ``error`` event, what is left of their
  processes (ffmpeg runs in a session of its own and outlives the server) is killed and their folders
  removed. Rows left ``pending`` are taken over and queued again in the order they were submitted:
  each queued job's prepared run (``run.json`` in its folder, beside its uploads) is enough to start it.
  A pending job whose run cannot be read back fails as a running one does.
- Pruning: jobs that ended more than ``keep_jobs_days`` ago (0: never) are deleted, row, events and
  folder, at start and then by the server's periodic sweep; ``GET`` then answers 404 as for an
  unknown id. A pending or running job is never pruned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from synapse_cli.events import Event, Failed, to_dict
from synapse_cli.server import preparing, runner
from synapse_cli.server.channel import StoreChannel
from synapse_cli.server.following import follow
from synapse_cli.server.job_records import MAX_LIST, job_record
from synapse_cli.server.processes import kill_orphans
from synapse_cli.server.state import forget
from synapse_cli.server.uploads import BadUpload, remove_tree
from synapse_cli.store import ACTIVE, JobStore, alive, this_host
from synapse_cli.store.recording import Recorder

if TYPE_CHECKING:
    from synapse_cli.server.state import ServerOptions
    from synapse_cli.store import Job

log = logging.getLogger("synapse.server")

SERVER_STOPPED = "interrupted by a server restart: the server stopped while this job was running"
_PRUNE_BUSY_TIMEOUT_S = 1.0  # a store locked longer is pruned at the next sweep: waiting would hold up the sweep and the server's stop


def cancelled_event(job_id: str) -> Failed:
    """The last event of a job cancelled with ``DELETE``: code 130, like an interrupted local run."""
    return Failed(130, f"the job was cancelled (DELETE /v1/jobs/{job_id}); its outputs were removed", "Interrupted")


class DetachedJobs:
    """The server's detached jobs: the store, the queue, the followers' notifications."""

    FLUSHER_IDLE_S = 1.0  # the flush thread ends after this long without events

    def __init__(self, opts: "ServerOptions") -> None:
        self.opts = opts
        self.store = JobStore(opts.work_dir / "jobs.db")
        self.lock = threading.RLock()  # the store's one connection, shared by the workers and the routes
        self.queue: deque[runner.JobRun] = deque()
        self.channels: dict[str, StoreChannel] = {}
        self._waiters: dict[str, set[tuple[Any, Any]]] = {}
        self._waiters_lock = threading.Lock()
        self._dirty: set[StoreChannel] = set()
        self._dirty_cond = threading.Condition()
        self._flusher: threading.Thread | None = None
        self.recover()
        self.prune()

    def flush_later(self, channel: StoreChannel) -> None:
        """Store ``channel``'s buffered events within ``FLUSH_S``, even if the job says nothing more."""
        with self._dirty_cond:
            self._dirty.add(channel)
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_loop, name="synapse-flush", daemon=True)
                self._flusher.start()
            self._dirty_cond.notify()

    def _flush_loop(self) -> None:
        while True:
            with self._dirty_cond:
                if not self._dirty and not self._dirty_cond.wait(self.FLUSHER_IDLE_S) and not self._dirty:
                    self._flusher = None
                    return  # idle: the next burst starts another (no thread outlives a quiet server by long)
            time.sleep(StoreChannel.FLUSH_S)
            with self._dirty_cond:
                dirty, self._dirty = self._dirty, set()
            for channel in dirty:
                try:
                    channel.flush()
                except Exception:  # noqa: BLE001 - a store error must not stop the other jobs' flushes
                    log.warning("job %s: cannot store its events", channel.run.job_id, exc_info=True)

    # -- the record ------------------------------------------------------------------------

    def recorder(self, job_id: str, on_write: Callable[[list[dict[str, Any]]], None] | None = None, **kwargs: Any) -> Recorder:
        """The job's ``Recorder`` on the server's store: under the store's lock, its followers woken by each write."""
        def written(batch: list[dict[str, Any]]) -> None:
            self.notify(job_id)
            if on_write is not None:
                on_write(batch)

        return Recorder(self.store, job_id, lock=self.lock, on_write=on_write or written,
                        warn=lambda message: log.warning("job %s: %s", job_id, message), **kwargs)

    def record(self, job_id: str, events: list[Event]) -> str | None:
        """Store ``events`` (already translated) at once; returns the final status they give the job, if any."""
        recorder = self.recorder(job_id)
        for event in events:
            recorder.event(event)
        recorder.end()
        return recorder.final[0] if recorder.final is not None else None

    def job_record(self, job: "Job") -> dict[str, Any]:
        """The JSON record of ``GET /v1/jobs/{id}``."""
        return job_record(self, job)

    def find(self, job_id: str) -> "Job | None":
        with self.lock:
            self._reap_others()
            return self.store.find(job_id)

    def get_record(self, job_id: str) -> dict[str, Any] | None:
        job = self.find(job_id)
        return None if job is None else self.job_record(job)

    def list_records(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            self._reap_others()
            jobs = self.store.list(status, limit, reap=False)
        return [self.job_record(j) for j in jobs]

    def recover(self) -> list[str]:
        """At start: rows of a server that died while they were running are ``failed``; those still
        waiting are queued here (``dispatch`` starts them: the app calls it once it is assembled)."""
        with self.lock:
            failed = self._reap_others(dispatch=False)
        if failed:
            log.warning("%d job(s) were marked failed: %s", len(failed), SERVER_STOPPED)
        return failed

    def prune(self) -> list[str]:
        """Delete the jobs that ended more than ``keep_jobs_days`` ago: record, events and any folder
        left on disk. Jobs of this process that are still winding up are kept. Never raises: a store
        that cannot be pruned now (locked for more than a second) is pruned at the next sweep, and says
        so in one warning line."""
        days = self.opts.keep_jobs_days
        if not days:
            return []
        try:
            with self.lock:
                ours = {*self.opts.live, *self.opts.runs}  # uploading, queued, running or concluding here
                self.store.set_busy_timeout(_PRUNE_BUSY_TIMEOUT_S)
                try:
                    pruned = self.store.prune_ended(days * 86400.0, keep=ours)
                finally:
                    self.store.set_busy_timeout(self.store.busy_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a sweep must not fail the request that triggered it
            log.warning("synapse serve: cannot prune the job store %s now (%s: %s); the next sweep tries again", self.store.path, type(exc).__name__, exc)
            return []
        for job_id in pruned:
            if job_id and "/" not in job_id and job_id not in (".", ".."):  # ids are folder names: never a path out of jobs/
                remove_tree(self.opts.jobs_dir / job_id)
        if pruned:
            log.info("pruned %d job(s) that ended more than %g day(s) ago (serve.keep_jobs_days)", len(pruned), days)
        return pruned

    def _reap_others(self, dispatch: bool = True) -> list[str]:
        """Mark ``failed`` the running rows whose server process is gone (its pid, checked with its start
        time), killing what is left of their processes; queue here, in submission order, the pending rows
        of such a process. A row of a live process (this one, or another server on the same work dir) is
        left alone. Returns the ids marked failed."""
        failed = []
        host = this_host()
        pending = sorted(self.store.list("pending", MAX_LIST * 10, reap=False), key=lambda j: j.created_at or 0.0)
        adopted = []
        for job in pending + self.store.list("processing", MAX_LIST * 10, reap=False):
            if job.host != host or alive(job):
                continue  # alive; or another machine's (a shared volume): only its pid could tell, and we cannot see it
            if job.status == "pending" and not self.opts.closing:
                run = self._adopt(job)
                if run is not None:
                    adopted.append(run)
                    continue
            kill_orphans(self.opts.jobs_dir / job.id)
            event = Failed(3, SERVER_STOPPED, "BackendError")
            if self.store.fail_dead(job.id, job.pid, 3, SERVER_STOPPED):  # only if it is still that dead server's active row
                self.store.append_events(job.id, [to_dict(event)])
                remove_tree(self.opts.jobs_dir / job.id)
                failed.append(job.id)
                self.notify(job.id)
        if adopted:
            from synapse_cli.server.state import start_heartbeat

            log.warning("%d queued job(s) of a server that stopped are queued here, in the order they were submitted", len(adopted))
            for run in adopted:
                (run.dir / ".alive").touch()
                with self.opts.slot_lock:
                    self.opts.waiting.add(run.job_id)
                    self.opts.live[run.job_id] = run.dir
                    self.queue.append(run)
            start_heartbeat(self.opts)
            if dispatch:
                self.dispatch()
        return failed

    def _adopt(self, job: "Job") -> runner.JobRun | None:
        """A dead server's pending job, ready to queue here; None when its run cannot be read back
        (then it fails as a running one does) or another process took it first."""
        job_dir = self.opts.jobs_dir / job.id
        if "/" in job.id or job.id in (".", ".."):
            return None
        try:
            run = preparing.restore_run(job.id, job_dir)
        except (OSError, ValueError, KeyError, TypeError, BadUpload) as exc:
            log.warning("job %s: cannot queue it again (%s: %s)", job.id, type(exc).__name__, getattr(exc, "message", exc))
            return None
        return run if self.store.adopt(job.id, job.pid) else None

    # -- notifications ---------------------------------------------------------------------

    def notify(self, job_id: str) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that follower's loop is closed
                pass

    # -- running ---------------------------------------------------------------------------

    def submit(self, run: runner.JobRun, spec: dict[str, Any]) -> dict[str, Any]:
        """Record the job ``pending``, queue it, and start what the free slots allow."""
        try:
            preparing.save_run(run)  # before the row: a restarted server queues again the pending rows it can read back
        except OSError as exc:  # a full disk: the job runs all the same, but would not outlive a restart while queued
            log.warning("job %s: cannot save its run for a restart (%s)", run.job_id, exc)
        with self.lock:  # the row and the queue in one step: concurrent submits queue in the rows' order (a restart's order)
            self.store.create(run.kind, spec, "serve", detached=True, job_id=run.job_id,
                              flags={"shards": run.shards} if run.shards > 1 else None)
            with self.opts.slot_lock:
                self.queue.append(run)
        self.dispatch()
        return {"id": run.job_id, "status": "pending",
                "links": {"self": f"/v1/jobs/{run.job_id}", "events": f"/v1/jobs/{run.job_id}/events", "cancel": f"/v1/jobs/{run.job_id}"}}

    def dispatch(self) -> None:
        """Start queued jobs while slots are free (a slot: a running job, detached or streamed, or a streamed upload)."""
        while True:
            with self.lock:  # taken from the queue and marked started in one step: jobs start (started_at) in the queue's order
                with self.opts.slot_lock:
                    if self.opts.closing or not self.queue or self.opts.slots_used() >= self.opts.job_slots:
                        return
                    run = self.queue.popleft()
                    self.opts.waiting.discard(run.job_id)
                started = run.cancel_reason is None and self.store.start(run.job_id)
            self._start(run, started)

    def _start(self, run: runner.JobRun, started: bool) -> None:
        opts = self.opts
        if not started:  # cancelled meanwhile
            self._forget(run.job_id)
            remove_tree(run.dir)
            return
        self.notify(run.job_id)
        from synapse_cli.server import webhooks

        channel = StoreChannel(self, run, webhooks.start(opts, run, self.store.path))
        self.channels[run.job_id] = channel
        opts.runs[run.job_id] = run
        timer: threading.Timer | None = None

        def on_end(r: runner.JobRun, ok: bool) -> None:
            try:
                runner.conclude(r, ok, opts.on_job_end)  # the outputs in place before the record says completed
            finally:
                if timer is not None:
                    timer.cancel()
                try:  # a job that ended without a last event (a generator that returned early) still gets one
                    channel.last_word(Failed(1, "the job ended without a result", "JobError"))
                except Exception:  # noqa: BLE001 - the store failed (a full disk): the slot is freed all the same
                    log.warning("job %s: cannot record its end", r.job_id, exc_info=True)
                if channel.feed is not None:
                    channel.feed.close(wait=False)  # retried on its own, without holding the job's slot
                self.channels.pop(r.job_id, None)
                opts.runs.pop(r.job_id, None)
                self._forget(r.job_id)

        if opts.job_timeout_s:
            limit = opts.job_timeout_s
            timer = threading.Timer(limit, run.cancel, (
                "time limit", Failed(1, f"the job ran longer than this server's limit of {limit:g} s (serve.job_timeout_s) and was stopped", "JobError")))
            timer.daemon = True
        runner.run_in_thread(run, channel, on_end)  # type: ignore[arg-type]  # StoreChannel has Channel's worker side
        if timer is not None:
            timer.start()
        if opts.closing:
            run.cancel("the server is shutting down", Failed(3, "the server is shutting down; the job was stopped (nothing was saved)", "BackendError"))

    def _forget(self, job_id: str) -> None:
        forget(self.opts, job_id)

    def cancel(self, job_id: str) -> str:
        """``DELETE``: "cancelled", "finished" (too late), "elsewhere" (another process runs it) or "unknown"."""
        with self.opts.slot_lock:
            queued = next((r for r in self.queue if r.job_id == job_id), None)
            if queued is not None:
                self.queue.remove(queued)
        if queued is not None:
            self._tell(queued, cancelled_event(job_id))  # first: a follower that sees the end finds its webhook sender
            self.record(job_id, [cancelled_event(job_id)])
            remove_tree(queued.dir)
            self._forget(job_id)
            return "cancelled"
        run = self.opts.runs.get(job_id)
        if run is not None and job_id in self.channels:
            run.cancel("cancelled by DELETE", cancelled_event(job_id))
            if run.thread is not None:
                run.thread.join(5.0)  # its processes are killed at once; its folder goes when its thread ends
            job = self.find(job_id)
            return "cancelled" if job is not None and job.status == "cancelled" else "finished"  # else it ended first
        job = self.find(job_id)
        if job is None:
            return "unknown"
        return "finished" if job.status not in ACTIVE else "elsewhere"

    def cancel_queued(self, reason: str) -> None:
        """Shutdown: the jobs still waiting fail now, rather than at the next start."""
        with self.opts.slot_lock:
            queued = list(self.queue)
            self.queue.clear()
        for run in queued:
            event = Failed(3, f"{reason}; the job had not started (nothing was saved)", "BackendError")
            self._tell(run, event)
            self.record(run.job_id, [event])
            remove_tree(run.dir)
            self._forget(run.job_id)

    def _tell(self, run: runner.JobRun, event: Failed) -> None:
        """A job that ends before it started still sends its last event to its webhook, if it has one."""
        from synapse_cli.server import webhooks

        feed = webhooks.start(self.opts, run, self.store.path)
        if feed is not None:
            feed.feed(event)
            feed.close(wait=False)

    # -- following -------------------------------------------------------------------------

    def follow(self, job_id: str, after: int, sse: bool, keepalive_s: float, report: bool = False) -> AsyncIterator[bytes]:
        """The job's events from index ``after``, then live until its last event (``server.following``)."""
        return follow(self, job_id, after, sse, keepalive_s, report)
