from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Iterator, Mapping

from synapse_cli.backends.base import Backend, Capabilities
from synapse_cli.events import Event
from synapse_cli.jobs import load_job


class LocalBackend(Backend):
    """Runs the job generator in this process; a detached job runs in a worker process of its own."""

    name = "local"
    capabilities = Capabilities(detach=True, shards="local", detach_shards=True, stages_urls=True)  # the job runs here: this machine reads and writes its URLs

    def run(self, kind: str, spec: Any) -> Iterator[Event]:
        yield from load_job(kind)(spec)

    def run_shard(self, kind: str, spec: Any) -> Iterator[Event]:
        """A shard runs in its own worker process: shards use every core, and cancelling one kills it at once."""
        from synapse_cli.backends._worker import WorkerCall

        return WorkerCall(kind, spec)  # type: ignore[return-value]

    def detach(self, kind: str, spec: Any, job: Any, store: Any, env: Mapping[str, str]) -> None:
        from synapse_cli.storage.staging import secret_bearing

        secret = secret_bearing(kind, spec)
        if secret:  # the worker reads its spec from the job store, which never keeps a token
            from synapse_cli.errors import UsageError

            raise UsageError(f"{secret}: a detached job cannot take a URL with a query string or user info (the job store keeps no secrets); use s3:// or run it attached")
        worker_env = {**os.environ, **env, "SYNAPSE_JOBS_DB": str(store.path)}
        log_dir = store.path.parent / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"{job.id}.log", "ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "synapse_cli", "jobs", "worker", job.id],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=worker_env, start_new_session=True,  # outlives the terminal
            )  # fmt: skip
        store.set_pid(job.id, worker.pid)

    def follow(self, job: Any, store: Any) -> Iterator[Event]:
        from synapse_cli.store.recording import store_events

        return store_events(store, job.id)

    def cancel(self, job: Any, store: Any) -> None:
        from synapse_cli.errors import UsageError
        from synapse_cli.store import alive, this_host

        if job.pid and job.host and job.host != this_host():
            raise UsageError(f"job {job.id} runs on {job.host}: cancel it there")
        # only the process that started as the worker is signalled, never whatever holds its pid now
        if not job.pid or not alive(job):
            store.finish(job.id, "cancelled", error_code=130, error_message="cancelled; its worker was not running")
            return
        try:
            os.kill(job.pid, signal.SIGTERM)  # the worker treats it as Ctrl-C: cleanup, then "cancelled"
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and store.get(job.id).status in ("pending", "processing"):
            time.sleep(0.05)
        store.finish(job.id, "cancelled", error_code=130, error_message="cancelled by synapse jobs cancel")
