"""The server's rules for a job's URL fields (``s3://``, ``https://``), checked when it is submitted:
the scheme, ``s3://`` buckets on ``[serve] allow_buckets`` (403), a user's ``https://`` through the
URL guard (422 naming the field). Nothing runs for a job they refuse."""

from __future__ import annotations

from typing import Any

from synapse_cli.errors import UsageError
from synapse_cli.server.uploads import BadUpload


def check_urls(kind: str, data: dict[str, Any], storage: Any) -> None:
    """The server's rules for URL fields, checked when the job is submitted (nothing runs otherwise):
    the scheme (s3 read/write, https read, http only with ``[storage] allow_http``), ``s3://`` buckets
    on ``[serve] allow_buckets`` (403), a user's ``https://`` through the URL guard (422 naming the field)."""
    from synapse_cli.storage.urls import url_fields
    from synapse_cli.storage.urls import check_url, parse_s3

    try:
        for f in url_fields(kind, data):
            if storage is None:
                raise UsageError(f"{f.label}: this server takes no URLs")
            scheme = check_url(f.url, f.label, storage.allow_http, output=f.output)
            if scheme == "s3":
                url = parse_s3(f.url, f.label)
                if not storage.bucket_allowed(url):
                    try:
                        storage.check_bucket(url, f.label)
                    except UsageError as exc:
                        raise BadUpload(403, str(exc)) from None
            else:
                storage.check_https(f.url, f.label)
    except UsageError as exc:
        raise BadUpload(422, str(exc)) from None
    except OSError as exc:  # the name does not resolve
        raise BadUpload(422, f"{kind} input URL: cannot resolve its host ({exc.strerror or exc})") from None
