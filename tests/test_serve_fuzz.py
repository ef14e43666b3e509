"""Property-based requests against the real server (hypothesis; there is no OpenAPI document for
schemathesis): whatever arrives, the answer is never a 5xx other than the documented 503/507, and
no body holds a traceback."""

from __future__ import annotations

import json
import string

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.http_fixtures import API_KEY, serve_app  # noqa: E402
from tests.tar_bodies import tar_bodies  # noqa: E402

EXAMPLES = 1050
KINDS = ["export", "compile", "infer", "sample", "nope", "", "..", "%2e%2e", "sample/../export"]
FIELDS = ["input", "output", "inputs", "source", "model", "output_dir", "seconds", "width", "height", "fps", "audio",
          "workers", "engine_timeout_s", "threads", "preset", "crf", "overwrite", "ffmpeg", "cache_dir", "check", "task", "bogus"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.sampled_from(["a.mp4", "../x.mp4", "/etc/passwd", "out/", "", "\x00", "é.mp4", "x" * 300]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=8), scalars, max_size=3))
specs = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), values, max_size=6)
filenames = st.one_of(st.sampled_from(["a.mp4", "../a.mp4", "..", "", "a\x01b", "x" * 300, "dir"]), st.text(max_size=30))
parts = st.lists(
    st.tuples(st.sampled_from(["input", "inputs", "source", "model", "check", "spec", "bogus"]), filenames, st.binary(max_size=64),
              st.sampled_from(["video/mp4", "application/x-synapse-dir+tar", "text/plain", ""])),
    max_size=3,
)
header_sets = st.fixed_dictionaries({}, optional={
    "Authorization": st.sampled_from([f"Bearer {API_KEY}", "Bearer wrong-key-wrong-key", "Basic abc", "Bearer", "", f"bearer  {API_KEY}"]),
    "Origin": st.sampled_from(["https://evil.example", "null"]),
    "Host": st.sampled_from(["evil.example", "127.0.0.1:1", "[::1]", "localhost", ":::", "a" * 300]),
    "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=",
                                     "application/x-www-form-urlencoded", "application/json; charset=latin-1"]),
})


@st.composite
def requests(draw):
    target = draw(st.sampled_from(["job"] * 8 + ["health", "artifact", "other"]))
    usual = "POST" if target == "job" else "GET"
    method = draw(st.sampled_from([usual] * 9 + ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
    if target == "job":
        path = "/v1/jobs/" + draw(st.sampled_from(KINDS[:4] * 4 + KINDS) | st.text(string.ascii_letters + "._-%", max_size=12))
    elif target == "health":
        path = "/v1/health"
    elif target == "artifact":
        path = "/v1/artifacts/" + draw(st.text(string.ascii_letters + string.digits + "._-%/", max_size=70))
    else:
        path = "/" + draw(st.text(string.ascii_letters + "/._-", max_size=20))
    headers = {"Authorization": f"Bearer {API_KEY}", **draw(header_sets)}
    shape = draw(st.sampled_from(["json", "multipart", "form", "raw", "none", "tar", "tar"]))
    spec = draw(specs)
    if shape == "tar":  # a directory upload: a real archive, damaged (issue #27: a malformed sparse map was a 500)
        method, path = "POST", "/v1/jobs/dirtest"
        headers.pop("Content-Type", None)
        files = [("input", ("schemas", draw(tar_bodies()), "application/x-synapse-dir+tar"))]
        kwargs = {"data": {"spec": json.dumps({"input": "schemas", "output_dir": "out"})}, "files": files, "headers": headers}
    elif shape == "json":
        kwargs = {"content": json.dumps(spec, allow_nan=True).encode(), "headers": {**{"Content-Type": "application/json"}, **headers}}
    elif shape == "multipart":
        files = [(n, (f, data, ct) if ct else (f, data)) for n, f, data, ct in draw(parts)]
        spec_text = draw(st.sampled_from([json.dumps(spec, allow_nan=True), "{", "[]", "null"]))
        headers.pop("Content-Type", None)
        kwargs = {"data": {"spec": spec_text}, "files": files or [("zz", ("z.bin", b"z"))], "headers": headers}
    elif shape == "form":
        headers.pop("Content-Type", None)
        kwargs = {"data": {"spec": json.dumps(spec, allow_nan=True), **draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))}, "headers": headers}
    elif shape == "raw":
        kwargs = {"content": draw(st.binary(max_size=300)), "headers": headers}
    else:
        kwargs = {"headers": headers}
    return method, path, kwargs


@pytest.mark.slow
def test_generated_requests_never_get_a_5xx_or_a_traceback(tmp_path, monkeypatch, capsys):
    from synapse_cli.jobs import JOBS
    from tests.http_fixtures import DIRTEST_JOB

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    KINDS.append("dirtest")
    seen: dict[int, int] = {}
    bad: list[str] = []
    with serve_app(tmp_path / "srv", job_timeout_s=0.5, max_key_failures=10**9, min_free_mb=0) as ep, httpx.Client(base_url=ep.url, timeout=8) as client:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(requests())
        def one(req):
            method, path, kwargs = req
            try:
                response = client.request(method, path, **kwargs)
            except (httpx.LocalProtocolError, httpx.RemoteProtocolError):
                return  # a header h11 refuses to send, or the server closing after a refusal: not counted
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            text = response.text
            if (response.status_code >= 500 and response.status_code not in (503, 507)) or "Traceback" in text or 'File "/' in text:
                bad.append(f"{method} {path} {kwargs!r:.300} -> {response.status_code} {text[:300]}")

        one()
    total = sum(seen.values())
    with capsys.disabled():
        print(f"\nfuzz: {total} generated requests answered; statuses {dict(sorted(seen.items()))}")
    assert not bad, "\n".join(bad[:5])
    assert total >= 1000


TAR_EXAMPLES = 300


def test_generated_tar_bodies_are_unpacked_or_a_4xx_with_one_line(tmp_path, monkeypatch):
    """Directory uploads built by ``tar_bodies()`` (real archives, then damaged): each is unpacked
    (200) or refused with a 4xx whose message is one line; never a 5xx, never a traceback."""
    from synapse_cli.jobs import JOBS
    from tests.http_fixtures import DIRTEST_JOB

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    seen: dict[int, int] = {}
    bad: list[str] = []
    with serve_app(tmp_path / "srv", max_upload_mb=4, min_free_mb=0) as ep, httpx.Client(base_url=ep.url, timeout=30) as client:

        @settings(max_examples=TAR_EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(tar_bodies())
        def one(body):
            files = [("input", ("schemas", body, "application/x-synapse-dir+tar"))]
            r = client.post("/v1/jobs/dirtest", data={"spec": json.dumps({"input": "schemas", "output_dir": "out"})}, files=files,
                            headers={"Authorization": f"Bearer {API_KEY}"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code == 200:
                return
            message = r.json().get("message", "") if r.headers.get("content-type", "").startswith("application/json") else ""
            if not (400 <= r.status_code < 500) or not message or "\n" in message or "Traceback" in r.text:
                bad.append(f"{body[:600]!r} -> {r.status_code} {r.text[:300]}")

        one()
    print(f"\ntar bodies: statuses {dict(sorted(seen.items()))}")
    assert not bad, "\n".join(bad[:3])
    assert seen.get(200) and sum(v for k, v in seen.items() if k != 200) >= TAR_EXAMPLES // 4  # both outcomes exercised
