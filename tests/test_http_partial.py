"""A job that fails after its ``finished``, through the endpoint: compile of a folder where one schema
is broken. Locally (and on Modal) the good inputs' artefacts are written, the broken one is reported,
and the run exits 1; over ``--endpoint``, streamed and ``--detach`` + ``jobs wait``, it must do the
same, with only documented error names reaching the user.

Real ``synapse serve`` app on a loopback port (uvicorn in a thread), the real CLI in-process, real engines.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (fastapi, uvicorn)")
pytest.importorskip("llguidance")

from synapse_cli.errors import BackendError, SynapseError
from synapse_cli.events import Artifact, Finished
from synapse_cli.render.ndjson import encode
from synapse_cli.store import JobStore
from tests.http_fixtures import API_KEY, Endpoint, http, serve_app

DATA = Path(__file__).parent / "data" / "compile"
DOCUMENTED = {"UsageError", "JobError", "BackendError", "Interrupted"}  # README's exit-code table, errors.py
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GOOD = ("person", "shapes")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory) -> Iterator[Endpoint]:
    with serve_app(tmp_path_factory.mktemp("server")) as ep:
        yield ep


@pytest.fixture
def batch(tmp_path) -> Path:
    """Two good schemas and one with an unresolvable $ref."""
    folder = tmp_path / "schemas"
    folder.mkdir()
    for name in ("person.json", "shapes.json", "bad-ref.json"):
        shutil.copy(DATA / name, folder / name)
    return folder


def env(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    return {"SYNAPSE_JOBS_DB": str(tmp_path / f"{name}.db"), "SYNAPSE_HTTP_INITIAL_BACKOFF_MS": "1", "SYNAPSE_COMPILE_ENGINE_TIMEOUT_S": "120", **extra}


def local_row(tmp_path: Path, job_id: str):
    store = JobStore(tmp_path / "remote.db")
    try:
        return store.get(job_id)
    finally:
        store.close()


def compile_args(batch: Path, out: Path, *extra: object) -> list[object]:
    return ["compile", batch, "-o", out, "--engine", "llguidance", "--json", *extra]


def local_run(cli, batch: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    out = tmp_path / "local"
    run = cli(*compile_args(batch, out, "--no-modal"), env=env(tmp_path, "local"))
    assert run.exit_code == 1, run.stderr
    return out, run.events()


def assert_like_local(run, out: Path, local_out: Path, local_events: list[dict], batch: Path) -> None:
    """Exit 1, the good artefacts saved (the same bytes as a local run's), the broken input named, a documented error."""
    assert run.exit_code == 1, run.stderr
    events = run.events()
    last = events[-1]
    assert last["type"] == "error" and last["code"] == 1 and last["error"] == "JobError"
    assert last["message"].startswith("1 of 3 inputs failed: bad-ref (") and f"{batch / 'bad-ref.json'}#/properties/a/$ref" in last["message"]
    assert run.stderr.strip().splitlines()[-1] == f"JobError: {last['message']}"
    assert [e["type"] for e in events if e["type"] in ("artifact", "finished", "error")] == \
        [e["type"] for e in local_events if e["type"] in ("artifact", "finished", "error")]
    finished = next(e for e in events if e["type"] == "finished")["result"]
    assert {r["name"]: r["status"] for r in finished["inputs"]} == {"person": "ok", "shapes": "ok", "bad-ref": "invalid"}
    assert finished["failed"] == 1 and finished["compiled"] == 2
    assert sorted(e["path"] for e in events if e["type"] == "artifact") == sorted(str(p) for p in out.iterdir())
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in local_out.iterdir()) and len(names) == 6
    for name in GOOD:
        for suffix in ("lark", "schema.json"):  # the artefacts: byte for byte
            assert (out / f"{name}.{suffix}").read_bytes() == (local_out / f"{name}.{suffix}").read_bytes()
        # the report too, but for the engine's compile time (and a cache hit), which differ run to run
        reports = [json.loads((d / f"{name}.report.json").read_text()) for d in (out, local_out)]
        for report in reports:
            for engine in report["engines"].values():
                engine.pop("compile_ms", None)
                engine.pop("cached", None)
        assert reports[0] == reports[1]
    assert not (out / "bad-ref.lark").exists()
    assert not any(".part" in p.name for p in out.iterdir())


def test_a_streamed_compile_with_one_broken_schema_saves_the_rest_and_exits_1(cli, tmp_path, endpoint, batch):
    local_out, local_events = local_run(cli, batch, tmp_path)
    out = tmp_path / "remote"
    run = cli(*compile_args(batch, out, "--endpoint", endpoint.url), env=env(tmp_path, "remote", SYNAPSE_API_KEY=API_KEY))
    assert_like_local(run, out, local_out, local_events, batch)
    assert str(endpoint.work_dir) not in run.stdout + run.stderr


