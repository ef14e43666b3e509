"""What a request body may cost the server (issue #12 items 3 and 4): tar bombs, unknown fields,
slow bodies, full disks, and cost fields past the server's caps. Real servers, real sockets."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import time

import httpx
import pytest

from tests.http_fixtures import API_KEY, DIRTEST_JOB, http, serve_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def sparse_tar(name: str, realsize: int, data: bytes = b"x") -> bytes:
    """A real PAX archive with one GNU sparse 1.0 member: ``realsize`` bytes declared, ``data`` stored
    at its end (what GNU tar writes for a sparse file; Python's tarfile reads it back as that size)."""
    sparse_map = f"1\n{realsize - len(data)}\n{len(data)}\n".encode()
    block = sparse_map + b"\0" * (512 - len(sparse_map)) + data
    info = tarfile.TarInfo("GNUSparseFile.0/" + name)
    info.size = len(block)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(block))
    return buf.getvalue()


def test_the_sparse_tar_is_what_it_claims():
    raw = sparse_tar("big.bin", 10**12)
    assert len(raw) <= 10_240
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        (member,) = tar.getmembers()
        assert member.name == "big.bin" and member.size == 10**12 and member.issparse()


@pytest.mark.parametrize("realsize", [10**12, 3 * 1024 * 1024])
def test_a_sparse_tar_bomb_is_refused(tmp_path, monkeypatch, realsize):
    """10 KB that unpack to a terabyte (or to 3 MB, past a 1 MB limit): refused, nothing written."""
    from synapse_cli.jobs import JOBS

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    with serve_app(tmp_path / "srv", max_upload_mb=1) as ep:
        files = [("input", ("schemas", sparse_tar("big.bin", realsize), "application/x-synapse-dir+tar"))]
        started = time.monotonic()
        r = http.post(f"{ep.url}/v1/jobs/dirtest", data={"spec": json.dumps({"input": "schemas", "output_dir": "out"})}, files=files, headers=AUTH, timeout=30)
        assert r.status_code == 400 and "sparse" in r.json()["message"], r.text
        assert time.monotonic() - started < 10
        assert ep.job_dirs() == []


def test_unpacked_bytes_are_capped_at_the_upload_limit(tmp_path, monkeypatch):
    """A member whose header claims more than the limit is refused before a byte of it is written."""
    from synapse_cli.server.uploads import BadUpload, Upload, _unpack_dir

    folder = tmp_path / "0"
    folder.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"f{i}.bin")
            info.size = 600
            tar.addfile(info, io.BytesIO(b"y" * 600))
    (folder / ".schemas.tar").write_bytes(buf.getvalue())
    with pytest.raises(BadUpload, match="more than the server's limit"):
        _unpack_dir(Upload("input", "schemas", folder / "schemas", is_dir=True), 1000)
    assert not (folder / "schemas" / "f1.bin").exists()


def test_an_unwritable_member_name_is_a_400_not_a_500(tmp_path, monkeypatch):
    """A name the file system refuses (each part < 255 bytes, the path past PATH_MAX) is the upload's error."""
    from synapse_cli.jobs import JOBS

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    name = "/".join(["d" * 250] * 20) + "/f.txt"  # ~5 KB path: ENAMETOOLONG on open()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"z"))
    with serve_app(tmp_path / "srv") as ep:
        files = [("input", ("schemas", buf.getvalue(), "application/x-synapse-dir+tar"))]
        r = http.post(f"{ep.url}/v1/jobs/dirtest", data={"spec": json.dumps({"input": "schemas", "output_dir": "out"})}, files=files, headers=AUTH)
        assert r.status_code == 400 and "could not be unpacked" in r.json()["message"], r.text
        assert ep.job_dirs() == []


def _raw(url: str, head: bytes, wait_s: float = 5.0) -> bytes:
    """Send ``head`` (request line, headers, the start of a body) and read the answer without sending more."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head)
        s.settimeout(wait_s)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except TimeoutError:
            pass
    return reply


def _multipart_head(first_part: bytes, length: int = 10**8) -> bytes:
    return (
        f"POST /v1/jobs/export HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {length}\r\n\r\n"
    ).encode() + first_part


@pytest.mark.parametrize(
    "part, fragment",
    [
        (b'--b\r\nContent-Disposition: form-data; name="bogus"\r\n\r\nxxxx', "unexpected form field 'bogus'"),
        (b'--b\r\nContent-Disposition: form-data; name="weights"; filename="w.pt"\r\n\r\nxxxx', "'weights' are not inputs of export"),
    ],
)
def test_unknown_parts_are_refused_when_their_headers_arrive(tmp_path, part, fragment):
    """The client announces 100 MB and sends only the first part's headers: the answer comes anyway."""
    with serve_app(tmp_path / "srv", max_upload_mb=200) as ep:
        reply = _raw(ep.url, _multipart_head(part)).decode("utf-8", "replace")
        assert reply.startswith("HTTP/1.1 400") and fragment in reply, reply[:300]
        assert ep.job_dirs() == []


def test_a_body_that_stops_arriving_is_408(tmp_path):
    with serve_app(tmp_path / "srv", body_timeout_s=0.5) as ep:
        started = time.monotonic()
        part = b'--b\r\nContent-Disposition: form-data; name="input"; filename="a.mp4"\r\n\r\n' + b"\0" * 1000
        reply = _raw(ep.url, _multipart_head(part, 10**6)).decode("utf-8", "replace")
        assert reply.startswith("HTTP/1.1 408") and "serve.body_timeout_s" in reply, reply[:300]
        assert time.monotonic() - started < 4
        assert ep.job_dirs() == []


