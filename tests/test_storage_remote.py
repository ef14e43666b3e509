"""s3:// fields on remote backends: on Modal (the real client against the fake control plane) the
container reads and writes the objects with a named Secret's credentials and the client moves no
bytes; behind ``synapse serve`` the server does, for allowed buckets only, and user https:// goes
through the URL guard."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from tests.conftest import make_clip, probe, require
from tests.modal_fake.fixtures import synapse_deployed
from tests.storage_fixtures import SECRET_KEY, storage_env

SMALL = ("--job", "framing", "--set", "output_width=90", "--set", "output_height=160")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("rclip") / "clip.mp4", size="320x180", seconds=1.0)


@pytest.fixture
def modal_s3(modal_deployment, s3, monkeypatch):
    """The app deployed with [modal] secrets = synapse-s3, a Secret holding the storage credentials,
    and a client environment with no storage credentials at all."""
    modal_deployment.fake.set_secret("synapse-s3", storage_env(s3.server))
    for name in storage_env(s3.server):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SYNAPSE_MODAL_SECRETS", "synapse-s3")
    with synapse_deployed(modal_deployment, monkeypatch, reload=True) as fake:
        yield fake


def test_export_on_modal_with_s3_in_and_out_moves_no_bytes_through_the_client(cli, modal_s3, s3, clip, tmp_path, db):
    src = s3.put("m/clip.mp4", clip)
    run = cli("export", src, "-o", s3.url("m/reel.mp4"), *SMALL, "--use-modal", "--json")
    assert run.exit_code == 0, run.stderr
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # the client had no credentials: the container used the Secret's
    events = run.events()
    assert events[-1]["result"]["output"] == s3.url("m/reel.mp4")
    assert [e["path"] for e in events if e["type"] == "artifact"] == [s3.url("m/reel.mp4")]
    (call,) = modal_s3.function_calls
    assert call.function_name == "export_sharded"  # --shards auto: split in a container by size; a 1 s clip runs there whole
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


def test_sharded_infer_on_modal_with_s3_in_and_out_runs_its_shards_on_the_gpu_function(cli, modal_s3, s3, pan, tmp_path, db):
    """infer needs a GPU: the CPU container that splits and merges never runs a shard itself."""
    src = s3.put("ms/pan.mp4", pan)
    run = cli("infer", src, "--task", "detect", "--imgsz", "160", "-o", s3.url("ms/pan.json"), "--use-modal", "--shards", "2", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    names = [c.function_name for c in modal_s3.function_calls]
    assert names.count("infer_sharded") == 1 and names.count("infer") == 2, names
    assert {c.args[0]["source"] for c in modal_s3.function_calls if c.function_name == "infer"} == {src}
    remote = json.loads(s3.get("ms/pan.json"))
    assert remote["source"] == src and remote["frames"] == _local_detect(cli, pan, tmp_path)["frames"]
    assert [s["index"] for s in run.events()[-1]["result"]["shards"]] == [0, 1]


def test_an_existing_key_on_modal_is_refused_in_the_container_before_any_shard_runs(cli, modal_s3, s3, keyed, db):
    src = s3.put("ow/keyed.mp4", keyed)
    s3.put("ow/reel.mp4", b"already here")
    run = cli("export", src, "-o", s3.url("ow/reel.mp4"), *SMALL, "--use-modal", "--shards", "4")
    assert run.exit_code == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"UsageError: {s3.url('ow/reel.mp4')} already exists (use --overwrite to replace it)"
    assert s3.get("ow/reel.mp4") == b"already here"
    assert [c.function_name for c in modal_s3.function_calls] == ["export_sharded"]  # refused there: no shard was started
    assert not s3.served("ow/keyed.mp4")  # nor was the input read


# -- behind synapse serve -------------------------------------------------------------------------


@pytest.fixture
def served(s3, tmp_path):
    """synapse serve (uvicorn in a thread) allowed this test's bucket; the server has the credentials."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from synapse_cli.config import resolve
    from tests.http_fixtures import serve_app

    settings = resolve({}, {**os.environ, "SYNAPSE_SERVE_ALLOW_BUCKETS": s3.bucket, "SYNAPSE_STORAGE_ALLOW_HTTP": "0"}, {})
    with serve_app(tmp_path / "srv", settings=settings) as endpoint:
        yield endpoint


