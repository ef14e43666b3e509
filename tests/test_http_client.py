"""HttpBackend against httpx.MockTransport: the handler answers with NDJSON from our own encoder.

Fast unit tests of the client's logic: decoding, downloads and renames, retries and
what is never retried, error mapping, and no partial output when a stream breaks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from synapse_cli.backends.http import HttpBackend
from synapse_cli.errors import BackendError, JobError, UsageError
from synapse_cli.events import Artifact, Failed, Finished, Log, Progress, Started
from synapse_cli.jobs.export.job import ExportSpec
from synapse_cli.render.ndjson import encode

URL = "http://synapse.test"
ART = "/v1/artifacts/AAAAAAAAAAAAAAAAAAAAAA.0?output=output"
CONTENT = b"not really an mp4, but bytes all the same"


def ndjson(*events) -> bytes:
    return b"".join((encode(e) + "\n").encode() for e in events)


def job_stream(output: str = "server/out.mp4", content: bytes = CONTENT) -> bytes:
    return ndjson(
        Started(job="export", total=10),
        Progress(done=5, total=10, phase="encode"),
        Artifact(path=ART, bytes=len(content)),
        Finished(result={"output": output, "bytes": len(content)}, elapsed_s=0.5),
    )


class Server:
    """Scripted answers for POST /v1/jobs/*, a file for GET /v1/artifacts/*, and a log of requests."""

    def __init__(self, *posts, content: bytes = CONTENT) -> None:
        self.posts = list(posts)
        self.content = content
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.startswith("/v1/artifacts/"):
            return httpx.Response(200, content=self.content)
        answer = self.posts.pop(0) if len(self.posts) > 1 else self.posts[0]
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer

    def count(self, method: str = "POST") -> int:
        return sum(r.method == method for r in self.requests)


def ok(body: bytes | None = None) -> httpx.Response:
    return httpx.Response(200, content=job_stream() if body is None else body, headers={"content-type": "application/x-ndjson"})


def backend(server: Server, **kwargs) -> HttpBackend:
    kwargs.setdefault("max_retries", 2)
    kwargs.setdefault("initial_backoff_ms", 1)
    return HttpBackend(URL, kwargs.pop("api_key", "k"), client=httpx.Client(transport=httpx.MockTransport(server)), **kwargs)


@pytest.fixture
def spec(tmp_path) -> ExportSpec:
    src = tmp_path / "in.mp4"
    src.write_bytes(b"input bytes")
    return ExportSpec(input=str(src), output=str(tmp_path / "out.mp4"), params={"keyframes": []})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_events_arrive_decoded_and_the_artifact_is_renamed_into_place(spec, tmp_path):
    server = Server(ok())
    events = list(backend(server).run("export", spec))
    assert [type(e) for e in events] == [Started, Progress, Artifact, Finished]
    assert events[2] == Artifact(path=spec.output, bytes=len(CONTENT))
    assert Path(spec.output).read_bytes() == CONTENT
    assert leftovers(tmp_path) == []
    post = server.requests[0]
    assert post.url == f"{URL}/v1/jobs/export" and post.headers["authorization"] == "Bearer k"
    body = post.read()
    assert b'name="input"; filename="in.mp4"' in body and b"input bytes" in body
    sent = json.loads(body.split(b'name="spec"\r\n\r\n', 1)[1].split(b"\r\n--", 1)[0])
    assert sent["output"] == spec.output and sent["params"] == {"keyframes": []}
    assert server.requests[1].url == URL + ART.split("?")[0] and server.requests[1].headers["authorization"] == "Bearer k"


def test_an_existing_output_is_refused_before_any_request_and_replaced_with_overwrite(spec):
    Path(spec.output).write_bytes(b"old")
    server = Server(ok())
    with pytest.raises(UsageError, match="already exists"):
        list(backend(server).run("export", spec))
    assert server.requests == [] and Path(spec.output).read_bytes() == b"old"
    spec.overwrite = True
    list(backend(server).run("export", spec))
    assert Path(spec.output).read_bytes() == CONTENT


def test_a_missing_input_is_a_usage_error_before_any_request(spec):
    spec.input = spec.input + ".nope"
    server = Server(ok())
    with pytest.raises(UsageError, match="input not found"):
        list(backend(server).run("export", spec))
    assert server.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_is_a_backend_error_and_not_retried(spec, status):
    server = Server(httpx.Response(status, json={"type": "error", "code": 3, "message": "missing or wrong API key", "error": "BackendError"}))
    with pytest.raises(BackendError, match="endpoint rejected the API key") as info:
        list(backend(server).run("export", spec))
    assert info.value.exit_code == 3 and server.count() == 1


def test_a_4xx_is_never_retried_and_keeps_the_servers_error_class(spec):
    body = {"type": "error", "code": 2, "message": "bad export spec: crf: Input should be a valid integer", "error": "UsageError"}
    server = Server(httpx.Response(422, json=body))
    with pytest.raises(UsageError, match="crf: Input should be a valid integer"):
        list(backend(server).run("export", spec))
    assert server.count() == 1


def test_a_4xx_without_our_json_names_the_url(spec):
    server = Server(httpx.Response(404, text="<html>Not Found</html>"))
    with pytest.raises(BackendError, match=f"{URL}/v1/jobs/export answered HTTP 404"):
        list(backend(server).run("export", spec))


def test_503_twice_then_success_retries_twice_and_says_so(spec):
    server = Server(httpx.Response(503), httpx.Response(503), ok())
    events = list(backend(server).run("export", spec))
    assert server.count() == 3
    logs = [e for e in events if isinstance(e, Log)]
    assert [log.message.split("; ")[-1] for log in logs] == ["retry 1 of 2", "retry 2 of 2"]
    assert all("HTTP 503" in log.message and log.level == "warning" for log in logs)
    assert isinstance(events[-1], Finished) and Path(spec.output).read_bytes() == CONTENT


def test_429_waits_as_long_as_retry_after_says(spec):
    server = Server(httpx.Response(429, headers={"retry-after": "1"}), ok())
    start = time.monotonic()
    list(backend(server, initial_backoff_ms=1).run("export", spec))
    assert server.count() == 2 and time.monotonic() - start >= 0.95


def test_5xx_after_the_last_retry_is_a_backend_error_naming_the_url(spec):
    server = Server(httpx.Response(502))
    with pytest.raises(BackendError, match=f"{URL}/v1/jobs/export answered HTTP 502 \\(3 attempts\\)"):
        list(backend(server).run("export", spec))
    assert server.count() == 3


def test_connect_errors_are_retried_then_name_the_url(spec):
    server = Server(httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(BackendError, match=f"cannot reach {URL}/v1/jobs/export: \\[Errno 111\\] Connection refused") as info:
        list(backend(server, max_retries=3).run("export", spec))
    assert server.count() == 4 and info.value.exit_code == 3


def broken_stream(*events):
    def answer() -> httpx.Response:
        def body():
            yield ndjson(*events)
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

        return httpx.Response(200, content=body(), headers={"content-type": "application/x-ndjson"})

    return answer


def test_a_stream_cut_mid_way_is_exit_3_not_replayed_and_leaves_nothing(spec, tmp_path):
    server = Server(broken_stream(Started(job="export", total=10), Progress(done=3, total=10), Artifact(path=ART, bytes=len(CONTENT))))
    seen = []
    with pytest.raises(BackendError, match="broke before the job finished") as info:
        for event in backend(server).run("export", spec):
            seen.append(event)
    assert info.value.exit_code == 3
    assert [type(e) for e in seen] == [Started, Progress]  # delivered as they came; the artifact never was
    assert server.count("POST") == 1 and server.count("GET") == 0
    assert not Path(spec.output).exists() and leftovers(tmp_path) == []


def test_a_stream_that_ends_without_finished_is_a_backend_error(spec):
    server = Server(ok(ndjson(Started(job="export"), Artifact(path=ART, bytes=3))))
    with pytest.raises(BackendError, match="ended before the job finished"):
        list(backend(server).run("export", spec))
    assert not Path(spec.output).exists()


@pytest.mark.parametrize(
    "failure, cls, code",
    [
        (Failed(code=1, message="ffmpeg exited 1: moov atom not found", error="JobError"), JobError, 1),
        (Failed(code=2, message="framing: params.rotate: bad", error="UsageError"), UsageError, 2),
    ],
)
def test_an_error_event_raises_the_jobs_own_class(spec, failure, cls, code):
    server = Server(ok(ndjson(Started(job="export"), failure)))
    with pytest.raises(cls, match=failure.message) as info:
        list(backend(server).run("export", spec))
    assert info.value.exit_code == code and not Path(spec.output).exists()


def test_a_truncated_download_leaves_no_output(spec, tmp_path):
    server = Server(ok(), content=CONTENT[:10])
    with pytest.raises(BackendError, match=f"got 10 of {len(CONTENT)} bytes"):
        list(backend(server, max_retries=0).run("export", spec))
    assert not Path(spec.output).exists() and leftovers(tmp_path) == []


def test_an_answer_that_is_not_ndjson_is_not_a_synapse_endpoint(spec):
    server = Server(httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"}))
    with pytest.raises(BackendError, match="is not a synapse endpoint"):
        list(backend(server).run("export", spec))


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b"])
def test_an_unsafe_artifact_name_is_refused(tmp_path, name, monkeypatch):
    from synapse_cli.jobs import JOBS
    from tests.http_fixtures import DIRTEST_JOB, TestDirSpec

    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)

    src = tmp_path / "in.txt"
    src.write_text("x")
    stream = ndjson(Artifact(path=f"/v1/artifacts/AAAAAAAAAAAAAAAAAAAAAA.0?output=output_dir&name={name}", bytes=len(CONTENT)), Finished())
    with pytest.raises(BackendError, match="unsafe artifact name"):
        list(backend(Server(ok(stream))).run("dirtest", TestDirSpec(input=str(src), output_dir=str(tmp_path / "out"))))
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


def test_closing_the_iterator_closes_the_response(spec):
    closed = []

    class Body(httpx.SyncByteStream):
        def __iter__(self):
            yield ndjson(Started(job="export", total=10), Progress(done=1, total=10))
            time.sleep(5)  # never reached: the consumer stops first

        def close(self) -> None:
            closed.append(True)

    server = Server(lambda: httpx.Response(200, stream=Body(), headers={"content-type": "application/x-ndjson"}))
    events = backend(server).run("export", spec)
    assert isinstance(next(events), Started)
    events.close()
    assert closed == [True]


def test_no_api_key_sends_no_authorization_header(spec):
    server = Server(ok())
    list(backend(server, api_key=None).run("export", spec))
    assert "authorization" not in server.requests[0].headers


def test_a_bad_endpoint_url_is_a_usage_error():
    with pytest.raises(UsageError, match="bad endpoint URL"):
        HttpBackend("localhost:8000")


def test_from_settings_reads_the_http_keys():
    from synapse_cli.config import resolve

    settings = resolve({"http.endpoint": "https://x.example/prefix/", "api_key": "s3cret"}, {"SYNAPSE_HTTP_MAX_RETRIES": "5", "SYNAPSE_HTTP_TIMEOUT_S": "7"})
    b = HttpBackend.from_settings(settings)
    try:
        assert (b.endpoint, b.max_retries, b.timeout_s, b.backoff_s) == ("https://x.example/prefix", 5, 7.0, 0.5)
        assert b._headers == {"Authorization": "Bearer s3cret"}
    finally:
        b.close()
