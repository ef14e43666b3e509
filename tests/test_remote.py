"""backends/_remote.py: the one walk over a spec's paths, the one outputs policy, retries before the
first event, the error tables; and each backend using them (Modal through its constructor seams and
the real client against a closed port, HTTP through httpx.MockTransport)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from synapse_cli.backends._remote import Outputs, PathField, collect_outputs, map_errors, path_fields, retry_until_first_event, stage_paths
from synapse_cli.errors import BackendError, JobError, UsageError
from synapse_cli.events import Artifact, Finished, Log, Progress, Started, to_dict
from synapse_cli.jobs import JOBS
from tests.conftest import require
from tests.http_fixtures import DIRTEST_JOB, TestDirSpec


@pytest.fixture
def dirtest(monkeypatch):
    monkeypatch.setitem(JOBS, "dirtest", DIRTEST_JOB)
    return "dirtest"


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- stage_paths: one walk, one rule for bad values ------------------------------------------------


def test_stage_paths_walks_inputs_then_outputs_and_keeps_lists_lists():
    seen: list[PathField] = []

    def place(path: PathField) -> str:
        seen.append(path)
        return f"<{path.value}>"

    data = {"inputs": ["a.json", "b.json"], "output_dir": "out", "engines": ["llguidance"]}
    staged = stage_paths("compile", data, place)
    assert staged["inputs"] == ["<a.json>", "<b.json>"] and staged["output_dir"] == "<out>"
    assert staged["engines"] == ["llguidance"] and data["inputs"] == ["a.json", "b.json"]  # a copy
    assert [(p.field, p.index, p.output, p.is_dir) for p in seen] == [
        ("inputs", 0, False, False), ("inputs", 1, False, False), ("output_dir", None, True, True),
    ]
    assert path_fields("export", {"input": "in.mp4", "output": "o.mp4"}) == [
        PathField("input", None, "in.mp4", False), PathField("output", None, "o.mp4", True),
    ]
    assert stage_paths("export", {"input": None, "output": "o.mp4"}, place) == {"input": None, "output": "<o.mp4>"}


@pytest.mark.parametrize("value", [3, ["a.mp4", 3], {"a": 1}])
def test_a_path_field_that_is_not_a_path_is_one_usage_error_everywhere(value, tmp_path):
    from synapse_cli.container import to_container

    with pytest.raises(UsageError, match="spec input 'input' must be a path or a list of paths"):
        stage_paths("export", {"input": value, "output": "o.mp4"}, lambda p: p.value)
    with pytest.raises(UsageError, match="spec input 'input' must be a path or a list of paths"):
        to_container("export", {"input": value, "output": "vol:o.mp4"}, tmp_path)


def test_the_container_maps_vol_paths_and_makes_output_folders(tmp_path):
    from synapse_cli.container import to_container

    spec = to_container("compile", {"inputs": ["vol:inputs/h/a.json", "/abs/b.json"], "output_dir": "vol:outputs/j/output_dir/out"}, tmp_path)
    assert spec["inputs"] == [str(tmp_path / "inputs/h/a.json"), "/abs/b.json"]
    assert spec["output_dir"] == str(tmp_path / "outputs/j/output_dir/out")
    assert (tmp_path / "outputs/j/output_dir").is_dir()


# -- the outputs policy: all on finished, or none ------------------------------------------------------


def fetcher(root: Path, fail_on: str | None = None):
    def fetch(event: Artifact, outputs: Outputs):
        if event.path == fail_on:
            raise BackendError(f"download of {event.path} failed")
        dest = root / event.path
        outputs.receive(dest, lambda tmp: tmp.write_text(event.path))
        return Artifact(path=str(dest), bytes=event.bytes)

    return fetch


def test_outputs_appear_only_when_finished_arrives(tmp_path):
    events = collect_outputs(
        [Started(job="x"), Artifact(path="new/a.txt", bytes=9), Progress(done=1, total=2), Artifact(path="new/deep/b.txt", bytes=14), Finished()],
        fetcher(tmp_path), overwrite=False, where="test",
    )
    seen = []
    for event in events:
        seen.append(event)
        if isinstance(event, Progress):  # a.txt was fetched, but waits in a temporary sibling
            assert not (tmp_path / "new" / "a.txt").exists()
    assert [type(e) for e in seen] == [Started, Progress, Artifact, Artifact, Finished]
    assert (tmp_path / "new/a.txt").read_text() == "new/a.txt" and (tmp_path / "new/deep/b.txt").read_text() == "new/deep/b.txt"
    assert leftovers(tmp_path) == ["new", "new/a.txt", "new/deep", "new/deep/b.txt"]


@pytest.mark.parametrize(
    "tail, error",
    [
        ([Artifact(path="new/deep/b.txt", bytes=1), Finished()], "download of new/deep/b.txt failed"),  # the second fetch fails
        ([Progress(done=1, total=2)], "the stream from test ended before the job finished; nothing was saved"),
    ],
)
def test_a_failure_before_finished_leaves_no_output_no_temp_file_and_no_folder(tmp_path, tail, error):
    (tmp_path / "kept").mkdir()
    events = [Started(job="x"), Artifact(path="new/a.txt", bytes=1), Artifact(path="kept/c.txt", bytes=1), *tail]
    with pytest.raises(BackendError, match=error):
        list(collect_outputs(events, fetcher(tmp_path, fail_on="new/deep/b.txt"), overwrite=False, where="test"))
    assert leftovers(tmp_path) == ["kept"]


def test_closing_the_stream_early_leaves_no_output(tmp_path):
    events = collect_outputs(iter([Artifact(path="a.txt", bytes=1), Progress(done=1, total=2), Finished()]), fetcher(tmp_path), False, "test")
    assert isinstance(next(events), Progress)
    events.close()  # Ctrl-C, or a consumer that stopped
    assert leftovers(tmp_path) == []


# -- retries before the first event -----------------------------------------------------------------


def test_retry_until_first_event_yields_a_warning_per_retry_and_returns_the_value():
    failures = [ConnectionError("refused"), ConnectionError("refused again")]

    def start() -> str:
        if failures:
            raise failures.pop(0)
        return "stream"

    gen = retry_until_first_event(start, lambda exc: isinstance(exc, ConnectionError), 3, 0.001, "the endpoint")
    logs = []
    with pytest.raises(StopIteration) as done:
        while True:
            logs.append(next(gen))
    assert done.value.value == "stream"
    assert logs == [
        Log("the endpoint: refused; retry 1 of 3", level="warning"),
        Log("the endpoint: refused again; retry 2 of 3", level="warning"),
    ]


def test_retry_until_first_event_gives_up_with_the_last_error_and_never_retries_the_rest():
    calls = []

    def start() -> None:
        calls.append(1)
        raise ConnectionError(f"refused {len(calls)}")

    with pytest.raises(ConnectionError, match="refused 3"):
        list(retry_until_first_event(start, lambda exc: True, 2, 0.001, "x"))
    calls.clear()
    with pytest.raises(ValueError):
        list(retry_until_first_event(lambda: calls.append(1) or int("x"), lambda exc: isinstance(exc, ConnectionError), 5, 0.001, "x"))
    assert calls == [1]


# -- error tables -----------------------------------------------------------------------------------


class Base(Exception):
    pass


class Specific(Base):
    pass


TABLE = {Base: (BackendError, "base {name}: {detail} at {where}"), Specific: (JobError, "specific: {detail}")}


def test_the_most_specific_mapping_wins_and_the_cause_is_kept():
    with pytest.raises(JobError, match="^specific: two lines$") as info:
        with map_errors(TABLE, where="x"):
            raise Specific("two\n lines")
    assert isinstance(info.value.__cause__, Specific)
    with pytest.raises(BackendError, match="^base Base: b at x$"):
        with map_errors(TABLE, where="x"):
            raise Base("b")
    with pytest.raises(UsageError, match="ours"):  # our own errors pass untouched
        with map_errors(TABLE, where="x"):
            raise UsageError("ours")
    with pytest.raises(KeyError):  # not in the table: not ours to translate
        with map_errors(TABLE, where="x"):
            raise KeyError("k")


# -- the Modal backend through its constructor seams ------------------------------------------------


class FakeVolume:
    """What ModalBackend asks of a Volume, in memory."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def listdir(self, path: str):
        raise FileNotFoundError(path)

    def batch_upload(self, force: bool = False):
        volume = self

        class Batch:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def put_file(self, local: str, remote: str) -> None:
                volume.files[remote.lstrip("/")] = Path(local).read_bytes()

        return Batch()

    def read_file(self, path: str):
        yield self.files[path]

    def remove_file(self, path: str, recursive: bool = False) -> None:
        for key in [k for k in self.files if k.startswith(path)]:
            del self.files[key]


