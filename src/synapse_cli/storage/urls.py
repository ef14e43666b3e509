"""The URL model: which spec values are URLs, what a bucket and key are, and how a URL is printed.

- ``s3://bucket/key``: an object (read and written). A key ending in ``/`` (or empty) is a
  prefix, for directory-valued fields (compile's ``inputs`` folders and ``output_dir``).
- ``https://host/path``: read only. ``http://`` only where ``[storage] allow_http`` is on.
- Anything else is a local path, as before.

``redact`` is applied wherever a URL is printed or stored: user info and query strings (a
presigned URL's signature, an https URL's token) never reach a log, an event or the job store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from synapse_cli.errors import UsageError
from synapse_cli.jsonwalk import map_strings

SCHEMES = ("s3", "https", "http")
_URL = re.compile(r"^(s3|https?)://", re.IGNORECASE)
# a URL inside free text (an ffmpeg message, an exception): up to the next blank or quote
_IN_TEXT = re.compile(r"(?i)\b(?:s3|https?)://[^\s'\"<>]+")


def is_url(value: object) -> bool:
    """Is this spec value a URL (``s3://``, ``https://``, ``http://``), rather than a local path?"""
    return isinstance(value, str) and _URL.match(value) is not None


@dataclass(frozen=True)
class ObjectURL:
    """``s3://bucket/key`` split: ``key`` has no leading ``/``; a prefix ends in ``/`` (or is empty)."""

    bucket: str
    key: str

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def child(self, name: str) -> "ObjectURL":
        return ObjectURL(self.bucket, (self.key if self.is_prefix else self.key + "/") + name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")


def parse_s3(url: str, field: str = "input") -> ObjectURL:
    """``s3://bucket/key`` -> ObjectURL; a malformed one is a UsageError naming the field."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise UsageError(f"{field}: not an s3:// URL: {redact(url)}")
    bucket = parts.netloc
    if parts.query or parts.fragment or "@" in bucket or not _BUCKET.match(bucket or ""):
        raise UsageError(f"{field}: bad s3 URL {redact(url)} (expected s3://bucket/key)")
    key = parts.path.lstrip("/")
    if any(seg in (".", "..") for seg in key.split("/")):
        raise UsageError(f"{field}: bad s3 key in {redact(url)} ('.' and '..' are not keys)")
    return ObjectURL(bucket, key)


def check_url(url: str, field: str, allow_http: bool, output: bool = False) -> str:
    """The scheme rules: s3 reads and writes; https reads; http reads only with ``allow_http``.

    Returns the lower-cased scheme; anything else is a UsageError naming the field."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "s3":
        parse_s3(url, field)
        return scheme
    if output:
        raise UsageError(f"{field}: {scheme}:// URLs are read-only; write outputs to s3://bucket/key or a local path")
    if scheme == "http" and not allow_http:
        raise UsageError(f"{field}: plain http:// is refused ({redact(url)}); use https://, or set [storage] allow_http = true")
    if not urlsplit(url).hostname:
        raise UsageError(f"{field}: URL has no host: {redact(url)}")
    return scheme


def redact(url: str) -> str:
    """``url`` without user info and without its query string's values (``?…`` marks that one was there).

    A presigned URL's signature and credential scope live in its query; a URL's user info is a
    password. Neither is ever printed or stored."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.scheme.lower() not in SCHEMES:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (error messages, ffmpeg's stderr, log lines)."""
    if "://" not in text:
        return text
    return _IN_TEXT.sub(lambda m: redact(m.group(0)), text)


def redact_values(value: object) -> object:
    """``redact_text`` on every string of a JSON-like value (a spec, an event, a result) before it is stored."""
    return map_strings(value, redact_text)  # (redact_text returns a string without "://" as it is)


@dataclass(frozen=True)
class URLField:
    field: str
    index: int | None
    url: str
    output: bool

    @property
    def label(self) -> str:
        return self.field if self.index is None else f"{self.field}[{self.index}]"


def url_fields(kind: str, data: dict[str, Any]) -> list[URLField]:
    """Every URL among the spec's ``INPUTS`` and ``OUTPUTS`` (``jobs.path_values`` is the rule for a value)."""
    from synapse_cli.jobs import get_kind, path_values

    record = get_kind(kind)
    found = []
    for names, output in ((record.inputs, False), (record.outputs, True)):
        for name in names:
            for index, value in path_values(data.get(name), "output" if output else "input", name):
                if is_url(value):
                    found.append(URLField(name, index, value, output))
    return found


def has_urls(kind: str, spec: Any) -> bool:
    """Does the spec name an ``s3://`` or ``https://`` input or output? (Cheap: no storage client is loaded.)"""
    from dataclasses import asdict

    return bool(url_fields(kind, asdict(spec)))