def test_a_detached_compile_with_one_broken_schema_saves_the_rest_and_jobs_wait_exits_1(cli, tmp_path, endpoint, batch):
    local_out, local_events = local_run(cli, batch, tmp_path)
    out = tmp_path / "remote"
    client = env(tmp_path, "remote", SYNAPSE_API_KEY=API_KEY)
    sent = cli(*compile_args(batch, out, "--endpoint", endpoint.url, "--detach"), env=client)
    assert sent.exit_code == 0, sent.stderr
    job_id = json.loads(sent.stdout)["job_id"]

    waited = cli("jobs", "wait", job_id, "--json", env=client)
    assert_like_local(waited, out, local_out, local_events, batch)
    # the local job store says so too, as for a local run: failed, its result kept (never answered from the store)
    row = local_row(tmp_path, job_id)
    assert row.status == "failed" and row.error_code == 1 and row.result["failed"] == 1
    assert cli("jobs", "wait", job_id, "--json", env=client).exit_code == 1  # again, from the store

    # the server's record: failed with the job's error, its result kept, its outputs served
    remote_id = local_row(tmp_path, job_id).remote["id"]
    record = http.get(f"{endpoint.url}/v1/jobs/{remote_id}", headers=AUTH).json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == 1 and record["error"]["error"] == "JobError" and record["error"]["message"].startswith("1 of 3 inputs failed")
    assert record["result"]["failed"] == 1 and len(record["artifacts"]) == 6
    lines = [json.loads(x) for x in http.get(f"{endpoint.url}/v1/jobs/{remote_id}/events", headers=AUTH).text.splitlines() if x.strip()]
    assert [e["type"] for e in lines][-2:] == ["finished", "error"]

    # `jobs show` reads that record without marking the local job failed before its outputs came
    again = tmp_path / "again"
    sent = cli(*compile_args(batch, again, "--endpoint", endpoint.url, "--detach", "--no-cache"), env=client)
    job_id = json.loads(sent.stdout)["job_id"]
    remote_id = local_row(tmp_path, job_id).remote["id"]
    deadline = time.monotonic() + 60
    while http.get(f"{endpoint.url}/v1/jobs/{remote_id}", headers=AUTH).json()["status"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli("jobs", "show", job_id, env=client).exit_code == 0
    assert local_row(tmp_path, job_id).status == "processing"
    waited = cli("jobs", "wait", job_id, "--json", env=client)
    assert_like_local(waited, again, local_out, local_events, batch)


def test_an_output_the_server_no_longer_has_is_a_plain_backend_error(tmp_path):
    """A 404 on a download: one BackendError (exit 3), never a private class's name."""
    from synapse_cli.backends.http import HttpBackend
    from synapse_cli.jobs.sample import SampleSpec

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/artifacts/"):
            return httpx.Response(404, json={"type": "error", "code": 3, "message": "no artifact", "error": "BackendError"})
        body = "".join(encode(e) + "\n" for e in (Artifact("/v1/artifacts/abc.0?output=output", 10), Finished(result={})))
        return httpx.Response(200, content=body.encode(), headers={"content-type": "application/x-ndjson"})

    backend = HttpBackend("http://127.0.0.1:9", API_KEY, client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(SynapseError) as caught:
        list(backend.run("sample", SampleSpec(output=str(tmp_path / "s.mp4"), seconds=0.2, width=64, height=64, audio=False)))
    assert type(caught.value) is BackendError and "the server no longer has it (HTTP 404)" in str(caught.value)
    assert not (tmp_path / "s.mp4").exists()


_ERROR_CLASSES = """
import json
import synapse_cli.backends.http, synapse_cli.backends.local, synapse_cli.backends.modal, synapse_cli.server.app
from synapse_cli.errors import SynapseError
seen, todo = set(), [SynapseError]
while todo:
    cls = todo.pop()
    seen.add(cls.__name__)
    todo.extend(cls.__subclasses__())
print(json.dumps(sorted(seen)))
"""


def test_every_error_class_users_can_see_has_a_documented_name():
    """The stderr line and the --json ``error`` field are ``type(exc).__name__``: every SynapseError
    class of the backends and the server must be one of the documented ones.

    In a fresh interpreter: in this one the classes seen would depend on which test files ran before in the
    same process (with pytest-xdist, a worker's share of them), e.g. a module the server imports lazily."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _ERROR_CLASSES], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = set(json.loads(run.stdout))
    assert seen - {"SynapseError"} <= DOCUMENTED, seen - DOCUMENTED