class FakeFunction:
    """``remote_gen`` writes two files of the output folder on the Volume, then ``finish``es or fails."""

    def __init__(self, volume: FakeVolume, fail: Exception | None) -> None:
        self.volume, self.fail = volume, fail

    def remote_gen(self, spec: dict):
        out = spec["output_dir"]
        yield to_dict(Started(job="dirtest", total=2))
        for name in ("head.txt", "sub/size.txt"):
            self.volume.files[f"{out[len('vol:'):]}/{name}"] = name.encode()
            yield to_dict(Artifact(path=f"{out}/{name}", bytes=len(name)))
        if self.fail is not None:
            raise self.fail
        yield to_dict(Finished(result={"output_dir": out}))


def modal_backend(fail: Exception | None = None, function: object | None = None):
    from synapse_cli.backends.modal import ModalBackend

    volume = FakeVolume()
    config = {"app_name": "synapse", "environment": None, "connect_timeout_s": 5.0, "max_retries": 0, "gpu": "T4", "volume": "v"}
    env = {"MODAL_TOKEN_ID": "ak", "MODAL_TOKEN_SECRET": "as"}
    return ModalBackend(config, lookup=lambda kind: function or FakeFunction(volume, fail), volume=volume, env=env), volume


def test_modal_commits_every_output_on_finished(dirtest, tmp_path):
    require("modal", reason="modal is not installed")
    (tmp_path / "in.txt").write_text("x")
    backend, volume = modal_backend()
    out = tmp_path / "out"
    seen = []
    for event in backend.run(dirtest, TestDirSpec(input=str(tmp_path / "in.txt"), output_dir=str(out))):
        seen.append(event)
        if not isinstance(event, (Artifact, Finished)):
            assert not out.exists()
    assert [type(e) for e in seen] == [Started, Artifact, Artifact, Finished]
    assert {e.path for e in seen if isinstance(e, Artifact)} == {str(out / "head.txt"), str(out / "sub" / "size.txt")}
    assert (out / "sub" / "size.txt").read_text() == "sub/size.txt" and seen[-1].result["output_dir"] == str(out)
    assert not [k for k in volume.files if k.startswith("outputs/")]  # the job's Volume folder is removed


