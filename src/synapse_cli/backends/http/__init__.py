"""The HTTP backend: run a job on a synapse HTTP endpoint (``synapse serve``, or the same app on Modal).

One job is one ``POST /v1/jobs/{kind}``: the spec as JSON plus the INPUTS files as a
multipart upload. The response is the job's NDJSON event stream, decoded line by line
as it arrives. Outputs come back as ``artifact`` events naming ``/v1/artifacts/{id}``
downloads; after ``finished`` each is downloaded to a temporary file beside its local
output and all are renamed into place (``_remote.collect_outputs``), so a broken stream
or download leaves no partial output.

Retries (``stamina``: exponential backoff with jitter) cover connect errors, 429 (its
``Retry-After`` is honoured) and 5xx *before* the stream starts. A 4xx is never retried,
and a job whose stream started is never replayed. httpx is imported here only, so
``synapse --help`` never pays for it.

Detached jobs (``--detach``, issue #15): the same upload with ``?detach=true``, answered 202 with
the server's job id, which the job store keeps with the endpoint (never the key). ``follow``
reads ``GET /v1/jobs/{id}/events?after=N`` and copies each event into the store (``_Mirror``),
so a dropped connection or an interrupted ``jobs wait`` resumes at the next index; ``cancel``
is ``DELETE /v1/jobs/{id}``; ``refresh`` is ``GET /v1/jobs/{id}`` for ``jobs show``/``list``.

The package, by concern: ``backend`` (``HttpBackend``: runs, detached jobs, downloads), ``errors``
(status codes and bodies to our errors, and what is retried), ``wire`` (the request's parts, the
event lines and JSON bodies), ``mirror`` (a followed job's events copied into the job store).
"""

from synapse_cli.backends.http.backend import HttpBackend

__all__ = ["HttpBackend"]
