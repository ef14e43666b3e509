"""The endpoint for real: `synapse serve`'s app on a loopback port (uvicorn), the real client, real jobs.

ASGITransport buffers the body, so streaming is tested against a real server in a thread
(tests/http_fixtures.py); the server-killed test runs `synapse serve` as a process and kills it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (fastapi, uvicorn)")

from synapse_cli.backends.http import HttpBackend
from synapse_cli.errors import JobError
from synapse_cli.events import Artifact, Finished, Progress, Started
from synapse_cli.jobs.export.job import ExportSpec
from synapse_cli.jobs.sample import SampleSpec
from tests.conftest import bus_image, probe, results_header, synapse_cmd
from tests.http_fixtures import API_KEY, DIRTEST_JOB, Endpoint, TestDirSpec, http, kill_processes_mentioning, serve_app, uvicorn_thread

SMALL = ["--set", "output_width=270", "--set", "output_height=480"]  # a fast encode


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Iterator[Endpoint]:
    """One server for this module: API key ``API_KEY``, default limits."""
    with serve_app(tmp_path_factory.mktemp("server")) as ep:
        yield ep


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client_env(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    """A job store per run, so no run reuses another's result; fast retries."""
    return {"SYNAPSE_JOBS_DB": str(tmp_path / f"{name}.db"), "SYNAPSE_HTTP_INITIAL_BACKOFF_MS": "1", **extra}


def no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") and ".part" in p.name for p in folder.iterdir())


# -- the same job, two ways -------------------------------------------------------------


def test_export_through_the_endpoint_equals_the_local_result(cli, clips, tmp_path, endpoint):
    src = clips["halves"]
    local = cli("export", src, "-o", tmp_path / "local.mp4", "--json", *SMALL, "--no-modal", env=client_env(tmp_path, "a"))
    remote = cli("export", src, "-o", tmp_path / "remote.mp4", "--json", *SMALL, "--endpoint", endpoint.url, env=client_env(tmp_path, "b", SYNAPSE_API_KEY=API_KEY))
    assert local.exit_code == 0, local.stderr
    assert remote.exit_code == 0, remote.stderr
    lev, rev = local.events(), remote.events()
    assert [e["type"] for e in rev if e["type"] != "progress"] == ["started", "artifact", "finished"]
    assert rev[0] == lev[0]  # started: same job, same total
    assert rev[-2] == {"type": "artifact", "path": str(tmp_path / "remote.mp4"), "bytes": lev[-2]["bytes"]}
    lres, rres = lev[-1]["result"], rev[-1]["result"]
    assert rres["input"] == str(src)  # the client's paths, not the server's
    assert {**rres, "output": None} == {**lres, "output": None} and rres["output"] == str(tmp_path / "remote.mp4")
    assert (tmp_path / "remote.mp4").read_bytes() == (tmp_path / "local.mp4").read_bytes()
    assert no_temp_files(tmp_path)
    assert endpoint.url not in remote.stdout and "/v1/" not in remote.stdout
    job_dir = endpoint.job_dirs()[-1]
    assert not (job_dir / "in").exists()  # uploads go when the job ends; the output waits for download


@pytest.mark.slow
def test_infer_through_the_endpoint_names_the_clients_source_in_the_results(cli, tmp_path, endpoint):
    """The results file is served as the job wrote it: its header names the client's path, not the upload folder."""
    bus = bus_image(tmp_path / "in" / "bus.jpg")
    local = cli("infer", bus, "-o", tmp_path / "local.json", "--no-modal", env=client_env(tmp_path, "a"))
    remote = cli("infer", bus, "-o", tmp_path / "remote.json", "--json", "--endpoint", endpoint.url, env=client_env(tmp_path, "b", SYNAPSE_API_KEY=API_KEY))
    assert local.exit_code == 0, local.stderr
    assert remote.exit_code == 0, remote.stderr
    assert remote.events()[-1]["result"]["output"] == str(tmp_path / "remote.json")
    assert json.loads((tmp_path / "remote.json").read_text())["source"] == str(bus)
    assert results_header(tmp_path / "remote.json") == results_header(tmp_path / "local.json")


