"""The `modal_fake` pytest fixture: the real modal client talking to `FakeModal` on loopback.

`tests/conftest.py` loads this module as a plugin, so any test can ask for `modal_fake`.

What the fixture does, per test (a fresh server costs a few ms):
- starts `FakeModal` on 127.0.0.1 (free ports: gRPC at `handle.url`, blobs at `handle.blob_url`);
- sets `MODAL_SERVER_URL=handle.url`, `MODAL_TOKEN_ID=ak-fake`, `MODAL_TOKEN_SECRET=as-fake`
  and removes `MODAL_PROFILE`, `MODAL_ENVIRONMENT`, `MODAL_IS_REMOTE`, `MODAL_OAUTH_REFRESH_TOKEN`;
- drops modal's cached env client and Environment cache before and after the test;
- after the test, unhydrates every modal object still holding a fake id (module-level
  `Volume.from_name(...)`, functions of a deployed app), so the next test starts clean.

Bodies run in this process, one daemon thread per attempt. While a body runs, the
process environment also holds its Secrets' values and, for a function with Volumes,
`SYNAPSE_VOLUME_ROOT` (the real directory of its first Volume; mount `/data` maps to
`<tmp>/volumes/<volume name>/`) and `MODAL_FAKE_MOUNTS` (JSON `{mount path: directory}`).
These are process-wide, so concurrent bodies with different Volumes see the last one set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .server import FakeModal

# modal (and so .server) is imported only when a test asks for the fixture: `import modal`
# costs ~0.5 s, and this plugin is loaded for every test session.

FAKE_TOKEN_ID = "ak-fake"
FAKE_TOKEN_SECRET = "as-fake"


def unhydrate_fake_objects() -> int:
    """Unhydrate every modal object still holding an id issued by a fake server.

    Module-level handles stay hydrated after a test and the next test's server would not
    know their ids. Unhydrated, they hydrate again lazily (or on deploy) against the new one.
    """
    import gc
    import warnings

    from modal._object import _Object

    from .server import FAKE_ID_MARKER

    n = 0
    with warnings.catch_warnings():  # isinstance() on some objects (torch's deprecated aliases) warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, _Object)]
    for obj in objects:
        if FAKE_ID_MARKER in (getattr(obj, "_object_id", None) or ""):
            obj._unhydrate()
            n += 1
    return n


def reset_modal_client() -> None:
    """Drop modal's process-wide caches so the next call reads MODAL_* from the environment.

    `_Client.from_env()` keeps one client (bound to the first server URL it saw), and
    `ENVIRONMENT_CACHE` keeps hydrated Environment objects; both would outlive a fake server.
    `modal.config.config` needs nothing: it reads MODAL_* env vars on every lookup.
    """
    import modal
    from modal._environments import ENVIRONMENT_CACHE
    from modal.client import _Client

    if _Client._client_from_env is not None:
        try:
            modal.Client.from_env().close()
        except Exception:  # a broken client is dropped all the same
            pass
    _Client._client_from_env = None
    ENVIRONMENT_CACHE.clear()


@pytest.fixture
def modal_fake(tmp_path, monkeypatch) -> Iterator[FakeModal]:
    """A fresh fake Modal control plane for one test; yields its `FakeModal` handle."""
    pytest.importorskip("modal", reason="modal is not installed (pip install synapse-cli[modal])")
    from .server import FakeModal

    fake = FakeModal(tmp_path / "modal-fake").start()
    monkeypatch.setenv("MODAL_SERVER_URL", fake.url)
    monkeypatch.setenv("MODAL_TOKEN_ID", FAKE_TOKEN_ID)
    monkeypatch.setenv("MODAL_TOKEN_SECRET", FAKE_TOKEN_SECRET)
    for var in ("MODAL_PROFILE", "MODAL_ENVIRONMENT", "MODAL_IS_REMOTE", "MODAL_OAUTH_REFRESH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    reset_modal_client()
    try:
        yield fake
    finally:
        reset_modal_client()
        unhydrate_fake_objects()
        fake.stop()
