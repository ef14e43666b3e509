"""Downloading a finished job's outputs from its endpoint (``GET /v1/artifacts/…``) into temporary siblings of their local paths."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

import httpx

from synapse_cli.backends._remote import ErrorMap, Outputs, map_errors, retry_until_first_event
from synapse_cli.backends.http.errors import KEY_REJECTED, _ArtifactGone, _Retryable, _retry_after, _should_retry_download
from synapse_cli.errors import BackendError, UsageError
from synapse_cli.events import Artifact, Event, Log


_DOWNLOAD_ERRORS: ErrorMap = {
    _Retryable: (BackendError, "downloading {url}: {detail}"),
    _ArtifactGone: (BackendError, "{detail}"),
    httpx.HTTPError: (BackendError, "downloading {url} failed: {detail}"),
    OSError: (UsageError, "cannot write {folder}: {detail}"),
}


class Downloads:
    """``HttpBackend``'s part that fetches artifacts (``collect_outputs``' callback)."""

    endpoint: str
    max_retries: int
    backoff_s: float
    _client: httpx.Client
    _headers: dict[str, str]

    def _fetch(self, event: Artifact, targets: dict[tuple[str, int | None], str], outputs: Outputs) -> Event:
        """``collect_outputs``'s callback: download one artifact into a temporary sibling of its output."""
        if event.path.startswith("s3://"):  # the server wrote it to its object: nothing comes through this client
            return event
        url, dest, _ = self._place(event, targets)
        if dest is None:
            return Log(f"artifact {event.path} matches no output of the spec and was not downloaded", level="warning")
        outputs.receive(dest, lambda tmp: self._download(url, tmp, event.bytes))
        return Artifact(path=str(dest), bytes=event.bytes)

    def _place(self, event: Artifact, targets: dict[tuple[str, int | None], str]) -> tuple[str, Path | None, Path | None]:
        """The download URL, the local destination, and (for a file of a directory output) that directory."""
        parts = urlsplit(event.path)
        if parts.scheme or parts.netloc or not parts.path.startswith("/v1/artifacts/"):
            raise BackendError(f"the endpoint sent an artifact that is not a /v1/artifacts/ path: {event.path!r:.100}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        url = self.endpoint + parts.path
        index = int(query["index"]) if query.get("index", "").isdigit() else None
        target = targets.get((query.get("output", ""), index))
        if target is None:
            return url, None, None
        base = Path(target)
        name = query.get("name")
        if not name:
            return url, base, None
        rel = PurePosixPath(name)
        if rel.is_absolute() or any(p in ("", ".", "..") for p in rel.parts) or "\\" in name:
            raise BackendError(f"the endpoint sent an unsafe artifact name {name!r}")
        return url, base.joinpath(*rel.parts), base

    def _download(self, url: str, tmp: Path, expected: int) -> None:
        def get() -> None:
            with self._client.stream("GET", url, headers=self._headers) as response:
                if response.status_code in (401, 403):
                    raise BackendError(f"{KEY_REJECTED} (HTTP {response.status_code} from {url})")
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Retryable(response.status_code, _retry_after(response.headers.get("retry-after")))
                if response.status_code in (404, 410):
                    raise _ArtifactGone(f"downloading {url}: the server no longer has it (HTTP {response.status_code}): a finished job's "
                                        "outputs are kept for the server's artifact lifetime; run the job again")
                if response.status_code != 200:
                    raise BackendError(f"downloading {url}: HTTP {response.status_code}")
                written = 0
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        written += f.write(chunk)
                if written != expected:
                    raise BackendError(f"downloading {url}: got {written} of {expected} bytes")

        with map_errors(_DOWNLOAD_ERRORS, url=url, folder=tmp.parent):
            for _ in retry_until_first_event(get, _should_retry_download, self.max_retries, self.backoff_s, url):
                pass  # a download's retries are not reported: the job already finished
