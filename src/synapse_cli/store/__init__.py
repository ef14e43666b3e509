"""The job store and what records into it: one package for every path that writes or reads jobs.

- ``db``: the SQLite job store (``JobStore``, the states) and ``rows``: its ``Job`` records and process liveness;
  importing the package loads only these.
- ``recording``: a run's events recorded as they pass (``record``), a stored job replayed live
  (``store_events``), the GitHub step summary.
- ``cache``: the result cache: an identical job's result reused, a running one followed.
"""

from synapse_cli.store.db import ACTIVE, ENDED_BEFORE, HEARTBEAT_S, ORPHANED, PENDING_GRACE_S, STALE_AFTER_S, STATES, JobStore
from synapse_cli.store.rows import Job, alive, this_host

__all__ = ["ACTIVE", "ENDED_BEFORE", "HEARTBEAT_S", "ORPHANED", "PENDING_GRACE_S", "STALE_AFTER_S", "STATES", "Job", "JobStore", "alive", "this_host"]
