"""The `modal_fake` pytest fixture: the real modal client talking to `FakeModal` on loopback.

`tests/conftest.py` loads this module as a plugin, so any test can ask for `modal_fake`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server import FAKE_ID_MARKER, FakeModal

FAKE_TOKEN_ID = "ak-fake"
FAKE_TOKEN_SECRET = "as-fake"


def unhydrate_fake_objects() -> int:
    """Unhydrate every modal object still holding an id issued by a fake server.

    Module-level handles (`modal.Volume.from_name(...)` in an app module, functions of a
    deployed app) stay hydrated after a test; the next test's fresh server would not know
    their ids. Unhydrated, they hydrate again lazily (or on deploy) against the new server.
    """
    import gc

    from modal._object import _Object

    n = 0
    for obj in gc.get_objects():
        if isinstance(obj, _Object) and FAKE_ID_MARKER in (getattr(obj, "_object_id", None) or ""):
            obj._unhydrate()
            n += 1
    return n


def reset_modal_client() -> None:
    """Drop modal's process-wide caches so the next call reads MODAL_* from the environment.

    `_Client.from_env()` keeps one client (bound to the first server URL it saw), and
    `ENVIRONMENT_CACHE` keeps hydrated Environment objects; both would outlive a fake server.
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
    """A fresh fake Modal control plane per test (starts in a few ms)."""
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