def _post(endpoint, kind: str, spec: dict) -> tuple[int, bytes, int]:
    """POST a JSON spec; (status, the whole response, the request's body size)."""
    import httpx

    body = json.dumps(spec).encode()
    with httpx.Client(timeout=120) as client:
        response = client.post(f"{endpoint.url}/v1/jobs/{kind}", content=body,
                               headers={"Authorization": f"Bearer {endpoint.key}", "Content-Type": "application/json"})  # fmt: skip
        return response.status_code, response.content, len(body)


def test_serve_json_spec_with_s3_in_and_out_sends_and_receives_no_media(served, s3, clip, tmp_path):
    src = s3.put("srv/clip.mp4", clip)
    spec = {"input": src, "output": s3.url("srv/reel.mp4"), "job": "framing", "params": {"output_width": 90, "output_height": 160}}
    status, content, sent = _post(served, "export", spec)
    assert status == 200, content[:500]
    events = [json.loads(line) for line in content.splitlines() if line.strip()]
    assert events[-1]["type"] == "finished", events[-3:]
    assert [e["path"] for e in events if e["type"] == "artifact"] == [s3.url("srv/reel.mp4")]
    size = clip.stat().st_size
    assert sent < 1024 and len(content) < size / 4  # the spec went, events came back; no media either way
    assert not [p for d in served.job_dirs() for p in d.rglob("*") if p.is_file() and p.suffix == ".mp4"]  # nothing staged in the job folder
    got = tmp_path / "got.mp4"
    got.write_bytes(s3.get("srv/reel.mp4"))
    assert (probe(got).width, probe(got).height) == (90, 160)
    assert "X-Amz" not in content.decode() and SECRET_KEY not in content.decode()


def test_serve_cli_endpoint_with_s3_fields(cli, served, s3, clip, db):
    src = s3.put("c/clip.mp4", clip)
    run = cli("export", src, "-o", s3.url("c/reel.mp4"), *SMALL, "--endpoint", served.url, "--json", env={"SYNAPSE_API_KEY": served.key})
    assert run.exit_code == 0, run.stderr
    assert run.events()[-1]["result"]["output"] == s3.url("c/reel.mp4")
    assert s3.get("c/reel.mp4")[4:8] == b"ftyp"


def test_serve_refuses_a_bucket_not_allowed_403(served, s3, s3_server, clip):
    other = s3_server.make_bucket()
    status, content, _ = _post(served, "export", {"input": f"s3://{other}/x.mp4", "output": s3.url("o.mp4")})
    assert status == 403 and b"input" in content and other.encode() in content and b"allow_buckets" in content
    status, content, _ = _post(served, "export", {"input": s3.url("x.mp4"), "output": f"s3://{other}/o.mp4"})
    assert status == 403 and b"output" in content


@pytest.mark.parametrize("url, why", [
    ("https://127.0.0.1/clip.mp4", "loopback"),
    ("https://localhost/clip.mp4", "loopback"),
    ("https://169.254.169.254/latest/meta-data/", "link-local"),
    ("https://10.1.2.3/clip.mp4", "private"),
    ("https://[::ffff:127.0.0.1]/clip.mp4", ""),
    ("http://example.com/clip.mp4", "http"),
])  # fmt: skip
def test_serve_refuses_ssrf_inputs_422_naming_the_field(served, s3, url, why):
    status, content, _ = _post(served, "export", {"input": url, "output": s3.url("o.mp4")})
    assert status == 422, content
    message = json.loads(content)["message"]
    assert "input" in message and why in message, message
    assert s3.get("o.mp4") is None


SCHEMAS = Path(__file__).parent / "data" / "compile"


def _compile_local(cli, tmp_path) -> Path:
    folder = tmp_path / "schemas"
    folder.mkdir()
    for name in ("line.json", "order.json"):
        (folder / name).write_bytes((SCHEMAS / name).read_bytes())
    local = cli("compile", folder, "-o", tmp_path / "local", "--engine", "llguidance,outlines", "--no-cache", "--no-modal")
    assert local.exit_code == 0, local.stderr
    return tmp_path / "local"


def _same_artefacts(s3, prefix: str, local: Path) -> None:
    made = sorted(p.name for p in local.iterdir())
    assert s3.keys(prefix) == [prefix + n for n in made]
    for name in made:
        if name.endswith((".lark", ".regex", ".schema.json")):
            assert s3.get(prefix + name) == (local / name).read_bytes(), name


