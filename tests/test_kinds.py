"""Job kinds are declared once (``JobKind``) and everything else derives from the records:
a toy kind registered in one place runs locally, on Modal (the fake control plane) and behind
``synapse serve``, with no edit to any backend, the server or ``synapse_cli/modal_app.py``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from synapse_cli.events import Artifact, Finished, Progress, Started
from synapse_cli.jobs import JOBS, register_kind
from tests.conftest import require
from tests.echo_kind import ECHO, EchoSpec

PAYLOAD = b"synapse echo: 0123456789"


@pytest.fixture
def echo_kind():
    """``echo`` registered for one test (and the Modal app defined again without it afterwards)."""
    register_kind(ECHO)
    try:
        yield ECHO
    finally:
        JOBS.pop("echo", None)
        import sys

        if "synapse_cli.modal_app" in sys.modules:
            importlib.reload(sys.modules["synapse_cli.modal_app"])


def _check(events: list, out: Path) -> None:
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert [e.done for e in events if isinstance(e, Progress)] == [1, 2]
    assert [e for e in events if isinstance(e, Artifact)] == [Artifact(path=str(out), bytes=len(PAYLOAD))]
    assert events[-1].result["output"] == str(out)
    assert out.read_bytes() == PAYLOAD[::-1]


def test_echo_runs_locally(echo_kind, tmp_path):
    from synapse_cli.backends.local import LocalBackend

    src = tmp_path / "in.txt"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "out.txt"
    _check(list(LocalBackend().run("echo", EchoSpec(input=str(src), output=str(out)))), out)


def test_the_modal_app_defined_again_without_a_kind_has_none_of_its_functions():
    """A reload runs the module in its old namespace: what it lists must come from this run, not globals()
    (``synapse deploy`` listed echo's functions after a test that had registered echo)."""
    require("modal", reason="the modal extra is not installed")
    from synapse_cli import modal_app

    register_kind(ECHO)
    try:
        assert {"echo", "echo_detached"} <= set(importlib.reload(modal_app).FUNCTIONS)
    finally:
        JOBS.pop("echo", None)
    again = importlib.reload(modal_app)
    assert not [name for name in again.FUNCTIONS if name.startswith("echo")]
    assert "serve" in again.FUNCTIONS and "export_detached" in again.FUNCTIONS


def test_echo_runs_on_modal(echo_kind, modal_fake, tmp_path):
    from synapse_cli import modal_app
    from synapse_cli.backends.modal import ModalBackend
    from synapse_cli.config import load_settings

    modal_app = importlib.reload(modal_app)
    assert {"echo", "echo_detached"} <= set(modal_app.FUNCTIONS)
    modal_app.app.deploy(name="synapse")
    src = tmp_path / "in.txt"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "out.txt"
    backend = ModalBackend.from_settings(load_settings({}))
    try:
        events = list(backend.run("echo", EchoSpec(input=str(src), output=str(out))))
    finally:
        backend.close()
    _check(events, out)
    assert modal_fake.function_calls[-1].function_name == "echo"
    assert modal_fake.function_calls[-1].args[0]["input"].startswith("vol:inputs/")


def test_echo_runs_behind_synapse_serve(echo_kind, tmp_path):
    from synapse_cli.backends.http import HttpBackend
    from synapse_cli.server import create_app
    from tests.http_fixtures import API_KEY, uvicorn_thread

    src = tmp_path / "in.txt"
    src.write_bytes(PAYLOAD)
    out = tmp_path / "out.txt"
    with uvicorn_thread(create_app(work_dir=tmp_path / "serve", api_key=API_KEY)) as url:
        backend = HttpBackend(url, API_KEY)
        try:
            events = list(backend.run("echo", EchoSpec(input=str(src), output=str(out))))
        finally:
            backend.close()
    _check(events, out)


def test_every_kind_is_reachable_on_every_backend():
    import importlib

    from synapse_cli import modal_app
    from synapse_cli.cli import app as cli_app
    from synapse_cli.config import REGISTRY

    import typer.main

    modal_app = importlib.reload(modal_app)
    root = typer.main.get_command(cli_app)
    for name, kind in JOBS.items():
        assert callable(kind.generator()) and isinstance(kind.spec_class(), type), name  # local, and behind synapse serve
        if kind.command:  # listed by --help, and built when it is run
            assert name in root.list_commands(None) and root.get_command(None, name).name == name
        if kind.remote:  # on Modal: a streaming and a spawnable function, with the record's GPU
            assert modal_app.STREAMING[name].info().gpus == ([("T4", 1)] if kind.gpu else [])
            assert modal_app.DETACHED[name].info().gpus == modal_app.STREAMING[name].info().gpus
        for key in kind.settings:
            assert f"{name}.{key}" in REGISTRY
    assert set(modal_app.STREAMING) == {n for n, k in JOBS.items() if k.remote}


def test_host_fields_are_not_part_of_the_cache_key(clips, tmp_path):
    """The same infer job with two ffmpeg binaries is one cache entry (ffmpeg_path is a HOST_FIELD)."""
    from synapse_cli.jobs.infer.job import InferSpec
    from synapse_cli.store.cache import cache_key

    a = cache_key("infer", InferSpec(source=str(clips["landscape"]), output=str(tmp_path / "a.json"), ffmpeg_path="/usr/bin/ffmpeg"))
    b = cache_key("infer", InferSpec(source=str(clips["landscape"]), output=str(tmp_path / "b.json"), ffmpeg_path="/opt/ffmpeg/bin/ffmpeg"))
    c = cache_key("infer", InferSpec(source=str(clips["landscape"]), output=str(tmp_path / "a.json"), conf=0.5))
    assert a is not None and a == b != c
