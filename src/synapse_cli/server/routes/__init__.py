"""The server's routes, one ``APIRouter`` per concern; each reads the app's state from ``request.app.state``.

- ``jobs``: ``POST /v1/jobs/{kind}`` (streamed, or ``?detach=true``).
- ``records``: ``GET /v1/jobs``, ``GET/DELETE /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events``.
- ``artifacts``: ``GET /v1/artifacts/{id}``.
- ``meta``: ``GET /v1/health``, ``GET /v1/openapi.json``.
- ``page``: ``GET /`` (the jobs page) and ``POST /v1/session`` (its cookie).
"""