def test_modal_failure_mid_stream_leaves_no_output_and_keeps_the_cause(dirtest, tmp_path):
    require("modal", reason="modal is not installed")
    import modal.exception

    (tmp_path / "in.txt").write_text("x")
    backend, _ = modal_backend(fail=modal.exception.RemoteError("ffmpeg died"))
    with pytest.raises(JobError, match="the job failed on Modal: ffmpeg died") as info:
        list(backend.run(dirtest, TestDirSpec(input=str(tmp_path / "in.txt"), output_dir=str(tmp_path / "out"))))
    assert isinstance(info.value.__cause__, modal.exception.RemoteError)
    assert leftovers(tmp_path) == ["in.txt"]


def test_modal_retries_before_the_first_event_say_so(dirtest, tmp_path):
    require("modal", reason="modal is not installed")
    import modal.exception

    (tmp_path / "in.txt").write_text("x")
    backend, volume = modal_backend()
    backend.config.update(max_retries=2, initial_backoff_ms=1)
    failures = [modal.exception.InternalFailure("worker lost")]
    real = backend._lookup

    def lookup(kind):
        fn = real(kind)
        works = fn.remote_gen

        def remote_gen(spec):
            if failures:
                raise failures.pop(0)
            yield from works(spec)

        fn.remote_gen = remote_gen
        return fn

    backend._lookup = lookup
    events = list(backend.run(dirtest, TestDirSpec(input=str(tmp_path / "in.txt"), output_dir=str(tmp_path / "out"))))
    assert events[0] == Log("dirtest on Modal: worker lost; retry 1 of 2", level="warning")
    assert isinstance(events[-1], Finished)


# -- HTTP: the same policy ------------------------------------------------------------------------------


class _MidStepGenerator:
    """What modal's synchronous ``remote_gen`` wrapper is when Ctrl-C lands while its event loop is still inside
    the generator's step: ``next()`` raises KeyboardInterrupt, and ``close()`` then raises RuntimeError."""

    def __init__(self) -> None:
        self.items = iter([to_dict(Started(job="dirtest", total=2))])

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items, None)
        if item is None:
            raise KeyboardInterrupt
        return item

    def close(self) -> None:
        raise RuntimeError("aclose(): asynchronous generator is already running")


class _MidStepFunction:
    def remote_gen(self, spec: dict) -> _MidStepGenerator:
        return _MidStepGenerator()


def test_ctrl_c_while_modals_generator_is_mid_step_is_still_ctrl_c(dirtest, tmp_path):
    # seen on a loaded machine: `synapse export --use-modal`, interrupted, ended with the RuntimeError's line
    require("modal", reason="modal is not installed")
    (tmp_path / "in.txt").write_text("x")
    backend, _ = modal_backend(function=_MidStepFunction())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        for _ in backend.run(dirtest, TestDirSpec(input=str(tmp_path / "in.txt"), output_dir=str(out))):
            pass
    assert not out.exists()


