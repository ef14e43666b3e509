"""s3:// fields on remote backends: on Modal (the real client against the fake control plane) the
container reads and writes the objects with a named Secret's credentials and the client moves no
bytes; behind ``synapse serve`` the server does, for allowed buckets only, and user https:// goes
through the URL guard."""

from __future__ import annotations

import importlib
import json
import os
import pickle
from pathlib import Path

import pytest

from tests.conftest import make_clip, probe
from tests.storage_fixtures import ACCESS_KEY, SECRET_KEY, http_files, s3, s3_server, storage_env  # noqa: F401 (fixtures)

SMALL = ("--job", "framing", "--set", "output_width=90", "--set", "output_height=160")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("rclip") / "clip.mp4", size="320x180", seconds=1.0)


@pytest.fixture
def modal_s3(modal_fake, s3, monkeypatch):
    """The app deployed with [modal] secrets = synapse-s3, a Secret holding the storage credentials,
    and a client environment with no storage credentials at all."""
    pytest.importorskip("modal", reason="modal is not installed")
    modal_fake.set_secret("synapse-s3", storage_env(s3.server))
    for name in storage_env(s3.server):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNAPSE_MODAL_SECRETS", "synapse-s3")
    from modal_functions import app as modal_app

    importlib.reload(modal_app).app.deploy(name="synapse")
    return modal_fake


def test_export_on_modal_with_s3_in_and_out_moves_no_bytes_through_the_client(cli, modal_s3, s3, clip, tmp_path, db):
    src = s3.put("m/clip.mp4", clip)
    run = cli("export", src, "-o", s3.url("m/reel.mp4"), *SMALL, "--use-modal", "--json")
    assert run.exit_code == 0, run.stderr
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # the client had no credentials: the container used the Secret's
    events = run.events()
    assert events[-1]["result"]["output"] == s3.url("m/reel.mp4")
    assert [e["path"] for e in events if e["type"] == "artifact"] == [s3.url("m/reel.mp4")]
    call = modal_s3.function_calls[-1]
    assert call.function_name == "export"
    spec = call.args[0]
    assert (spec["input"], spec["output"]) == (src, s3.url("m/reel.mp4"))
    assert len(pickle.dumps(spec)) < 2048  # the call carries the spec alone
    files = modal_s3.volume_files("synapse-data")
    assert not [p for p in files if p.startswith(("inputs/", "outputs/"))], files  # nothing went through the Volume
    assert not any(c.startswith("VolumePutFiles") for c in modal_s3.calls)
    got = tmp_path / "got.mp4"
    got.write_bytes(s3.get("m/reel.mp4"))
    assert (probe(got).width, probe(got).height) == (90, 160)
    assert SECRET_KEY not in run.stdout + run.stderr and "X-Amz" not in run.stdout + run.stderr


def test_modal_container_refuses_a_loopback_https_input(cli, modal_s3, http_files, db):
    base, root = http_files
    (root / "x.json").write_text("{}")
    run = cli("compile", f"{base}/x.json", "-o", "out", "--engine", "llguidance", "--use-modal")
    assert run.exit_code == 2, run.stderr
    assert "refused" in run.stderr and "loopback" in run.stderr
