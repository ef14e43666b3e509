"""The job store and what records into it: one package for every path that writes or reads jobs.

- ``db``: the SQLite job store (``JobStore``, ``Job``, the states); importing the package loads only this.
- ``recording``: a run's events recorded as they pass (``record``), a stored job replayed live
  (``store_events``), the GitHub step summary.
- ``cache``: the result cache: an identical job's result reused, a running one followed.
"""

from synapse_cli.store.db import (
    ACTIVE, ENDED_BEFORE, HEARTBEAT_S, ORPHANED, PENDING_GRACE_S, STALE_AFTER_S, STATES, Job, JobStore, alive, this_host,
)  # fmt: skip

__all__ = ["ACTIVE", "ENDED_BEFORE", "HEARTBEAT_S", "ORPHANED", "PENDING_GRACE_S", "STALE_AFTER_S", "STATES", "Job", "JobStore", "alive", "this_host"]
