"""Compile results by content hash: normalized input + engine + engine version + synapse version.

One small JSON file per entry under ``<cache_dir>/compile-v1/ab/abcdef….json``, written
atomically, so concurrent runs and interrupted runs never see half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

FORMAT = "compile-v1"


def key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


class Cache:
    def __init__(self, root: Path | None) -> None:
        self.root = root / FORMAT if root else None

    def _path(self, k: str) -> Path:
        assert self.root is not None
        return self.root / k[:2] / f"{k}.json"

    def get(self, k: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        try:
            with open(self._path(k), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def put(self, k: str, value: dict[str, Any]) -> None:
        if self.root is None:
            return
        path = self._path(k)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{k}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs speed


def default_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("synapse"))
