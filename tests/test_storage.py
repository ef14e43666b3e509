"""s3:// and https:// inputs and outputs on the local backend, against a real S3-protocol server
(moto on loopback) and a plain HTTP server: real ffmpeg, the real CLI, real sockets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import INTERRUPTIBLE, make_clip, probe, require
from tests.storage_fixtures import ACCESS_KEY, SECRET_KEY

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


def test_existing_key_is_refused_without_overwrite_and_untouched(cli, s3, clip, db):
    src = s3.put("clip.mp4", clip)
    s3.put("taken.mp4", b"keep me")
    before = len(s3.served("clip.mp4"))
    run = cli("export", src, "-o", s3.url("taken.mp4"), *SMALL)
    assert run.exit_code == 2
    assert "already exists" in run.stderr and "--overwrite" in run.stderr
    assert s3.get("taken.mp4") == b"keep me"
    assert len(s3.served("clip.mp4")) == before  # refused before the input was read
    again = cli("export", src, "-o", s3.url("taken.mp4"), *SMALL, "--overwrite")
    assert again.exit_code == 0, again.stderr
    assert s3.get("taken.mp4")[4:8] == b"ftyp"


def test_failed_job_uploads_nothing(cli, s3, tmp_path, db):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\\x00" * 4096)
    src = s3.put("broken.mp4", broken)
    run = cli("export", src, "-o", s3.url("never.mp4"), *SMALL)
    assert run.exit_code in (1, 2), run.stderr
    assert s3.get("never.mp4") is None
    assert "X-Amz" not in run.stderr


def test_missing_object_is_one_line_exit_2(cli, s3, db):
    run = cli("export", s3.url("nope.mp4"), "-o", s3.url("o.mp4"), *SMALL)
    assert run.exit_code == 2
    assert run.stderr.strip().splitlines()[-1].startswith("UsageError: input not found: s3://")


def test_http_input_is_refused_unless_allowed(cli, s3, clip, http_files, monkeypatch, db):
    base, root = http_files
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    monkeypatch.setenv("SYNAPSE_STORAGE_ALLOW_HTTP", "0")
    refused = cli("export", f"{base}/clip.mp4", "-o", "out.mp4", *SMALL)
    assert refused.exit_code == 2 and "http://" in refused.stderr and "allow_http" in refused.stderr
    monkeypatch.setenv("SYNAPSE_STORAGE_ALLOW_HTTP", "1")
    run = cli("export", f"{base}/clip.mp4?token=hush", "-o", "out.mp4", *SMALL, "--json")
    assert run.exit_code == 0, run.stderr
    assert run.events()[-1]["result"]["input"] == f"{base}/clip.mp4?…"
    assert "hush" not in run.stdout + run.stderr
    assert probe(Path("out.mp4")).width == 90


def test_cache_key_of_a_url_input_is_its_etag_not_its_bytes(s3, clip):
    from synapse_cli.config import resolve
    from synapse_cli.jobs.export.job import ExportSpec
    from synapse_cli.store.cache import cache_key
    import os

    settings = resolve({}, dict(os.environ), {})
    src = s3.put("k.mp4", clip)
    spec = ExportSpec(input=src, output="o.mp4")
    first = cache_key("export", spec, settings)
    assert first and first == cache_key("export", spec, settings)
    served = sum(r.bytes for r in s3.served("k.mp4"))
    assert served == 0  # HEAD requests only: the key never reads the object
    s3.put("k.mp4", clip.read_bytes() + b"\\0")
    assert cache_key("export", spec, settings) not in (None, first)
    assert cache_key("export", ExportSpec(input=src, output=s3.url("o.mp4")), settings) is None  # URL outputs: not cached


SCHEMAS = Path(__file__).parent / "data" / "compile"


def test_compile_s3_prefix_in_and_out_equals_the_local_job(cli, s3, tmp_path, db):
    for name in ("line.json", "order.json"):
        s3.put(f"schemas/{name}", SCHEMAS / name)
    run = cli("compile", s3.url("schemas/"), "-o", s3.url("out/"), "--engine", "llguidance,outlines", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    local_in = tmp_path / "schemas"
    local_in.mkdir()
    for name in ("line.json", "order.json"):
        (local_in / name).write_bytes((SCHEMAS / name).read_bytes())
    local = cli("compile", local_in, "-o", tmp_path / "out", "--engine", "llguidance,outlines", "--json", "--no-cache")
    assert local.exit_code == 0, local.stderr
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert s3.keys("out/") == [f"out/{n}" for n in made]
    for name in made:
        if name.endswith((".lark", ".regex", ".gbnf", ".schema.json")):
            assert s3.get(f"out/{name}") == (tmp_path / "out" / name).read_bytes(), name
    text = run.stdout + run.stderr
    assert "synapse-stage-" not in text  # temp paths are named as the user's URLs
    assert s3.url("schemas/line.json") in text and s3.url("out") in text


def test_compile_refuses_an_https_output(cli, s3, db):
    run = cli("compile", s3.url("schemas/"), "-o", "https://example.com/out/")
    assert run.exit_code == 2 and "read-only" in run.stderr


@pytest.fixture(scope="module")
def pan(tmp_path_factory):
    require("ultralytics", reason="the infer extra is not installed")
    from tests.test_infer_batch import _pan

    return _pan(tmp_path_factory.mktemp("s3pan") / "pan.mp4", 6)


def test_infer_s3_in_and_out_equals_the_local_job(cli, s3, pan, tmp_path, db):
    src = s3.put("v/pan.mp4", pan)
    run = cli("infer", src, "--task", "detect", "--imgsz", "160", "-o", s3.url("v/pan.detect.json"), "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    local = cli("infer", pan, "--task", "detect", "--imgsz", "160", "-o", tmp_path / "l.json", "--json", "--no-cache")
    assert local.exit_code == 0, local.stderr
    remote, here = json.loads(s3.get("v/pan.detect.json")), json.loads((tmp_path / "l.json").read_text())
    assert remote["source"] == src
    assert remote["frames"] == here["frames"]
    assert run.events()[-1]["result"]["output"] == s3.url("v/pan.detect.json")
    gets = s3.served("v/pan.mp4")
    assert gets and all(r.range for r in gets)  # PyAV read it by range requests, never a download into a file


@pytest.fixture(scope="module")
def big_silent(tmp_path_factory) -> Path:
    """8 s of dense noise (megabytes per second, so four windows of it dwarf socket buffers and probes),
    a keyframe every second (a shard's seek lands near its window), moov first."""
    import subprocess

    from tests.conftest import ffmpeg_exe

    out = tmp_path_factory.mktemp("s3big") / "big.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "nullsrc=size=640x360:rate=25:duration=8,geq=random(1)*255:128:128",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(out)], check=True)  # fmt: skip
    return out


def test_sharded_export_from_s3_reads_only_each_window(cli, s3, big_silent, tmp_path, db):
    src = s3.put("big.mp4", big_silent)
    size = big_silent.stat().st_size
    run = cli("export", src, "-o", s3.url("big.reel.mp4"), *SMALL, "--shards", "4", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    gets = s3.served("big.mp4")
    served = sum(r.bytes for r in gets)
    assert all(r.range for r in gets)
    # a shard reads its 2 s window, a second of pre-roll before it and a second after: about half of 8 s
    # at most, never the whole object; four shards reading everything would be 4x its size
    assert max(r.bytes for r in gets) < 0.65 * size, [(r.range, r.bytes) for r in gets]
    assert served < 2.5 * size, (served, size)
    assert sum(1 for r in gets if r.range and not r.range.startswith("bytes=0-")) >= 3  # shards 2-4 seek by Range
    got = tmp_path / "got.mp4"
    got.write_bytes(s3.get("big.reel.mp4"))
    assert abs(probe(got).duration - 8.0) < 0.2


_UPLOADER = """
import sys
from pathlib import Path
from synapse_cli.storage.client import Storage
from synapse_cli.storage.urls import parse_s3
storage = Storage(endpoint=sys.argv[1], region="us-east-1", path_style=True, allow_http=True)
print("start", flush=True)
try:
    storage.upload(Path(sys.argv[2]), parse_s3(sys.argv[3]), overwrite=False)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_kill_mid_upload_leaves_no_object(s3, tmp_path, how):
    import os
    import signal
    import subprocess
    import sys
    import time

    from synapse_cli.storage.client import SINGLE_PUT_MAX

    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # multipart: larger than one PUT
        f.truncate(SINGLE_PUT_MAX + 40 * 1024 * 1024)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    s3.server.parts_held.set()  # every part is still on its way when the signal lands
    # INTERRUPTIBLE: a run started with SIGINT ignored (CI as a background job) would pass that on, and the
    # uploader would ignore the Ctrl-C and finish the object (what made this test fail in CI)
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, s3.server.endpoint, str(big), s3.url("big.bin")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, **INTERRUPTIBLE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not s3.served("big.bin", "PUT") and time.monotonic() < deadline:  # a part is on its way
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        assert s3.served("big.bin", "PUT"), "the upload never started"
        proc.send_signal(getattr(signal, how))
        try:  # a Ctrl-C drops the parts on their way; the server lets them go on after 10 s all the same
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            s3.server.parts_held.clear()
            proc.wait(timeout=60)
    finally:
        s3.server.parts_held.clear()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert s3.get("big.bin") is None  # no object at the final key, whole or part
    if how == "SIGINT":
        out, err = proc.communicate()
        assert proc.returncode == 130, err
        assert "interrupted" in out
    # neither completes the multipart upload nor aborts it: the bucket's lifecycle rule removes the parts (docs/storage.md)
    assert len(s3.open_uploads()) == 1


def test_secrets_never_reach_the_store_cache_or_logs(cli, s3, clip, http_files, tmp_path, db, monkeypatch):
    import os

    base, root = http_files
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    src = s3.put("sec/clip.mp4", clip)
    runs = [
        cli("export", src, "-o", s3.url("sec/a.mp4"), *SMALL, "--json"),
        cli("export", f"{base}/clip.mp4?X-Amz-Signature=deadbeefcafe&token=hush", "-o", tmp_path / "b.mp4", *SMALL, "--json"),
        cli("export", s3.url("sec/missing.mp4"), "-o", s3.url("sec/c.mp4"), *SMALL, "--json"),
    ]
    assert [r.exit_code for r in runs] == [0, 0, 2], [r.stderr for r in runs]
    detached = cli("export", src, "-o", s3.url("sec/d.mp4"), *SMALL, "--detach")
    assert detached.exit_code == 0, detached.stderr
    job_id = detached.stdout.strip()
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr + waited.stdout
    assert s3.get("sec/d.mp4")[4:8] == b"ftyp"
    needles = (SECRET_KEY, ACCESS_KEY, "X-Amz-Signature=", "X-Amz-Credential", "deadbeefcafe", "hush")
    text = "".join(r.stdout + r.stderr for r in [*runs, detached, waited])
    assert not [n for n in needles if n in text]
    searched = 0
    for folder in (Path(os.environ["HOME"]), db.parent):
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix not in (".mp4",):
                data = f.read_bytes()
                searched += 1
                assert not [n for n in needles if n.encode() in data], f
    assert searched >= 2  # the job store and the detached worker's log at least
    assert (db.parent / "logs" / f"{job_id}.log").exists()


def test_ffmpeg_never_follows_a_playlist_or_a_redirect(cli, s3, clip, http_files, db):
    base, root = http_files
    (root / "sub").mkdir()
    (root / "sub" / "clip.mp4").write_bytes(clip.read_bytes())
    (root / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{base}/sub/clip.mp4\n#EXT-X-ENDLIST\n")
    playlist = cli("export", f"{base}/list.m3u8", "-o", "p.mp4", *SMALL)
    assert playlist.exit_code == 2, playlist.stderr
    assert "not readable media" in playlist.stderr  # hls is not on the demuxer whitelist
    assert not Path("p.mp4").exists()
    redirect = cli("export", f"{base}/sub", "-o", "r.mp4", *SMALL)  # the server answers 301 to /sub/
    assert redirect.exit_code == 2, redirect.stderr
    assert "not readable media" in redirect.stderr  # max_redirects 0
    assert not Path("r.mp4").exists()
    direct = cli("export", f"{base}/sub/clip.mp4", "-o", "d.mp4", *SMALL)
    assert direct.exit_code == 0, direct.stderr


# -- the URL model, settings, doctor, the Python API -------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    ("https://u:pw@host.example/a/b.mp4?X-Amz-Signature=abc&X-Amz-Credential=AKIA", "https://***@host.example/a/b.mp4?…"),
    ("http://127.0.0.1:9000/b/k.mp4?token=1", "http://127.0.0.1:9000/b/k.mp4?…"),
    ("s3://bucket/key.mp4", "s3://bucket/key.mp4"),
    ("https://host/plain.mp4", "https://host/plain.mp4"),
])  # fmt: skip
def test_redact(url, shown):
    from synapse_cli.storage.urls import redact, redact_text, redact_values

    assert redact(url) == shown
    assert redact_text(f"ffmpeg: '{url}': error") == f"ffmpeg: '{shown}': error"
    assert redact_values({"a": [url], "n": 1}) == {"a": [shown], "n": 1}


@pytest.mark.parametrize("url, fragment", [
    ("s3://", "bad s3 URL"),
    ("s3://Bad_Bucket!/k", "bad s3 URL"),
    ("s3://bucket/a/../k", "'.' and '..'"),
    ("s3://bucket/k?versionId=1", "bad s3 URL"),
])  # fmt: skip
def test_bad_s3_urls_are_usage_errors_naming_the_field(url, fragment):
    from synapse_cli.errors import UsageError
    from synapse_cli.storage.urls import parse_s3

    with pytest.raises(UsageError) as info:
        parse_s3(url, "input")
    assert str(info.value).startswith("input:") and fragment in str(info.value)


def test_schemes_and_prefixes():
    from synapse_cli.errors import UsageError
    from synapse_cli.storage.urls import check_url, is_url, parse_s3

    assert [is_url(v) for v in ("s3://b/k", "HTTPS://h/x", "http://h/x", "clip.mp4", "/abs/s3://x", None)] == [True, True, True, False, False, False]
    assert parse_s3("s3://bkt/schemas/").is_prefix and not parse_s3("s3://bkt/a.json").is_prefix
    assert str(parse_s3("s3://bkt/schemas/").child("x.json")) == "s3://bkt/schemas/x.json"
    assert check_url("https://h/x.mp4", "input", allow_http=False) == "https"
    with pytest.raises(UsageError, match="read-only"):
        check_url("https://h/x.mp4", "output", allow_http=True, output=True)
    with pytest.raises(UsageError, match="allow_http"):
        check_url("http://h/x.mp4", "input", allow_http=False)


def test_config_show_lists_the_storage_section(cli, monkeypatch):
    monkeypatch.setenv("SYNAPSE_STORAGE_REGION", "auto")
    run = cli("config", "show", "--json")
    assert run.exit_code == 0, run.stderr
    settings = json.loads(run.stdout)["settings"]
    assert settings["storage.region"] == {"value": "auto", "source": "env:SYNAPSE_STORAGE_REGION"}
    assert {"storage.endpoint", "storage.path_style", "storage.allow_http", "storage.presign_expiry_s", "serve.allow_buckets"} <= set(settings)


def test_doctor_reports_storage_without_secret_values(cli, s3, monkeypatch):
    monkeypatch.setenv("SYNAPSE_DOCTOR_BUCKET", s3.bucket)
    run = cli("doctor", "--json")
    storage = json.loads(run.stdout)["storage"]
    assert storage["ok"] is True, storage
    assert s3.server.endpoint in storage["detail"] and "AWS_SECRET_ACCESS_KEY" in storage["detail"]
    assert f"bucket {s3.bucket} answers" in storage["detail"]
    assert SECRET_KEY not in run.stdout and ACCESS_KEY not in run.stdout
    monkeypatch.setenv("SYNAPSE_DOCTOR_BUCKET", "no-such-bucket-here")
    missing = json.loads(cli("doctor", "--json").stdout)["storage"]
    assert missing["ok"] is False


def test_python_api_takes_urls(s3, clip, db):
    import synapse_cli

    src = s3.put("api/clip.mp4", clip)
    result = synapse_cli.run("export", src, output=s3.url("api/reel.mp4"), job="framing", params={"output_width": 90, "output_height": 160})
    assert result["output"] == s3.url("api/reel.mp4")
    assert s3.get("api/reel.mp4")[4:8] == b"ftyp"


def test_https_input_with_an_untrusted_certificate_is_refused(cli, clip, tmp_path, db):
    """TLS is verified (PyAV with certifi's CA file, ffmpeg by default): a self-signed loopback server is not trusted."""
    import functools
    import shutil
    import ssl
    import subprocess
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path / "www"
    root.mkdir()
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(root)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/clip.mp4"
    try:
        import av

        with av.open(url, options={"protocol_whitelist": "https,tls,tcp"}) as unverified:  # the control: PyAV's default reads it
            assert unverified.streams.video
        with av.open(url, options={"protocol_whitelist": "https,tls,tcp", "tls_verify": "1", "ca_file": str(cert)}) as trusted:
            assert trusted.streams.video  # the same server, its certificate trusted: verification itself works
        run = cli("export", url, "-o", "t.mp4", *SMALL)
    finally:
        server.shutdown()
        server.server_close()
    assert run.exit_code == 2, run.stderr
    assert "not readable media" in run.stderr
    assert not Path("t.mp4").exists()


def test_ctrl_c_mid_job_leaves_no_object_and_no_temp_files(s3, big_silent, tmp_path, db):
    import os
    import signal
    import subprocess

    from tests.conftest import synapse_cmd

    src = s3.put("cc/big.mp4", big_silent)
    temp = tmp_path / "temp"  # the job's own temporary folder: other workers' jobs stage in the machine's
    temp.mkdir()
    proc = subprocess.Popen([*synapse_cmd(), "export", src, "-o", s3.url("cc/out.mp4"), "--json", "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SYNAPSE_FFMPEG_PRESET": "medium", "TMPDIR": str(temp)}, **INTERRUPTIBLE)  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # ffmpeg is reading the object
        if json.loads(line)["type"] == "progress":
            break
    assert list(temp.glob("synapse-stage-*")), "the job stages elsewhere than its TMPDIR"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert s3.get("cc/out.mp4") is None and s3.keys("cc/") == ["cc/big.mp4"]
    assert not list(temp.iterdir())  # the staging folder went too
    assert "X-Amz" not in err


def test_compile_into_a_prefix_with_a_taken_key_writes_nothing(cli, s3, db):
    s3.put("t/schemas/line.json", SCHEMAS / "line.json")
    s3.put("t/schemas/order.json", SCHEMAS / "order.json")
    s3.put("t/out/order.lark", b"mine")
    run = cli("compile", s3.url("t/schemas/"), "-o", s3.url("t/out/"), "--engine", "llguidance", "--no-cache")
    assert run.exit_code == 2, run.stderr
    assert "t/out/order.lark already exists" in run.stderr
    assert s3.keys("t/out/") == ["t/out/order.lark"] and s3.get("t/out/order.lark") == b"mine"


def test_a_bucket_can_live_on_its_own_endpoint(cli, s3, clip, monkeypatch, db):
    monkeypatch.setenv("SYNAPSE_STORAGE_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("SYNAPSE_STORAGE_ENDPOINTS", f"{s3.bucket}={s3.server.endpoint}")
    src = s3.put("e/clip.mp4", clip)
    run = cli("export", src, "-o", s3.url("e/reel.mp4"), *SMALL)
    assert run.exit_code == 0, run.stderr
    assert s3.get("e/reel.mp4")[4:8] == b"ftyp"
    monkeypatch.setenv("SYNAPSE_STORAGE_ENDPOINTS", "junk")
    bad = cli("export", src, "-o", s3.url("e/x.mp4"), *SMALL)
    assert bad.exit_code == 2 and "storage.endpoints" in bad.stderr


def test_a_detached_job_refuses_a_url_with_a_token(cli, clip, http_files, db):
    base, root = http_files
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    run = cli("export", f"{base}/clip.mp4?token=hush", "-o", "o.mp4", *SMALL, "--detach")
    assert run.exit_code == 2, run.stderr
    assert "input: a detached job cannot take a URL with a query string" in run.stderr and "hush" not in run.stderr
