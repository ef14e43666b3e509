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

`modal_deployment` (one per test module) is for the many tests that only need an app deployed:
deploying walks and hashes the app's source for every image (about a CPU second for synapse's
app), so the module's tests share one fake with the app deployed once, and each test gets it back
as the deploy left it (`FakeModal.reset`). See `Deployment.use`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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


def _point_at(fake: FakeModal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_SERVER_URL", fake.url)
    monkeypatch.setenv("MODAL_TOKEN_ID", FAKE_TOKEN_ID)
    monkeypatch.setenv("MODAL_TOKEN_SECRET", FAKE_TOKEN_SECRET)
    for var in ("MODAL_PROFILE", "MODAL_ENVIRONMENT", "MODAL_IS_REMOTE", "MODAL_OAUTH_REFRESH_TOKEN"):
        monkeypatch.delenv(var, raising=False)


class Deployment:
    """One fake control plane shared by a test module, with an app deployed on it once.

    Between its tests the modal client that deployed is put aside (no other test reaches the fake
    through modal's cached client) and the fake is reset to what the deploy left. The app is
    deployed again when another app is asked for (a module reloaded), or when something in between (a test with its own
    `modal_fake`) dropped the client or unhydrated the app's handles.
    """

    def __init__(self, fake: FakeModal) -> None:
        self.fake = fake
        self.client: Any = None
        self.handle: Any = None  # one of the deployed app's functions: unhydrated means deploy again

    @contextmanager
    def use(self, monkeypatch: pytest.MonkeyPatch, current: Callable[[], Any], deploy: Callable[[], Any]) -> Iterator[FakeModal]:
        """The fake, with an app deployed. ``current()`` names the app by one of its functions' handles
        (a module reloaded makes new ones); ``deploy()`` deploys the app and returns that handle, and runs
        only when the handle asked for is not the one deployed here, or was unhydrated since."""
        from modal.client import _Client

        _point_at(self.fake, monkeypatch)
        if self.handle is not None and current() is self.handle and self.handle._is_hydrated:
            _Client._client_from_env = self.client
        else:
            if self.client is not None and _Client._client_from_env is None:
                _Client._client_from_env = self.client  # closed by the reset below
            self.handle = None
            reset_modal_client()
            unhydrate_fake_objects()
            handle = deploy()
            self.client, self.handle = _Client._client_from_env, handle
            self.fake.checkpoint()
        try:
            yield self.fake
        finally:
            if _Client._client_from_env is self.client:
                _Client._client_from_env = None  # put aside, not closed: the app's handles hold it
            self.fake.reset()

    def close(self) -> None:
        from modal.client import _Client

        if _Client._client_from_env is None:
            _Client._client_from_env = self.client
        reset_modal_client()
        unhydrate_fake_objects()
        self.fake.stop()


def synapse_deployed(deployment: Deployment, monkeypatch: pytest.MonkeyPatch, reload: bool = False):
    """``deployment.use`` for synapse's app (`synapse_cli.modal_app`), deployed as "synapse".
    ``reload``: import the module afresh before its deploy (its settings are read at import)."""
    import importlib
    import sys

    def current() -> Any:
        module = sys.modules.get("synapse_cli.modal_app")
        return module.export if module is not None else None

    def deploy() -> Any:
        from synapse_cli import modal_app

        if reload:
            importlib.reload(modal_app)
        modal_app.app.deploy(name="synapse")
        return modal_app.export

    return deployment.use(monkeypatch, current, deploy)


@pytest.fixture(scope="module")
def modal_deployment(tmp_path_factory) -> Iterator[Deployment]:
    """A fake control plane for this test module's deployed app: see `Deployment.use`."""
    from tests.conftest import require

    require("modal", reason="modal is not installed (pip install synapse-cli[modal])")
    from .server import FakeModal

    deployment = Deployment(FakeModal(tmp_path_factory.mktemp("modal-fake")).start())
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def modal_fake(tmp_path, monkeypatch) -> Iterator[FakeModal]:
    """A fresh fake Modal control plane for one test; yields its `FakeModal` handle."""
    from tests.conftest import require

    require("modal", reason="modal is not installed (pip install synapse-cli[modal])")
    from .server import FakeModal

    fake = FakeModal(tmp_path / "modal-fake").start()
    _point_at(fake, monkeypatch)
    reset_modal_client()
    try:
        yield fake
    finally:
        reset_modal_client()
        unhydrate_fake_objects()
        fake.stop()