def test_an_upload_that_would_fill_the_disk_is_507(tmp_path):
    with serve_app(tmp_path / "srv", min_free_mb=10**9) as ep:  # a petabyte of head room: never there
        r = http.post(f"{ep.url}/v1/jobs/sample", json={"output": "s.mp4"}, headers=AUTH)
        assert r.status_code == 507 and "serve.min_free_mb" in r.json()["message"] and r.headers["retry-after"]
        assert ep.job_dirs() == []


@pytest.mark.parametrize(
    "kind, spec, field",
    [
        ("sample", {"output": "s.mp4", "width": 7680, "height": 4320}, "width"),
        ("sample", {"output": "s.mp4", "seconds": 86400}, "seconds"),
        ("sample", {"output": "s.mp4", "fps": 1000}, "fps"),
        ("compile", {"inputs": [], "workers": 512}, "workers"),
        ("compile", {"inputs": [], "engine_timeout_s": 1e9}, "engine_timeout_s"),
        ("infer", {"source": "a.mp4", "threads": 100000}, "threads"),
    ],
)
def test_cost_fields_past_the_servers_caps_are_422_naming_the_field(tmp_path, kind, spec, field):
    with serve_app(tmp_path / "srv") as ep:
        files = [("source", ("a.mp4", b"\0" * 16, "video/mp4"))] if kind == "infer" else None
        if files:
            r = http.post(f"{ep.url}/v1/jobs/{kind}", data={"spec": json.dumps(spec)}, files=files, headers=AUTH)
        else:
            r = http.post(f"{ep.url}/v1/jobs/{kind}", json=spec, headers=AUTH)
        assert r.status_code == 422, r.text
        assert f"{field}:" in r.json()["message"] and "cap" in r.json()["message"]
        assert ep.job_dirs() == []


def test_the_caps_are_declared_on_the_specs():
    from synapse_cli.jobs.compile.job import CompileSpec
    from synapse_cli.jobs.sample import SampleSpec
    from synapse_cli.jobs.infer.job import InferSpec

    assert set(SampleSpec.SERVER_CAPS) == {"seconds", "width", "height", "fps"}
    assert set(CompileSpec.SERVER_CAPS) == {"workers", "engine_timeout_s"}
    assert set(InferSpec.SERVER_CAPS) == {"threads"}


# -- malformed tars (issue #27 item 1) -------------------------------------------------


def _post_dir(ep, body: bytes) -> httpx.Response:
    files = [("input", ("schemas", body, "application/x-synapse-dir+tar"))]
    return http.post(f"{ep.url}/v1/jobs/dirtest", data={"spec": json.dumps({"input": "schemas", "output_dir": "out"})},
                     files=files, headers=AUTH, timeout=60)


def test_every_malformed_tar_is_a_4xx_with_one_line(tmp_path, monkeypatch):
    """Every kind of broken archive, posted to a real server: a 4xx whose message is one line, no
    traceback, nothing left behind. (The first was a 500 on main: a sparse 1.0 member without a map.)"""
    from synapse_cli.jobs import JOBS
    from tests.tar_bodies import MALFORMED, archive, member

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    wrong = []
    with serve_app(tmp_path / "srv", max_upload_mb=8) as ep:
        for label, build in MALFORMED.items():
            r = _post_dir(ep, build())
            message = r.json().get("message", "") if r.headers.get("content-type", "").startswith("application/json") else r.text
            if not (400 <= r.status_code < 500 and message and "\n" not in message and "Traceback" not in r.text):
                wrong.append(f"{label}: {r.status_code} {r.text[:200]}")
        assert not wrong, "\n".join(wrong)
        assert ep.job_dirs() == []
        # the server is still well: a good archive goes through
        good = _post_dir(ep, archive(member("d/a.txt", b"hello")))
        assert good.status_code == 200, good.text


@pytest.mark.parametrize("label, fragment", [
    ("sparse 1.0 without a map (issue #27)", "not a valid tar"),
    ("bad checksum in a later header", "unreadable header at byte 1024"),
    ("negative size in PAX", "negative size"),
    ("huge size in PAX", "more than the server's limit"),
    ("gzip bomb", "gzip-compressed: send an uncompressed tar"),
    ("a hard link", "not a plain file or folder"),
    ("a member given twice", "given twice"),
])
def test_malformed_tars_say_what_is_wrong(tmp_path, label, fragment):
    from synapse_cli.server.uploads import BadUpload, Upload, _unpack_dir
    from tests.tar_bodies import MALFORMED

    folder = tmp_path / "0"
    folder.mkdir()
    (folder / ".schemas.tar").write_bytes(MALFORMED[label]())
    with pytest.raises(BadUpload, match=fragment) as caught:
        _unpack_dir(Upload("input", "schemas", folder / "schemas", is_dir=True), 8 * 1024 * 1024)
    assert 400 <= caught.value.status < 500 and "\n" not in caught.value.message
    assert not (folder / ".schemas.tar").exists()


def test_a_huge_pax_header_is_refused_unread():
    """The cap on extended headers rests on tarfile's private ``_proc_pax``/``_proc_gnulong``: this
    fails if an upgrade renames them (the 2 MB header would then be read and the archive accepted)."""
    import tarfile as tf

    from synapse_cli.server.uploads import BadUpload, _tarinfo_class
    from tests.tar_bodies import MALFORMED

    for label in ("a PAX header larger than 1 MB", "a GNU long name larger than 1 MB"):
        with pytest.raises(BadUpload, match="extended header"):
            tf.open(fileobj=io.BytesIO(MALFORMED[label]()), mode="r:", tarinfo=_tarinfo_class())


def test_a_deeply_nested_spec_is_a_400(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        r = http.post(f"{ep.url}/v1/jobs/sample", content=b"[" * 200_000 + b"]" * 200_000,
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "nested too deeply" in r.json()["message"], r.text