def test_http_a_failed_download_of_a_directory_output_commits_none_of_it(dirtest, tmp_path):
    from synapse_cli.backends.http import HttpBackend
    from synapse_cli.render.ndjson import encode

    art = "/v1/artifacts/AAAAAAAAAAAAAAAAAAAAAA.{n}?output=output_dir&name={name}"
    stream = "".join(
        encode(e) + "\n"
        for e in (Started(job="dirtest"), Artifact(path=art.format(n=0, name="head.txt"), bytes=4), Artifact(path=art.format(n=1, name="sub/size.txt"), bytes=4), Finished())
    ).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, content=stream, headers={"content-type": "application/x-ndjson"})
        return httpx.Response(200, content=b"abcd") if request.url.path.endswith(".0") else httpx.Response(404)

    (tmp_path / "in.txt").write_text("x")
    backend = HttpBackend("http://synapse.test", client=httpx.Client(transport=httpx.MockTransport(handler)), max_retries=0)
    with pytest.raises(BackendError, match="HTTP 404"):
        list(backend.run(dirtest, TestDirSpec(input=str(tmp_path / "in.txt"), output_dir=str(tmp_path / "out"))))
    assert leftovers(tmp_path) == ["in.txt"]


# -- Modal unreachable: connect_timeout_s is the whole budget ---------------------------------------------


# The run goes in a fresh process: the modal client goes on retrying in the thread we stopped waiting
# for, which would hold up the next test's calls. Imports are done before the clock starts.
UNREACHABLE = """
import json, sys, time
import av, modal, modal.exception, modal.volume
from typer.testing import CliRunner
from synapse_cli.cli import app
import synapse_cli.backends.modal, synapse_cli.jobs.export.job, synapse_cli.render.plain, synapse_cli.store.recording
start = time.monotonic()
result = CliRunner().invoke(app, sys.argv[1:], catch_exceptions=False)
print(json.dumps({"exit_code": result.exit_code, "stderr": result.stderr, "seconds": time.monotonic() - start}))
"""


def assert_unreachable_exits_3(script: str, args: list[str], out: Path) -> None:
    """``synapse *args`` run by ``script`` (a fresh process printing its exit code, stderr and seconds)
    against a Modal URL nobody listens on, with a 2 s connect deadline: exit 3 within the deadline,
    one line naming the URL, and no ``out``."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MODAL_SERVER_URL": f"http://127.0.0.1:{port}", "MODAL_TOKEN_ID": "ak-x", "MODAL_TOKEN_SECRET": "as-x", "SYNAPSE_MODAL_CONNECT_TIMEOUT_S": "2"}
    proc = subprocess.run([sys.executable, "-c", script, *args, "-o", str(out)], env=env, capture_output=True, text=True, timeout=60)
    run = json.loads(proc.stdout.splitlines()[-1])
    assert run["exit_code"] == 3, run
    assert run["seconds"] < 3.0, run
    lines = run["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"BackendError: cannot reach Modal at http://127.0.0.1:{port}: "), lines
    assert "within 2 s" in lines[0] and not out.exists()


def test_unreachable_modal_exits_3_within_connect_timeout(clips, tmp_path):
    require("modal", reason="modal is not installed")
    assert_unreachable_exits_3(UNREACHABLE, ["export", str(clips["silent"]), "--use-modal"], tmp_path / "o.mp4")


def test_a_mapped_modal_error_keeps_its_cause_for_synapse_traceback(cli, modal_fake, clips, tmp_path):
    import modal.exception

    with pytest.raises(BackendError, match="run `synapse deploy` first") as info:
        cli("export", clips["silent"], "--use-modal", "-o", tmp_path / "o.mp4", env={"SYNAPSE_TRACEBACK": "1"})
    assert isinstance(info.value.__cause__, modal.exception.NotFoundError)


# -- [http] endpoint, formerly [modal] endpoint ---------------------------------------------------------


def test_modal_endpoint_in_a_config_file_still_works_with_one_warning(cli, tmp_path, monkeypatch):
    import json

    (tmp_path / ".synapse.toml").write_text('[modal]\nendpoint = "http://old.example"\n')
    monkeypatch.chdir(tmp_path)
    run = cli("config", "show", "--json")
    assert run.exit_code == 0, run.stderr
    shown = json.loads(run.stdout)["settings"]
    assert shown["http.endpoint"] == {"value": "http://old.example", "source": f"file:{tmp_path / '.synapse.toml'}"}
    assert "modal.endpoint" not in shown
    assert run.stderr.strip().splitlines() == [
        f"warning: modal.endpoint is deprecated in {tmp_path / '.synapse.toml'}; use http.endpoint ([http] endpoint)"
    ]
    (tmp_path / ".synapse.toml").write_text('[http]\nendpoint = "http://new.example"\n')
    run = cli("config", "show", "--json")
    assert json.loads(run.stdout)["settings"]["http.endpoint"]["value"] == "http://new.example" and run.stderr == ""
