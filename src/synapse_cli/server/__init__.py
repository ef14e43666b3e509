"""The HTTP endpoint: every job kind behind one authenticated, streaming ASGI app.

- ``app``: ``create_app(settings, work_dir=, api_key=, max_upload_mb=)`` -> FastAPI;
  ``synapse serve`` runs it with uvicorn, and the Modal app wraps the same factory
  with ``@modal.asgi_app``.
- ``uploads``: the request body (spec + input files) streamed into the job's folder,
  with the size limit and filename checks.
- ``runner``: a job's folder, its spec rewritten to that folder, the worker thread,
  the event stream and the artifacts it serves.
- ``detached``: jobs submitted with ``?detach=true``: the server's job store (``<work dir>/jobs.db``),
  the queue for a free slot, the ``/v1/jobs`` records and the followers of ``/events``.
- ``openapi``: the document of ``GET /v1/openapi.json``.
(What the client shares with the server, media types and the key file, is ``synapse_cli.protocol``.)

Importing this package reads nothing and starts nothing; only ``create_app`` touches
the work dir. It imports FastAPI, so the CLI imports it only inside ``synapse serve``.
"""

from typing import Any

__all__ = ["ServerOptions", "create_app"]


def __getattr__(name: str) -> Any:
    # lazy: importing the package must not pay for FastAPI
    if name in __all__:
        from synapse_cli.server import app

        return getattr(app, name)
    raise AttributeError(name)