def test_compile_through_the_endpoint_reports_name_the_clients_files(cli, tmp_path, endpoint):
    """A folder input is unpacked in the server's upload folder; the report files (served as written) name the client's paths."""
    import shutil

    folder = tmp_path / "schemas"
    folder.mkdir()
    shutil.copyfile(Path(__file__).parent / "data" / "compile" / "person.json", folder / "person.json")
    out = tmp_path / "compiled"
    run = cli("compile", folder, "-o", out, "--engine", "llguidance", "--json", "--endpoint", endpoint.url, env=client_env(tmp_path, "a", SYNAPSE_API_KEY=API_KEY))
    assert run.exit_code == 0, run.stderr
    assert json.loads((out / "person.report.json").read_text())["source"] == str(folder / "person.json")
    assert [row["source"] for row in run.events()[-1]["result"]["inputs"]] == [str(folder / "person.json")]


def test_progress_events_arrive_while_the_job_runs(clips, tmp_path, endpoint, monkeypatch):
    """Each event's arrival time at the client: progress comes well before the job ends,
    and when the first one arrives the server is still encoding (its temp file exists)."""
    from tests.conftest import make_clip, paced_ffmpeg

    src = make_clip(tmp_path / "long.mp4", size="1280x720", seconds=4)
    # the server (in this process) finds ffmpeg on PATH: one that reads at the clip's own rate encodes for the
    # clip's 4 s whatever the load (a loaded machine once held the reading of an unpaced 2 s encode until its end)
    (tmp_path / "bin").mkdir()
    paced_ffmpeg(tmp_path / "bin" / "ffmpeg")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    spec = ExportSpec(input=str(src), output=str(tmp_path / "out.mp4"), preset="medium", threads=1, params={"output_width": 540, "output_height": 960})
    before = set(endpoint.job_dirs())
    seen: list[tuple[float, object, bool]] = []
    backend = HttpBackend(endpoint.url, API_KEY)
    try:
        for event in backend.run("export", spec):
            new = [d for d in endpoint.job_dirs() if d not in before]
            encoding = bool(new) and any(".part" in p.name for p in new[0].rglob("*"))
            seen.append((time.monotonic(), event, encoding))
    finally:
        backend.close()
    kinds = [type(e) for _, e, _ in seen]
    assert kinds[0] is Started and kinds[-2:] == [Artifact, Finished]
    progress = [(t, e, encoding) for t, e, encoding in seen if isinstance(e, Progress)]
    assert len(progress) >= 2
    t_first, _, encoding = progress[0]
    t_finished = seen[-1][0]
    assert encoding, "the first progress event arrived after the encode ended"
    assert t_finished - t_first >= 0.5, [round(t - seen[0][0], 2) for t, _, _ in seen]
    assert [e.done for _, e, _ in progress] == sorted(e.done for _, e, _ in progress)
    assert probe(tmp_path / "out.mp4").frames == 120


def test_a_job_without_inputs_and_a_directory_output(tmp_path, endpoint, monkeypatch):
    """sample has no INPUTS; a directory output comes back as one artifact per file, merged into the folder."""
    from synapse_cli.jobs import JOBS

    events = list(HttpBackend(endpoint.url, API_KEY).run("sample", SampleSpec(output=str(tmp_path / "s.mp4"), seconds=0.2, width=64, height=64, audio=False)))
    assert isinstance(events[-1], Finished) and events[-1].result["output"] == str(tmp_path / "s.mp4")
    assert probe(tmp_path / "s.mp4").width == 64

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    src = tmp_path / "in.bin"
    src.write_bytes(b"0123456789abcdefXYZ")
    out = tmp_path / "compiled"
    events = list(HttpBackend(endpoint.url, API_KEY).run("dirtest", TestDirSpec(input=str(src), output_dir=str(out))))
    arts = [e for e in events if isinstance(e, Artifact)]
    assert arts == [Artifact(str(out / "head.txt"), 16), Artifact(str(out / "sub" / "size.txt"), 2)]
    assert (out / "head.txt").read_bytes() == b"0123456789abcdef" and (out / "sub" / "size.txt").read_text() == "19"
    assert events[-1].result == {"input": str(src), "output_dir": str(out), "files": 2}
    assert no_temp_files(tmp_path)

    tree = tmp_path / "schemas"  # a directory input travels as a tar and is unpacked on the server
    (tree / "nested").mkdir(parents=True)
    (tree / "a.json").write_text("{}")
    (tree / "nested" / "b.json").write_text('{"type":"string"}')
    events = list(HttpBackend(endpoint.url, API_KEY).run("dirtest", TestDirSpec(input=str(tree), output_dir=str(out), overwrite=True)))
    assert events[-1].result["read"] == [str(tree / "a.json"), str(tree / "nested" / "b.json")]
    assert (out / "head.txt").read_text() == '{}{"type":"strin'

    with pytest.raises(JobError, match=f"cannot use {src}: told to fail"):  # the message names the client's path
        list(HttpBackend(endpoint.url, API_KEY).run("dirtest", TestDirSpec(input=str(src), output_dir=str(tmp_path / "other"), fail=True)))
    assert not (tmp_path / "other").exists()


