"""s3:// and https:// inputs and outputs on the local backend, against a real S3-protocol server
(moto on loopback) and a plain HTTP server: real ffmpeg, the real CLI, real sockets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import make_clip, probe
from tests.storage_fixtures import ACCESS_KEY, SECRET_KEY, http_files, s3, s3_server  # noqa: F401 (fixtures)

SMALL = ("--job", "framing", "--set", "output_width=90", "--set", "output_height=160")


def frames_digest(path: Path) -> str:
    """The decoded video frames' sha256 (x264 with the same input and settings gives the same frames)."""
    import av

    h = hashlib.sha256()
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            h.update(frame.to_ndarray(format="gray").tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("s3clip") / "clip.mp4", size="320x180", seconds=1.0)


def test_export_s3_in_and_out_equals_the_local_job(cli, s3, clip, tmp_path, db):
    src = s3.put("media/clip.mp4", clip)
    run = cli("export", src, "-o", s3.url("out/reel.mp4"), *SMALL, "--json")
    assert run.exit_code == 0, run.stderr
    events = run.events()
    assert events[-1]["type"] == "finished"
    assert events[-1]["result"]["output"] == s3.url("out/reel.mp4")
    assert events[-1]["result"]["input"] == src
    artifacts = [e for e in events if e["type"] == "artifact"]
    assert [a["path"] for a in artifacts] == [s3.url("out/reel.mp4")]
    got = tmp_path / "got.mp4"
    got.write_bytes(s3.get("out/reel.mp4"))
    local = cli("export", clip, "-o", tmp_path / "local.mp4", *SMALL, "--json", "--no-cache")
    assert local.exit_code == 0, local.stderr
    assert frames_digest(got) == frames_digest(tmp_path / "local.mp4")
    assert (probe(got).width, probe(got).height) == (90, 160)
    assert "X-Amz" not in run.stdout + run.stderr and SECRET_KEY not in run.stdout + run.stderr
