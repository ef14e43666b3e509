"""A toy Modal app deployed against the fake control plane by `tests/test_modal_fake.py`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import modal

APP_NAME = "synapse-fake-toy"
VOLUME_NAME = "toy-volume"
DICT_NAME = "toy-dict"

# include_source=False: by default each of the 13 functions would mount the whole `tests` package (its module's
# top-level package), and modal walks and resolves every file of it twice per function on each deploy (about
# 0.2 CPU s a deploy, and this file deploys once per test). The image below still ships a Python package, as
# synapse's app does, so a deploy still goes through the fake's mount RPCs.
image = modal.Image.debian_slim().add_local_python_source("tests.modal_fake")
app = modal.App(APP_NAME, image=image, include_source=False)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)


class ToyError(Exception):
    """Raised by `fail`; must come back to the caller as itself."""


def _volume_root() -> Path:
    # The fake points SYNAPSE_VOLUME_ROOT at the Volume's directory. No "/data" fallback here:
    # a test must never write to the real mount path.
    return Path(os.environ["SYNAPSE_VOLUME_ROOT"])


@app.function(timeout=60)
def add(a: int, b: int = 0) -> int:
    return a + b


@app.function(secrets=[modal.Secret.from_name("toy-secret")])
def read_env(name: str) -> str | None:
    return os.environ.get(name)


@app.function()
def count(n: int, delay: float = 0.0):
    for i in range(n):
        if i:
            time.sleep(delay)
        yield {"i": i, "t": time.time()}


@app.function()
def count_then_fail(n: int):
    yield from range(n)
    raise ToyError(f"failed after {n} items")


@app.function()
def fail(message: str) -> None:
    raise ToyError(message)


@app.function()
def size_of(payload: bytes) -> int:
    return len(payload)


@app.function()
def make_bytes(n: int) -> bytes:
    return b"\x07" * n


@app.function(retries=modal.Retries(max_retries=2, initial_delay=0.0, backoff_coefficient=1.0))
def flaky(key: str) -> str:
    """Fails on its first run per key (tracked in a Dict), then succeeds."""
    runs = modal.Dict.from_name(DICT_NAME, create_if_missing=True)
    n = runs.get(key, 0) + 1
    runs[key] = n
    if n == 1:
        raise ConnectionError(f"transient failure #{n}")
    return f"ok after {n} runs"


@app.function(timeout=1)
def sleepy(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return "woke"


@app.function(timeout=120)
def meet(group: str, name: str, party: int, patience_s: float = 30.0) -> list[str]:
    """Arrives at a rendezvous in the Dict, then waits (up to ``patience_s``) for ``party`` bodies of ``group``.

    Returns the names that had arrived: only bodies running at the same time all see the whole party.
    """
    d = modal.Dict.from_name(DICT_NAME, create_if_missing=True)
    d[f"{group}:{name}"] = "arrived"
    deadline = time.monotonic() + patience_s
    while True:
        here = sorted(key.split(":", 1)[1] for key in d.keys() if key.startswith(f"{group}:"))
        if len(here) >= party or time.monotonic() > deadline:
            return here
        time.sleep(0.05)


@app.function()
def wait_for_cancel(marker: str) -> str:
    """Loops until told to stop; records how it ended in the Dict."""
    d = modal.Dict.from_name(DICT_NAME, create_if_missing=True)
    d[marker] = "started"
    try:
        for _ in range(1000):
            time.sleep(0.01)
    except BaseException as exc:
        d[marker] = f"stopped: {type(exc).__name__}"
        raise
    d[marker] = "finished"
    return "finished"


@app.function(volumes={"/data": volume})
def write_report(name: str, text: str) -> list[str]:
    root = _volume_root()
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports" / name).write_text(text)
    d = modal.Dict.from_name(DICT_NAME, create_if_missing=True)
    d.put(name, len(text))
    return sorted(p.name for p in (root / "reports").iterdir())