def test_a_job_error_keeps_its_exit_code_and_names_the_clients_path(cli, tmp_path, endpoint):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    run = cli("export", bad, "-o", tmp_path / "o.mp4", "--json", "--endpoint", endpoint.url, env=client_env(tmp_path, "a", SYNAPSE_API_KEY=API_KEY))
    assert run.exit_code == 2, run.stderr
    last = run.events()[-1]
    assert last["type"] == "error" and last["error"] == "UsageError" and last["message"].startswith(f"{bad} is not readable media")
    assert str(endpoint.work_dir) not in run.stdout + run.stderr
    assert not (tmp_path / "o.mp4").exists()
    deadline = time.monotonic() + 10  # the failed job's folder goes right after its last line
    while any(not (d / ".done").exists() for d in endpoint.job_dirs()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all((d / ".done").exists() for d in endpoint.job_dirs())


def test_an_output_no_muxer_knows_is_refused_before_anything_is_sent(cli, clips, tmp_path, endpoint):
    """``-o o.xyz`` once reached the server and failed inside ffmpeg (naming its temporary sibling);
    it is now refused by the client before any upload, exit 2, as a local run is (issue #27 item 4)."""
    out = tmp_path / "o.xyz"
    before = endpoint.job_dirs()
    run = cli("export", clips["silent"], "-o", out, "--json", *SMALL, "--endpoint", endpoint.url, env=client_env(tmp_path, "a", SYNAPSE_API_KEY=API_KEY))
    assert run.exit_code == 2, run.stderr
    last = run.events()[-1]
    assert last["type"] == "error" and last["message"].startswith("output: 'o.xyz'")
    assert str(endpoint.work_dir) not in run.stdout + run.stderr
    assert not out.exists() and endpoint.job_dirs() == before


def test_a_job_error_reading_an_input_names_the_clients_file(cli, tmp_path, endpoint):
    """compile reads --check from the server's upload folder; the error names the client's file."""
    schema = Path(__file__).parent / "data" / "compile" / "person.json"
    check = tmp_path / "check.jsonl"
    check.write_text("{nope\n")
    run = cli("compile", schema, "-o", tmp_path / "out", "--engine", "llguidance", "--check", check, "--json", "--endpoint", endpoint.url,
              env=client_env(tmp_path, "a", SYNAPSE_API_KEY=API_KEY))
    assert run.exit_code == 2, run.stderr
    assert run.events()[-1]["message"] == f"{check}:1: not JSON: Expecting property name enclosed in double quotes (column 2)"
    assert str(endpoint.work_dir) not in run.stdout + run.stderr


@pytest.mark.slow
def test_log_lines_name_the_clients_files(cli, tmp_path, endpoint):
    """infer skips an unreadable image of a folder with a warning: it names the client's file, not the unpacked upload."""
    bus = bus_image(tmp_path / "in" / "bus.jpg")
    broken = bus.parent / "broken.jpg"
    broken.write_text("not an image")
    run = cli("infer", bus.parent, "-o", tmp_path / "r.json", "--json", "--endpoint", endpoint.url, env=client_env(tmp_path, "a", SYNAPSE_API_KEY=API_KEY))
    assert run.exit_code == 0, run.stderr
    assert [e for e in run.events() if e["type"] == "log"] == [{"type": "log", "message": f"{broken} is not a readable image; skipped", "level": "warning"}]
    assert str(endpoint.work_dir) not in run.stdout + run.stderr


# -- auth and bad requests ----------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_without_the_right_key_exit_3_and_no_job_ran(cli, clips, tmp_path, endpoint, key):
    before = endpoint.job_dirs()
    env = client_env(tmp_path, "a", **({"SYNAPSE_API_KEY": key} if key else {}))
    run = cli("export", clips["landscape"], "-o", tmp_path / "o.mp4", "--json", "--endpoint", endpoint.url, env=env)
    assert run.exit_code == 3
    assert "endpoint rejected the API key" in run.stderr.strip().splitlines()[-1]
    assert run.events()[-1]["code"] == 3 and not [e for e in run.events() if e["type"] == "started"]
    assert endpoint.job_dirs() == before and not (tmp_path / "o.mp4").exists()
    if key:
        assert key not in run.stdout + run.stderr


def post(endpoint, kind="export", spec=None, files=None, headers=None, **kwargs) -> httpx.Response:
    spec = {"input": "clip.mp4", "output": "out.mp4"} if spec is None else spec
    data = {"spec": spec if isinstance(spec, str) else json.dumps(spec)}
    files = [("input", ("clip.mp4", b"\x00" * 64, "video/mp4"))] if files is None else files
    return http.post(f"{endpoint.url}/v1/jobs/{kind}", data=data, files=files, headers={**auth(), **(headers or {})}, **kwargs)


@pytest.mark.parametrize("filename", ["../evil.mp4", "../../etc/evil.mp4", "sub/evil.mp4", "..", "..\\evil.mp4"])
def test_a_filename_with_path_components_is_rejected(endpoint, filename):
    before = endpoint.job_dirs()
    response = post(endpoint, files=[("input", (filename, b"payload", "video/mp4"))])
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["code"] == 2 and "plain file name" in body["message"]
    assert endpoint.job_dirs() == before
    parent = endpoint.work_dir.parent
    assert not (parent / "evil.mp4").exists() and not (endpoint.work_dir / "evil.mp4").exists()


def tar_of(*members: tuple[str, bytes | None, str]) -> bytes:
    """(name, data, link target): a file when data is given, else a symlink."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "members, fragment",
    [
        ([("ok.json", b"{}", ""), ("../evil.txt", b"x", "")], "plain file name"),
        ([("sub/../../evil.txt", b"x", "")], "plain file name"),
        ([("link", None, "/etc/passwd")], "not a plain file or folder"),
    ],
)
def test_a_directory_upload_cannot_escape_its_folder(tmp_path, endpoint, monkeypatch, members, fragment):
    from synapse_cli.jobs import JOBS

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    before = endpoint.job_dirs()
    files = [("input", ("schemas", tar_of(*members), "application/x-synapse-dir+tar"))]
    response = post(endpoint, kind="dirtest", spec={"input": "schemas", "output_dir": "out"}, files=files)
    assert response.status_code == 400 and fragment in response.json()["message"]
    assert endpoint.job_dirs() == before
    assert not list(endpoint.work_dir.parent.glob("**/evil.txt"))


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"kind": "nope"}, 404, "unknown job kind 'nope'"),
        ({"spec": {"input": "a.mp4", "output": "b.mp4", "bogus": 1}}, 422, "unknown export spec field(s): bogus"),
        ({"spec": {"input": "a.mp4", "output": "b.mp4", "crf": "high"}}, 422, "bad export spec: crf"),
        ({"spec": {"input": "a.mp4", "output": "b.xyz"}}, 422, "bad export spec: output"),  # no output is the CLI's name; this one no muxer knows
        ({"spec": "{not json"}, 400, "not valid JSON"),
        ({"files": []}, 422, "needs exactly one file part named 'input'"),
        ({"files": [("input", ("a.mp4", b"1")), ("input", ("b.mp4", b"2"))]}, 422, "(got 2)"),
        ({"files": [("input", ("a.mp4", b"1")), ("weights", ("w.pt", b"2"))]}, 400, "'weights' are not inputs of export"),
    ],
)
def test_bad_requests_get_a_json_error_and_leave_nothing(endpoint, kwargs, status, fragment):
    before = endpoint.job_dirs()
    response = post(endpoint, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["type"] == "error" and fragment in response.json()["message"]
    assert endpoint.job_dirs() == before


def test_a_non_form_body_is_415_and_json_is_fine_without_inputs(endpoint):
    r = http.post(f"{endpoint.url}/v1/jobs/export", content=b"hello", headers={**auth(), "content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["code"] == 2
    r = http.post(f"{endpoint.url}/v1/jobs/sample", json={"output": "x.mp4", "bogus": 1}, headers=auth())
    assert r.status_code == 422 and "bogus" in r.json()["message"]


def test_uploads_over_the_limit_are_413(tmp_path):
    with serve_app(tmp_path / "srv", max_upload_mb=1) as ep:
        host, port = ep.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:  # announced too big: refused before reading a byte
            s.sendall(
                f"POST /v1/jobs/export HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 3000000\r\n\r\n".encode()
            )
            reply = b""
            while chunk := s.recv(65536):  # the server closes after its answer
                reply += chunk
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413") and "larger than the server's limit of 1 MB" in reply

        # No Content-Length: the server counts the body as it streams in. We send one byte more than the
        # limit and then wait, so the server has read every byte we sent when it answers (a close with
        # unread bytes would reset the connection and lose the answer; httpx, still sending, may see that).
        head = b'--b\r\nContent-Disposition: form-data; name="input"; filename="big.mp4"\r\n\r\n'
        pieces = [head + b"\x00" * (100_000 - len(head))] + [b"\x00" * 100_000] * 9
        pieces.append(b"\x00" * (1024 * 1024 + 1 - sum(map(len, pieces))))
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                f"POST /v1/jobs/export HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            )
            for piece in pieces:
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            s.settimeout(30)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        status, _, body = reply.decode().partition("\r\n\r\n")
        assert status.startswith("HTTP/1.1 413"), reply[:300]
        error = json.loads(body)
        assert error["code"] == 2 and "larger than the server's limit of 1 MB" in error["message"], error
        assert ep.job_dirs() == []


def test_artifacts_need_the_key_and_unknown_ids_are_404(tmp_path, endpoint):
    spec = {"output": "s.mp4", "seconds": 0.2, "width": 32, "height": 32, "audio": False, "ffmpeg": "/nonexistent/ffmpeg"}
    r = http.post(f"{endpoint.url}/v1/jobs/sample", json=spec, headers=auth())  # the server uses its own ffmpeg
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    events = [json.loads(line) for line in r.text.splitlines()]
    art = next(e for e in events if e["type"] == "artifact")
    assert art["path"].startswith("/v1/artifacts/") and art["path"].endswith("?output=output&save=s.mp4")
    assert events[-1]["result"]["output"] == "s.mp4"
    url = endpoint.url + art["path"].split("?")[0]
    assert http.get(url).status_code == 401
    assert http.get(url, headers=auth("nope")).status_code == 401
    got = http.get(url, headers=auth())
    assert got.status_code == 200 and len(got.content) == art["bytes"]
    for bad in ("AAAAAAAAAAAAAAAAAAAAAA.0", url.rsplit("/", 1)[1] + "9", "..%2F..%2Fetc%2Fpasswd", "x.0"):
        r = http.get(f"{endpoint.url}/v1/artifacts/{bad}", headers=auth())
        assert r.status_code == 404 and r.json()["type"] == "error"
    health = http.get(f"{endpoint.url}/v1/health").json()
    assert health["status"] == "ok" and health["auth"] == "bearer" and "export" in health["jobs"] and "key_accepted" not in health


def test_outputs_expire_and_are_swept(tmp_path):
    spec = {"output": "s.mp4", "seconds": 0.1, "width": 32, "height": 32, "audio": False}
    with serve_app(tmp_path / "srv", artifact_ttl_s=0) as ep:
        first = http.post(f"{ep.url}/v1/jobs/sample", json=spec, headers=auth())
        art = next(json.loads(line) for line in first.text.splitlines() if '"artifact"' in line)
        assert len(ep.job_dirs()) == 1
        time.sleep(0.05)
        http.post(f"{ep.url}/v1/jobs/sample", json=spec, headers=auth())  # each new job sweeps what expired
        assert len(ep.job_dirs()) == 1
        assert http.get(ep.url + art["path"], headers=auth()).status_code == 404


# -- failures on the way ------------------------------------------------------------------


def test_a_server_that_answers_503_twice_then_succeeds(cli, clips, tmp_path):
    from synapse_cli.server import create_app

    app = create_app(work_dir=tmp_path / "srv", api_key=API_KEY)
    posts: list[int] = []

    async def flaky(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            posts.append(1)
            if len(posts) <= 2:
                while (await receive()).get("more_body"):
                    pass
                await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"warming up"})
                return
        await app(scope, receive, send)

    with uvicorn_thread(flaky) as url:
        run = cli("export", clips["portrait"], "-o", tmp_path / "o.mp4", "--json", *SMALL, "--endpoint", url, env=client_env(tmp_path, "a", SYNAPSE_API_KEY=API_KEY))
    assert run.exit_code == 0, run.stderr
    assert len(posts) == 3
    logs = [e for e in run.events() if e["type"] == "log"]
    assert len(logs) == 2 and all("HTTP 503" in e["message"] for e in logs)
    assert [e["type"] for e in run.events() if e["type"] not in ("log", "progress")] == ["started", "artifact", "finished"]
    assert probe(tmp_path / "o.mp4").height == 480


def test_connection_refused_is_exit_3_naming_the_url(cli, clips, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{port}"
        run = cli("export", clips["landscape"], "-o", tmp_path / "o.mp4", "--endpoint", url, env=client_env(tmp_path, "a", SYNAPSE_HTTP_MAX_RETRIES="2"))
    assert run.exit_code == 3
    assert run.stderr.strip().splitlines()[-1].startswith(f"BackendError: cannot reach {url}/v1/jobs/export:")
    assert "(3 attempts)" in run.stderr


def test_a_client_that_goes_away_cancels_the_job(clips, endpoint):
    """Close the stream at the first progress event: the job stops, ffmpeg dies, the job's folder goes."""
    spec = {"input": "clip.mp4", "output": "out.mp4", "preset": "medium"}
    before = set(endpoint.job_dirs())
    with open(clips["landscape"], "rb") as f:
        with http.stream("POST", f"{endpoint.url}/v1/jobs/export", data={"spec": json.dumps(spec)}, files=[("input", ("clip.mp4", f))], headers=auth()) as r:
            job_dir = endpoint.work_dir / "jobs" / r.headers["x-synapse-job"]
            for line in r.iter_lines():
                if json.loads(line)["type"] == "progress":
                    break
            assert any(".part" in p.name for p in job_dir.rglob("*"))
    deadline = time.monotonic() + 10
    while job_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job_dir.exists()
    assert set(endpoint.job_dirs()) == before
    assert kill_processes_mentioning(str(job_dir)) == []  # no ffmpeg left behind


def held_ffmpeg(path: Path, release: Path) -> Path:
    """An ``ffmpeg`` that runs the real one, then does not exit until ``release`` exists (at most 120 s):
    a job using it cannot finish before the test says so, however slow or fast the machine.
    It touches ``<path>.ran`` first, so a test can check that its server really ran it."""
    from tests.conftest import ffmpeg_exe

    path.write_text(
        "#!/bin/sh\n"
        f'touch "{path}.ran"\n'
        f'"{ffmpeg_exe()}" "$@"\n'
        "rc=$?\n"
        "end=$(($(date +%s) + 120))\n"
        f'while [ ! -e "{release}" ] && [ "$(date +%s)" -le "$end" ]; do sleep 0.05; done\n'
        "exit $rc\n"
    )
    path.chmod(0o755)
    return path


def test_a_server_killed_mid_stream_is_exit_3_with_no_partial_output(clips, tmp_path):
    """Kill the server once the client has printed a progress line. The server's ffmpeg is held open
    (held_ffmpeg on its PATH), so the job is still running when the server dies: no race with the encode."""
    work, bin_dir, release = tmp_path / "srv", tmp_path / "bin", tmp_path / "release"
    bin_dir.mkdir()
    held_ffmpeg(bin_dir / "ffmpeg", release)
    server = subprocess.Popen(
        [*synapse_cmd(), "serve", "--port", "0", "--work-dir", str(work)],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "SYNAPSE_API_KEY": API_KEY, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    client = None
    watchdog = threading.Timer(240, lambda: [p.kill() for p in (server, client) if p is not None])  # never hang the suite
    watchdog.start()
    try:
        line = server.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        threading.Thread(target=server.stderr.read, daemon=True).start()  # keep draining its logs

        out = tmp_path / "client" / "o.mp4"
        out.parent.mkdir()
        client = subprocess.Popen(
            [*synapse_cmd(), "export", str(clips["landscape"]), "-o", str(out), "--json", *SMALL, "--endpoint", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **client_env(tmp_path, "a", SYNAPSE_API_KEY=API_KEY)},
        )
        seen = []
        for line in client.stdout:  # the client prints each event as it arrives
            seen.append(json.loads(line))
            if seen[-1]["type"] == "progress":
                break
        assert seen and seen[-1]["type"] == "progress", (seen, client.stderr.read())  # at EOF: the client has exited
        os.killpg(server.pid, signal.SIGKILL)
        rest, stderr = client.communicate(timeout=120)
    finally:
        watchdog.cancel()
        release.touch()
        if client is not None:
            client.kill()  # a no-op once it has exited
            client.wait()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        kill_processes_mentioning(str(work))  # ffmpeg runs in its own session: an orphan of the killed server
    assert server.returncode == -signal.SIGKILL
    assert client.returncode == 3, stderr
    assert "broke before the job finished" in stderr
    events = seen + [json.loads(ln) for ln in rest.splitlines() if ln.strip()]
    assert events[0]["type"] == "started" and not any(e["type"] in ("artifact", "finished") for e in events)
    assert events[-1]["type"] == "error" and events[-1]["code"] == 3
    assert list(out.parent.iterdir()) == []
    assert (bin_dir / "ffmpeg.ran").exists()  # the job was held: it could not have finished first


def test_serve_refuses_a_public_address_without_a_key(cli):
    run = cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert run.exit_code == 2
    assert "refusing to serve on 0.0.0.0 without an API key" in run.stderr


def test_serve_reports_a_busy_port_in_one_line(cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        run = cli("serve", "--port", str(s.getsockname()[1]))
    assert run.exit_code == 2 and "cannot listen on 127.0.0.1" in run.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_serves_connections_with_nagles_algorithm_off(host):
    """A response's body is written after its headers; with Nagle's algorithm on, on a keep-alive connection
    the body waited for the client's delayed ACK of the headers: 44 ms a request instead of 1. asyncio, under
    uvicorn, turns it off for the sockets it accepts when the listening socket says it is TCP."""
    import asyncio

    from synapse_cli.cli.serve import _bind
    from synapse_cli.errors import UsageError

    try:
        sock = _bind(host, 0)
    except UsageError:
        if host == "::1":
            pytest.skip("no IPv6 loopback on this machine")
        raise

    async def accepted_nodelay() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(accepted, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


def test_the_app_needs_a_key_unless_told_otherwise(tmp_path):
    from synapse_cli.cli.serve import is_loopback
    from synapse_cli.server import create_app

    with pytest.raises(ValueError, match="needs an api_key"):
        create_app(work_dir=tmp_path)
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.5.0.1", "0.0.0.0", "10.0.0.1", "example.com")] == [
        True, True, True, True, False, False, False,
    ]


def test_the_server_module_imports_without_side_effects(tmp_path):
    code = "import os, synapse_cli.server; print(sorted(os.listdir('.')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr
