"""Staging around a job generator, wherever it runs (this machine, a Modal container, the server).

``staged(kind, spec, storage, run)`` yields the events of ``run(local_spec)`` where
``local_spec`` is ``spec`` with every URL replaced by something the job reads or writes as it
does a path:

- a **streamed** input (a field in the spec class's ``STREAMED``, e.g. export's ``input``, that
  is not an image or a prefix) becomes a presigned GET URL (``s3://``) or stays the https URL:
  ffmpeg/PyAV range-read it (``jobs._media.url_options``), so a shard fetches its window only.
  Where a guard is set (serve, a container), an https URL is read through a loopback relay that
  connects to checked addresses only (``storage.relay``): ffmpeg never resolves a stranger's host;
- any other input (schemas, a folder of them, an image) is fetched whole into a temp folder;
- an output becomes a file (or, for a ``*_dir`` field, a folder) in the temp folder, uploaded
  once the job's ``Finished`` came and before it is passed on; its ``Artifact`` events are held
  until then and name the URL. An existing key is refused before the job starts (without
  ``overwrite``); a failure or Ctrl-C uploads nothing, and an upload that fails leaves no object.

Every event and error passes through ``Names``: the presigned URLs and temp paths the job saw are
replaced by the URLs the user gave (redacted), so nothing signed is printed or stored.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from synapse_cli.errors import SynapseError, UsageError
from synapse_cli.jsonwalk import map_strings
from synapse_cli.events import Artifact, Event, Finished
from synapse_cli.jobs import spec_from_dict
from synapse_cli.storage.client import Storage
from synapse_cli.storage.urls import ObjectURL, URLField, check_url, has_urls, parse_s3, redact, url_fields

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MAX_FETCH_BYTES = 512 * 1024 * 1024  # a whole-fetched input (schemas, images) larger than this is refused


def secret_bearing(kind: str, spec: Any) -> str | None:
    """The label of the first URL field that the job store would redact (a query string, user info), if any."""
    for f in url_fields(kind, asdict(spec)):
        parts = urlsplit(f.url)
        if parts.query or "@" in parts.netloc:
            return f.label
    return None


class Names:
    """What the job saw -> what the user gave: presigned URLs and temp paths -> redacted URLs."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None

    def add(self, seen: str, shown: str) -> None:
        self.names[seen] = shown
        keys = sorted(self.names, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, keys)))

    def text(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self.names[m.group(0)], text)

    def value(self, value: Any) -> Any:
        return map_strings(value, self.text)

    def event(self, event: Event) -> Event:
        if not is_dataclass(event):
            return event
        changes = {f.name: self.value(getattr(event, f.name)) for f in fields(event) if isinstance(getattr(event, f.name), (str, list, dict))}
        return replace(event, **changes)  # type: ignore[type-var]

    def error(self, exc: SynapseError) -> SynapseError:
        from synapse_cli.storage.urls import redact_text

        return type(exc)(redact_text(self.text(exc.message)))


def _basename(url: str) -> str:
    name = PurePosixPath(urlsplit(url).path.rstrip("/")).name
    return re.sub(r"[^\w.\-]", "_", name) or "object"


class Stage:
    """One job's URLs, placed: ``spec()`` is what the job runs on; ``upload()`` commits the outputs."""

    def __init__(self, kind: str, spec: Any, storage: Storage, workdir: Path, open_url: Callable[..., Any] | None = None) -> None:
        self.kind, self.storage, self.workdir = kind, storage, workdir
        self.names = Names()
        self.uploads: list[tuple[Path, ObjectURL, bool]] = []  # (local file or folder, destination, is a folder)
        self.data = asdict(spec)
        self.overwrite = bool(self.data.get("overwrite"))
        self.streamed = tuple(getattr(type(spec), "STREAMED", ()))
        self.relays: list[Any] = []  # storage.relay.Relay: a guarded media input's loopback relays, closed with the stage
        self._placed: dict[tuple[str, int | None], str] = {}
        found = url_fields(kind, self.data)
        try:
            for n, f in enumerate(x for x in found if x.output):  # outputs first: an existing key is refused before any fetch
                self._place_output(n, f)
            for n, f in enumerate(x for x in found if not x.output):
                self._place_input(n, f)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for relay in self.relays:
            relay.close()

    def _place_output(self, n: int, f: URLField) -> None:
        check_url(f.url, f.label, self.storage.allow_http, output=True)
        url = parse_s3(f.url, f.label)
        self.storage.check_bucket(url, f.label)
        folder = self.workdir / f"out{n}"
        folder.mkdir()
        if f.field.endswith("_dir"):  # a directory output: one object per file under the prefix
            url = url if url.is_prefix else ObjectURL(url.bucket, url.key + "/")
            self.uploads.append((folder, url, True))
            self.names.add(str(folder), str(url).rstrip("/"))
            self._placed[(f.field, f.index)] = str(folder)
            return
        if url.is_prefix:
            raise UsageError(f"{f.label}: {f.url} is a prefix; name the object (s3://bucket/key)")
        if not self.overwrite and self.storage.head(url) is not None:
            raise UsageError(f"{url} already exists (use --overwrite to replace it)")
        local = folder / _basename(f.url)
        self.uploads.append((local, url, False))
        self.names.add(str(local), str(url))
        self.names.add(str(folder), str(url).rsplit("/", 1)[0])  # a temp sibling a job names in a message
        self._placed[(f.field, f.index)] = str(local)

    def _place_input(self, n: int, f: URLField) -> None:
        scheme = check_url(f.url, f.label, self.storage.allow_http)
        if scheme == "s3":
            self.storage.check_bucket(parse_s3(f.url, f.label), f.label)
        else:
            self.storage.check_https(f.url, f.label)
        suffix = PurePosixPath(urlsplit(f.url).path).suffix.lower()
        prefix = f.url.endswith("/")
        if f.field in self.streamed and not prefix and suffix not in IMAGE_SUFFIXES:
            if scheme == "s3":
                url = parse_s3(f.url, f.label)
                if self.storage.head(url) is None:
                    raise UsageError(f"input not found: {url}")
                seen = self.storage.presign_get(url)
            elif self.storage.guard is not None:  # a stranger's host: ffmpeg reads it through a relay that connects to checked addresses
                from synapse_cli.storage.relay import Relay

                relay = Relay(self.storage.guard, f.url)
                self.relays.append(relay)
                seen = relay.start().url
            else:
                seen = f.url
            self.names.add(seen, redact(f.url))
            self._placed[(f.field, f.index)] = seen
            return
        folder = self.workdir / f"in{n}"
        folder.mkdir()
        if scheme != "s3":
            if prefix:
                raise UsageError(f"{f.label}: an https:// folder cannot be listed; name the files")
            local = folder / _basename(f.url)
            from synapse_cli.netguard import Guard

            # through the guard where the URL is a stranger's (it connects only to the address it checked); on the
            # local backend the same fetch, with its caps and no redirects, admitting every address
            guard = self.storage.guard or Guard(any_address=True, allow_http=self.storage.allow_http, max_bytes=MAX_FETCH_BYTES, max_seconds=None)
            guard.download(f.url, local, what=f"input {f.label}")
        else:
            url = parse_s3(f.url, f.label)
            if url.is_prefix:
                local = folder / (_basename(f.url) if url.key else url.bucket)
                local.mkdir()
                objects = [o for o in self.storage.list(url) if not o["path"].endswith("/")]
                if not objects:
                    raise UsageError(f"input not found: no objects under {url}")
                total = 0
                for o in objects:
                    rel = o["path"][len(url.key):]
                    if any(part in ("", ".", "..") for part in rel.split("/")):
                        continue
                    target = local / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    total += self.storage.download(ObjectURL(url.bucket, o["path"]), target)
                    if total > MAX_FETCH_BYTES:
                        raise UsageError(f"{url} holds more than {MAX_FETCH_BYTES >> 20} MB")
                self.names.add(str(local), str(url).rstrip("/"))
            else:
                local = folder / _basename(f.url)
                self.storage.download(url, local)
                self.names.add(str(local), str(url))
        if not prefix:
            self.names.add(str(local), redact(f.url))
        self._placed[(f.field, f.index)] = str(local)

    def spec(self) -> Any:
        data = dict(self.data)
        for (name, index), value in self._placed.items():
            if index is None:
                data[name] = value
            else:
                data[name] = list(data[name])
                data[name][index] = value
        return spec_from_dict(self.kind, data)

    def is_staged_output(self, path: str) -> bool:
        return any(path == str(local) or path.startswith(str(local) + "/") for local, _, _ in self.uploads)

    def upload(self) -> None:
        """Every output to its URL; a folder's files one object each. Without ``overwrite``, a folder's
        objects are all looked at first: one that exists refuses them all, before any is written."""
        planned: list[tuple[Path, ObjectURL]] = []
        for local, url, is_dir in self.uploads:
            if not is_dir:
                if not local.is_file():
                    raise UsageError(f"the job wrote no {url}")
                planned.append((local, url))
                continue
            files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
            targets = [(f, url.child(f.relative_to(local).as_posix())) for f in files]
            if not self.overwrite:
                taken = [str(u) for _, u in targets if self.storage.head(u) is not None]
                if taken:
                    raise UsageError(f"{taken[0]} already exists (use --overwrite to replace it)" + (f"; and {len(taken) - 1} more" if len(taken) > 1 else ""))
            planned.extend(targets)
        for local, url in planned:
            self.storage.upload(local, url, self.overwrite)


def staged(kind: str, spec: Any, storage: Storage, run: Callable[[Any], Iterator[Event]], workdir: Path | None = None) -> Iterator[Event]:
    """``run``'s events on ``spec`` with its URLs staged (see the module docstring)."""
    if not has_urls(kind, spec):
        yield from run(spec)
        return
    tmp = Path(tempfile.mkdtemp(prefix="synapse-stage-", dir=workdir))
    events: Iterator[Event] | None = None
    names = Names()
    stage: Stage | None = None
    try:
        stage = Stage(kind, spec, storage, tmp)
        names = stage.names
        events = run(stage.spec())
        held: list[Event] = []
        for event in events:
            if isinstance(event, Artifact) and stage.is_staged_output(event.path):
                held.append(names.event(event))
                continue
            if isinstance(event, Finished):
                stage.upload()
                yield from held
                held = []
            yield names.event(event)
    except SynapseError as exc:
        from synapse_cli.storage.relay import refused_message

        refused = refused_message(stage.relays) if stage is not None else None
        if refused is not None:  # the relay met a refused address (a DNS answer that changed): say that, not ffmpeg's 502
            raise UsageError(refused) from None
        raise names.error(exc) from None
    finally:
        if events is not None and hasattr(events, "close"):
            events.close()  # on Ctrl-C or an error: the job's own cleanup (ffmpeg killed, temp files removed)
        if stage is not None:
            stage.close()
        shutil.rmtree(tmp, ignore_errors=True)
