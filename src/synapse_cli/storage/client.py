"""Talking to object stores: obstore (Rust ``object_store``) behind one small class.

``Storage`` is built from the ``[storage]`` settings; the credentials are never settings:
obstore reads the ordinary ``AWS_*`` environment itself (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``), which
on Modal a named Secret provides. Foreign errors are mapped at this edge: a missing object is a
UsageError (exit 2), an unreachable or refusing store a BackendError (exit 3), and no message
carries a presigned query string.
"""

from __future__ import annotations

import datetime
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from synapse_cli.errors import BackendError, UsageError
from synapse_cli.storage.urls import ObjectURL, redact_text

# obstore's default per-request timeout (~30 s) would cut a long media GET and spend a retry
# resuming it with a Range request (FACTS.md): downloads and uploads get a long one.
_CLIENT_OPTIONS = {"timeout": datetime.timedelta(hours=2), "connect_timeout": datetime.timedelta(seconds=15)}
# A single PUT up to this size (it can refuse an existing key atomically); larger files go multipart.
SINGLE_PUT_MAX = 64 * 1024 * 1024
CHUNK = 16 * 1024 * 1024


@contextmanager
def map_storage_errors(url: Any, what: str = "") -> Iterator[None]:
    """obstore's exceptions as ours, naming the URL (never a signature)."""
    from obstore import exceptions as ox

    try:
        yield
    except FileNotFoundError:
        raise UsageError(f"{what or 'object'} not found: {url}") from None
    except ox.AlreadyExistsError:
        raise UsageError(f"{url} already exists (use --overwrite to replace it)") from None
    except (ox.PermissionDeniedError, ox.UnauthenticatedError) as exc:
        raise BackendError(f"storage refused {url}: {_first_line(exc)} (check the AWS_* credentials)") from None
    except ox.BaseError as exc:
        raise BackendError(f"storage error on {url}: {_first_line(exc)}") from None
    except (ConnectionError, TimeoutError) as exc:
        raise BackendError(f"storage unreachable for {url}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = redact_text(str(exc)).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class Storage:
    """Object storage as the ``[storage]`` settings describe it: one obstore ``S3Store`` per bucket."""

    def __init__(
        self,
        endpoint: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        allow_http: bool = False,
        presign_expiry_s: int = 6 * 3600,
        client_options: Mapping[str, Any] | None = None,
        endpoints: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.endpoints = dict(endpoints or {})  # bucket -> endpoint, where it differs from ``endpoint``
        self.region = region
        self.path_style = path_style
        self.allow_http = allow_http
        self.presign_expiry_s = presign_expiry_s
        self._client_options = dict(client_options or _CLIENT_OPTIONS)
        self._stores: dict[str, Any] = {}
        self._guard: Any = None  # a netguard.Guard where the URLs are strangers' (serve, a container), made on first use
        self._guard_settings: Mapping[str, Any] | None = None
        self.allow_buckets: frozenset[str] | None = None  # None: any bucket the credentials reach

    @property
    def guard(self) -> Any:
        """The URL guard, or None on the local backend (netguard and httpcore load only once a URL needs it)."""
        if self._guard is None and self._guard_settings is not None:
            from synapse_cli.netguard import Guard

            self._guard = Guard.from_settings(self._guard_settings, allow_http=self.allow_http)
        return self._guard

    @classmethod
    def for_container(cls, env: Mapping[str, str]) -> "Storage":
        """In a Modal container: the ``[storage]`` settings and ``[serve] allow_hosts`` from the environment
        (a Secret's ``SYNAPSE_STORAGE_*``), user https:// through the guard."""
        from synapse_cli.config import resolve

        return cls.guarded(resolve({}, env, {}), buckets=False)

    @classmethod
    def guarded(cls, settings: Mapping[str, Any], buckets: bool = True, guard: Any = None) -> "Storage":
        """For URLs that strangers give (``synapse serve``; a container): https:// inputs through the
        netguard (no loopback, private, link-local, CGNAT, unique-local or mapped addresses, unless
        ``[serve] allow_hosts`` admits the host); with ``buckets``, s3:// only on ``[serve] allow_buckets``.
        ``guard``: a ``netguard.Guard`` to use instead of the settings' (a test's resolver)."""
        storage = cls.from_settings(settings)
        storage._guard = guard
        storage._guard_settings = {"serve.allow_hosts": settings["serve.allow_hosts"]}
        if buckets:
            storage.allow_buckets = frozenset(settings["serve.allow_buckets"])
        return storage

    def bucket_allowed(self, url: ObjectURL) -> bool:
        return self.allow_buckets is None or url.bucket in self.allow_buckets

    def check_bucket(self, url: ObjectURL, field: str) -> None:
        """Refuse (a UsageError; the server answers 403 for it, see ``server.urls.check_urls``) a bucket
        that is not on the allowlist."""
        if not self.bucket_allowed(url):
            raise UsageError(f"{field}: bucket {url.bucket!r} is not on this server's [serve] allow_buckets")

    def check_https(self, url: str, field: str) -> None:
        """Where a guard is set: the URL's scheme and every address its host resolves to must be allowed
        (else a UsageError naming the field: a 422 on the server). ffmpeg/PyAV then read it with no redirects."""
        if self._guard_settings is None:
            return
        from urllib.parse import urlsplit

        from synapse_cli.netguard import RefusedURL

        parts = urlsplit(url)
        try:  # the guard's own RefusedURL is shown as what it is to users, a UsageError (the documented names)
            self.guard.check_url(url, "URL")
            self.guard.addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        except RefusedURL as exc:
            raise UsageError(f"input {field}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - httpcore.ConnectError: the name does not resolve
            raise UsageError(f"input {field}: {exc}") from None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Storage":
        return cls(
            endpoint=settings["storage.endpoint"],
            region=settings["storage.region"],
            path_style=bool(settings["storage.path_style"]),
            allow_http=bool(settings["storage.allow_http"]),
            presign_expiry_s=int(settings["storage.presign_expiry_s"]),
            endpoints=settings.get("storage.endpoints") or {},
        )

    def describe(self) -> dict[str, Any]:
        """What ``synapse doctor`` prints: the settings, and which credentials variables are set (never their values)."""
        import os

        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
        return {
            "endpoint": self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or "(AWS default)",
            "region": self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "(default)",
            "endpoints": dict(self.endpoints),
            "path_style": self.path_style,
            "allow_http": self.allow_http,
            "credentials": [n for n in names if os.environ.get(n)],
        }

    def store(self, bucket: str) -> Any:
        """The obstore store for ``bucket`` (one per bucket, reused)."""
        found = self._stores.get(bucket)
        if found is not None:
            return found
        from obstore.store import S3Store

        config: Any = {}  # obstore.store.S3Config (a TypedDict)
        endpoint = self.endpoints.get(bucket) or self.endpoint
        if endpoint:
            config["endpoint"] = endpoint
        if self.region:
            config["region"] = self.region
        if self.path_style:
            config["virtual_hosted_style_request"] = False
        options: Any = dict(self._client_options)  # obstore.store.ClientConfig
        import os

        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
        if endpoint.startswith("http://"):  # the operator's own endpoint (MinIO on a private network, tests)
            options["allow_http"] = True
        try:
            store = S3Store(bucket, config=config, client_options=options)
        except Exception as exc:  # obstore raises its own config errors (no region, a bad endpoint)
            raise UsageError(f"storage settings for bucket {bucket!r}: {_first_line(exc)}") from None
        self._stores[bucket] = store
        return store

    # -- objects ----------------------------------------------------------------------------

    def head(self, url: ObjectURL) -> dict[str, Any] | None:
        """The object's metadata (size, e_tag, version, last_modified), or None if there is none."""
        import obstore

        try:
            with map_storage_errors(url):
                return dict(obstore.head(self.store(url.bucket), url.key))
        except UsageError as exc:
            if "not found" in str(exc):
                return None
            raise

    def list(self, prefix: ObjectURL) -> list[dict[str, Any]]:
        """Every object under ``prefix`` (``path`` is its key)."""
        import obstore

        with map_storage_errors(prefix):
            return [dict(meta) for batch in obstore.list(self.store(prefix.bucket), prefix=prefix.key) for meta in batch]

    def ping(self, prefix: ObjectURL) -> None:
        """One listing request (at most one key): does the bucket answer with these credentials?"""
        import obstore

        with map_storage_errors(prefix):
            next(iter(obstore.list(self.store(prefix.bucket), prefix=prefix.key or None, chunk_size=1)), None)

    def presign_get(self, url: ObjectURL) -> str:
        """A presigned GET URL for ``url`` (a secret: never printed or stored; see ``urls.redact``)."""
        import obstore

        with map_storage_errors(url):
            return str(obstore.sign(self.store(url.bucket), "GET", url.key, datetime.timedelta(seconds=self.presign_expiry_s)))

    def download(self, url: ObjectURL, dest: Path) -> int:
        """Fetch the whole object into ``dest``; returns its size."""
        import obstore

        size = 0
        with map_storage_errors(url, "input"):
            result = obstore.get(self.store(url.bucket), url.key)
            with open(dest, "wb") as f:
                for chunk in result.stream(min_chunk_size=1 << 20):
                    f.write(chunk)
                    size += len(chunk)
        return size

    def identity(self, url: str) -> str | None:
        """The cache key's part for an input URL: the redacted URL and its version, ETag or Last-Modified + size
        (None when the store says none of them, or for a prefix: then the job is not cached)."""
        from synapse_cli.storage.urls import is_url, parse_s3, redact

        if url.lower().startswith("s3://"):
            if not self.has_credentials():  # e.g. a Modal client: the container's Secret has them, this machine has none
                return None  # (asking anyway would try the cloud metadata endpoint, with retries, before giving up)
            parsed = parse_s3(url)
            if parsed.is_prefix:
                return None
            meta = self.head(parsed)
            if meta is None:
                return None
            tag = meta.get("version") or meta.get("e_tag") or f"{meta.get('last_modified')}/{meta.get('size')}"
            return f"{parsed}#{tag}"
        if not is_url(url):
            return None
        import httpx

        try:
            with httpx.Client(follow_redirects=False, trust_env=False, timeout=30.0) as client:
                response = client.head(url)
        except httpx.HTTPError:
            return None
        etag, modified, size = (response.headers.get(h) for h in ("etag", "last-modified", "content-length"))
        if response.status_code != 200 or not (etag or (modified and size)):
            return None
        return f"{redact(url)}#{etag or f'{modified}/{size}'}"

    @staticmethod
    def has_credentials() -> bool:
        """Does the environment name S3 credentials (keys, a web identity, a container credentials URI)?"""
        import os

        names = ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
        return any(os.environ.get(n) for n in names)

    def exists(self, url: ObjectURL) -> bool:
        return self.head(url) is not None

    def upload(self, src: Path, url: ObjectURL, overwrite: bool) -> int:
        """Put ``src`` at ``url``: whole or not at all.

        Small files go in one PUT, which (without ``overwrite``) refuses a key that appeared
        meanwhile; larger ones go multipart, which obstore aborts on any failure (Ctrl-C
        included), so a reader never sees part of an object. A kill -9 mid-upload leaves an
        incomplete multipart upload for the bucket's lifecycle rule (docs/storage.md)."""
        import obstore

        size = src.stat().st_size
        store = self.store(url.bucket)
        with map_storage_errors(url):
            if size <= SINGLE_PUT_MAX:
                data = src.read_bytes()
                _cancellable(lambda: obstore.put_async(store, url.key, data, mode="overwrite" if overwrite else "create"))
            else:
                if not overwrite and self.head(url) is not None:
                    raise UsageError(f"{url} already exists (use --overwrite to replace it)")
                with open(src, "rb") as f:
                    _cancellable(lambda: obstore.put_async(store, url.key, f, chunk_size=CHUNK, max_concurrency=8))
        return size


def _cancellable(start: Any) -> Any:
    """Await ``start()`` on an event loop of its own, in a thread, so that Ctrl-C stops it.

    obstore's synchronous ``put`` waits in Rust, where Python's signal handler cannot run: a Ctrl-C
    would land only after the upload had completed, leaving the object it should have prevented.
    Here the main thread waits in short joins; a KeyboardInterrupt (or SIGTERM turned into one)
    cancels the task, which drops the request: a single PUT never commits, a multipart upload is never
    completed (its parts are left to the bucket's lifecycle rule, as after kill -9)."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    outcome: dict[str, Any] = {}
    task_box: dict[str, asyncio.Task[Any]] = {}
    stop = threading.Event()  # set before the cancel is sent: a task that had not started yet never starts

    async def main() -> Any:
        task_box["task"] = asyncio.current_task()  # type: ignore[assignment]
        if stop.is_set():
            raise asyncio.CancelledError
        return await start()

    def run() -> None:
        try:
            outcome["value"] = loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc
        finally:
            loop.close()

    def cancel() -> None:
        if "task" in task_box:
            task_box["task"].cancel()

    worker = threading.Thread(target=run, name="synapse-upload", daemon=True)
    try:
        worker.start()  # inside the try: a Ctrl-C while the thread starts cancels it too
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        stop.set()
        try:
            loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the loop is closed: the thread has ended
            pass
        if worker.ident is not None:  # (an interrupt can land before the thread exists)
            worker.join(30)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