def test_compile_on_modal_with_an_s3_prefix_in_and_out(cli, modal_s3, s3, tmp_path, db):
    for name in ("line.json", "order.json"):
        s3.put(f"mc/schemas/{name}", SCHEMAS / name)
    run = cli("compile", s3.url("mc/schemas/"), "-o", s3.url("mc/out/"), "--engine", "llguidance,outlines", "--use-modal", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    assert modal_s3.function_calls[-1].args[0]["inputs"] == [s3.url("mc/schemas/")]
    assert not [p for p in modal_s3.volume_files("synapse-data") if p.startswith(("inputs/", "outputs/"))]
    _same_artefacts(s3, "mc/out/", _compile_local(cli, tmp_path))


def test_sharded_compile_on_modal_with_an_s3_prefix_in_and_out(cli, modal_s3, s3, tmp_path, db):
    """The container fetches the schemas under the prefix, splits them into two shards (each its own call
    of compile, its schemas put on the Volume by the container), merges the artefacts and writes the prefix."""
    for name in ("line.json", "order.json"):
        s3.put(f"mk/schemas/{name}", SCHEMAS / name)
    run = cli("compile", s3.url("mk/schemas/"), "-o", s3.url("mk/out/"), "--engine", "llguidance,outlines", "--use-modal", "--shards", "2",
              "--json", "--no-cache")  # fmt: skip
    assert run.exit_code == 0, run.stderr
    names = [c.function_name for c in modal_s3.function_calls]
    assert names.count("compile_sharded") == 1 and names.count("compile") == 2, names
    assert [s["index"] for s in run.events()[-1]["result"]["shards"]] == [0, 1]
    assert not [p for p in modal_s3.volume_files("synapse-data") if p.startswith("outputs/")]
    _same_artefacts(s3, "mk/out/", _compile_local(cli, tmp_path))


def test_compile_behind_serve_with_an_s3_prefix_in_and_out(served, s3, cli, tmp_path):
    for name in ("line.json", "order.json"):
        s3.put(f"sc/schemas/{name}", SCHEMAS / name)
    status, content, sent = _post(served, "compile", {"inputs": [s3.url("sc/schemas/")], "output_dir": s3.url("sc/out/"), "engines": ["llguidance", "outlines"], "use_cache": False})
    assert status == 200, content[:300]
    events = [json.loads(line) for line in content.splitlines() if line.strip()]
    assert events[-1]["type"] == "finished", events[-2:]
    assert sent < 1024
    _same_artefacts(s3, "sc/out/", _compile_local(cli, tmp_path))


def test_detached_job_behind_serve_writes_its_s3_output(served, s3, clip):
    import time

    import httpx

    src = s3.put("dt/clip.mp4", clip)
    spec = {"input": src, "output": s3.url("dt/reel.mp4"), "job": "framing", "params": {"output_width": 90, "output_height": 160}}
    headers = {"Authorization": f"Bearer {served.key}"}
    r = httpx.post(f"{served.url}/v1/jobs/export?detach=true", json=spec, headers=headers)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    deadline = time.monotonic() + 120
    while (rec := httpx.get(f"{served.url}/v1/jobs/{job}", headers=headers).json())["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rec["status"] == "completed", rec
    assert s3.get("dt/reel.mp4")[4:8] == b"ftyp"
    assert "X-Amz" not in json.dumps(rec)


@pytest.fixture(scope="module")
def pan(tmp_path_factory):
    require("ultralytics", reason="the infer extra is not installed")
    from tests.test_infer_batch import _pan

    return _pan(tmp_path_factory.mktemp("rpan") / "pan.mp4", 6)


def _local_detect(cli, pan, tmp_path) -> dict:
    local = cli("infer", pan, "--task", "detect", "--imgsz", "160", "-o", tmp_path / "l.json", "--no-cache", "--no-modal")
    assert local.exit_code == 0, local.stderr
    return json.loads((tmp_path / "l.json").read_text())


def test_infer_on_modal_with_s3_in_and_out(cli, modal_s3, s3, pan, tmp_path, db):
    src = s3.put("mi/pan.mp4", pan)
    run = cli("infer", src, "--task", "detect", "--imgsz", "160", "-o", s3.url("mi/pan.json"), "--use-modal", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    assert modal_s3.function_calls[-1].args[0]["source"] == src
    assert not [p for p in modal_s3.volume_files("synapse-data") if p.startswith(("inputs/", "outputs/"))]
    remote = json.loads(s3.get("mi/pan.json"))
    assert remote["source"] == src and remote["frames"] == _local_detect(cli, pan, tmp_path)["frames"]


def test_infer_behind_serve_with_s3_in_and_out(served, s3, cli, pan, tmp_path):
    src = s3.put("si/pan.mp4", pan)
    status, content, sent = _post(served, "infer", {"source": src, "output": s3.url("si/pan.json"), "task": "detect", "imgsz": 160})
    assert status == 200, content[:300]
    events = [json.loads(line) for line in content.splitlines() if line.strip()]
    assert events[-1]["type"] == "finished", events[-2:]
    assert sent < 1024 and len(content) < pan.stat().st_size
    remote = json.loads(s3.get("si/pan.json"))
    assert remote["frames"] == _local_detect(cli, pan, tmp_path)["frames"]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Path:
    """8 s of dense noise (megabytes per second, so four windows of it dwarf socket buffers and probes),
    a keyframe every second (a shard's seek lands near its window), moov first (as test_storage's big_silent)."""
    import subprocess

    from tests.conftest import ffmpeg_exe

    out = tmp_path_factory.mktemp("keyed") / "keyed.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "nullsrc=size=640x360:rate=25:duration=8,geq=random(1)*255:128:128",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(out)], check=True)  # fmt: skip
    return out


def test_sharded_export_from_s3_on_modal_is_split_and_merged_in_a_container(cli, modal_s3, s3, keyed, tmp_path, db):
    """The client has no credentials: one call of export_sharded splits the job in its container, each
    shard (a call of export) reads its own window of the object by Range, the merge writes the one output."""
    from tests.test_shards import assert_same_video

    src = s3.put("sh/keyed.mp4", keyed)
    run = cli("export", src, "-o", s3.url("sh/reel.mp4"), *SMALL, "--use-modal", "--shards", "4", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    names = [c.function_name for c in modal_s3.function_calls]
    assert names.count("export_sharded") == 1 and names.count("export") == 4, names
    sharded = next(c for c in modal_s3.function_calls if c.function_name == "export_sharded")
    assert (sharded.args[0]["input"], sharded.args[0]["output"]) == (src, s3.url("sh/reel.mp4"))
    assert len(pickle.dumps(sharded.args)) < 4096  # the spec and the [shards] settings, nothing else
    shard_inputs = {c.args[0]["input"] for c in modal_s3.function_calls if c.function_name == "export"}
    assert shard_inputs == {src}  # each shard reads the user's URL with its own credentials: nothing presigned travels
    assert not any(c.startswith("VolumePutFiles") for c in modal_s3.calls)  # nothing uploaded, by the client or the container
    assert not [p for p in modal_s3.volume_files("synapse-data") if p.startswith(("inputs/", "outputs/"))]  # the pieces are gone
    events = run.events()
    result = events[-1]["result"]
    assert result["output"] == s3.url("sh/reel.mp4") and [s["index"] for s in result["shards"]] == [0, 1, 2, 3]
    assert result["modal"]["calls"] == 4
    size = keyed.stat().st_size
    gets = s3.served("sh/keyed.mp4")
    # a shard reads its 2 s window, a second of pre-roll before it and a second after: never the whole object
    assert max(r.bytes for r in gets) < 0.65 * size, [(r.range, r.bytes) for r in gets]
    assert sum(r.bytes for r in gets) < 2.5 * size  # four shards reading it all would be 4x
    assert sum(1 for r in gets if r.range and not r.range.startswith("bytes=0-")) >= 3  # shards 2-4 seek by Range
    here = tmp_path / "here.mp4"  # the same job on local files, split the same way on this machine
    assert cli("export", keyed, "-o", here, *SMALL, "--no-modal", "--shards", "4", "--no-cache").exit_code == 0
    got = tmp_path / "got.mp4"
    got.write_bytes(s3.get("sh/reel.mp4"))
    assert_same_video(got, here)
    assert SECRET_KEY not in run.stdout + run.stderr and "X-Amz" not in run.stdout + run.stderr


def test_a_detached_sharded_s3_job_on_modal_completes_with_no_client_and_wait_only_follows(cli, modal_s3, s3, keyed, db):
    from tests.conftest import wait_for

    src = s3.put("dd/keyed.mp4", keyed)
    started = cli("export", src, "-o", s3.url("dd/reel.mp4"), *SMALL, "--use-modal", "--detach", "--shards", "2")
    assert started.exit_code == 0, started.stderr
    assert [c.function_name for c in modal_s3.function_calls][0] == "export_sharded_detached"
    wait_for(lambda: s3.get("dd/reel.mp4") is not None, timeout=120)  # merged and written with nobody waiting
    waited = cli("jobs", "wait", started.stdout.strip(), "--json")
    assert waited.exit_code == 0, waited.stderr
    result = waited.events()[-1]["result"]
    assert result["output"] == s3.url("dd/reel.mp4") and [s["index"] for s in result["shards"]] == [0, 1]
    assert [c.function_name for c in modal_s3.function_calls].count("export") == 2
    got = s3.get("dd/reel.mp4")
    assert got is not None and got[4:8] == b"ftyp"


def test_detached_export_on_modal_writes_its_s3_output_and_wait_follows(cli, modal_s3, s3, clip, db):
    src = s3.put("md/clip.mp4", clip)
    started = cli("export", src, "-o", s3.url("md/reel.mp4"), *SMALL, "--use-modal", "--detach")
    assert started.exit_code == 0, started.stderr
    waited = cli("jobs", "wait", started.stdout.strip(), "--json")
    assert waited.exit_code == 0, waited.stderr
    events = waited.events()
    assert events[-1]["type"] == "finished" and events[-1]["result"]["output"] == s3.url("md/reel.mp4")
    assert s3.get("md/reel.mp4")[4:8] == b"ftyp"
    assert not [p for p in modal_s3.volume_files("synapse-data") if p.startswith(("inputs/", "outputs/"))]


def test_a_modal_client_without_credentials_runs_a_cacheable_job_uncached_at_once(cli, modal_s3, s3, clip, tmp_path, db):
    import time

    src = s3.put("nc/clip.mp4", clip)
    started = time.monotonic()
    run = cli("export", src, "-o", tmp_path / "local.mp4", *SMALL, "--use-modal", "--json")  # an s3:// input, a local output
    assert run.exit_code == 0, run.stderr
    assert time.monotonic() - started < 60
    assert not s3.served("nc/clip.mp4", "HEAD")[1:]  # the container's one HEAD (overwrite-free input check), none from the client
    assert probe(tmp_path / "local.mp4").width == 90
    # the cache skipped, and said why, once, right after the job started (issue 23: "with one log line saying why")
    logs = [e["message"] for e in run.events() if e["type"] == "log" and "result cache skipped" in e["message"]]
    assert logs == ["result cache skipped: the version of its URL input could not be read from this machine "
                    "(no storage credentials here, or the object is gone); the job runs in full"]
    assert [e["type"] for e in run.events()][:2] == ["started", "log"]


def test_cancelling_a_detached_sharded_s3_job_on_modal_stops_its_shards_and_writes_nothing(cli, modal_s3, s3, keyed, db):
    from tests.conftest import wait_for

    src = s3.put("cx/keyed.mp4", keyed)
    started = cli("export", src, "-o", s3.url("cx/reel.mp4"), "--use-modal", "--detach", "--shards", "4", "--set", "output_width=720",
                  "--set", "output_height=1280", env={"SYNAPSE_FFMPEG_PRESET": "medium"})  # fmt: skip
    assert started.exit_code == 0, started.stderr
    wait_for(lambda: [c for c in modal_s3.function_calls if c.function_name == "export" and c.outcome == "running"], timeout=60)
    cancelled = cli("jobs", "cancel", started.stdout.strip())
    assert cancelled.exit_code == 0, cancelled.stderr
    wait_for(lambda: all(c.outcome != "running" for c in modal_s3.function_calls), timeout=30)  # the shards went with their merger
    outcomes = [c.outcome for c in modal_s3.function_calls if c.function_name == "export"]
    assert "cancelled" in outcomes and set(outcomes) <= {"cancelled", "ok"}, outcomes
    assert s3.get("cx/reel.mp4") is None and s3.open_uploads() == []
    assert json.loads(cli("jobs", "show", started.stdout.strip(), "--json").stdout)["status"] == "cancelled"
