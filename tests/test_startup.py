"""A short export's fixed cost: what `synapse export` imports before ffmpeg starts, and the shortcuts that keep it small.

A 6 s clip costs what ffmpeg costs only if nothing else is loaded on the way: a framing export
of an MP4 runs without PyAV (its header is read in Python), pydantic (typer's options and the
params are coerced and checked in Python when plainly valid), numpy, rich, modal or torch.
Each shortcut is checked against the slow path it replaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from synapse_cli.errors import UsageError
from tests.conftest import make_clip

NOT_ON_THE_PATH = ("av", "numpy", "pydantic", "pydantic_core", "annotated_types", "typing_extensions", "torch", "ultralytics", "modal", "rich", "httpx",
                   # the other commands: only the one that runs is imported and built
                   "synapse_cli.cli.infer", "synapse_cli.cli.compile", "synapse_cli.cli.serve", "synapse_cli.cli.jobs", "synapse_cli.cli.doctor")

_RUN_AND_LIST_MODULES = """
import atexit, sys
atexit.register(lambda: print("MODULES=" + ",".join(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr))
sys.argv = ["synapse", *{args!r}]
from synapse_cli.cli import main
main()
"""


def _export_in_a_process(args: list[str]) -> subprocess.CompletedProcess:
    code = _RUN_AND_LIST_MODULES.format(heavy=NOT_ON_THE_PATH, args=["export", *args])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _modules(run: subprocess.CompletedProcess) -> list[str]:
    line = [ln for ln in run.stderr.splitlines() if ln.startswith("MODULES=")][-1]
    return [m for m in line.removeprefix("MODULES=").split(",") if m]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("short") / "short.mp4", size="320x180", seconds=0.5)


def test_a_framing_export_imports_only_what_it_needs(clip, tmp_path, db):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"keyframes": [{"time": 0, "x": 100, "y": 0, "width": 100, "height": 180}], "output_width": 180, "output_height": 320}))
    out = tmp_path / "reel.mp4"
    run = _export_in_a_process([str(clip), "--job", "framing", "--params", str(params), "--set", "interpolation=linear",
                                "--no-modal", "-o", str(out), "--no-cache"])  # fmt: skip
    assert run.returncode == 0, run.stderr[-800:]
    assert out.stat().st_size > 0
    assert _modules(run) == []


def test_bad_params_are_still_worded_by_pydantic(clip, tmp_path, db):
    """The slow path is still there: a bad value imports pydantic and gets its one-line message."""
    out = tmp_path / "reel.mp4"
    run = _export_in_a_process([str(clip), "--job", "framing", "--set", "output_width=811", "--no-modal", "-o", str(out)])
    assert run.returncode == 2
    assert "UsageError: framing: params.output_width: Value error, must be even" in run.stderr
    assert "pydantic" in _modules(run) and not out.exists()


# -- typer's options, coerced without a TypeAdapter each -------------------------------------------


def _export_command():
    import typer.main

    from synapse_cli.cli import app

    return typer.main.get_command(app).get_command(None, "export")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("input", "clip.mp4"),
        ("input", "some/where/else.mov"),
        ("input", Path("given/as/a/path.mp4")),
        ("params_file", "."),  # a directory where a file is wanted: typer's own message
        ("params_file", "params.json"),
        ("job", "framing"),
        ("sets", ("a=1", "b=[2]")),
        ("sets", ()),
        ("output", None),
        ("use_modal", None),
        ("shards", "auto"),
    ],
)
def test_options_are_coerced_as_typer_coerces_them(name, value, tmp_path, monkeypatch):
    """Each value a command line gives comes out as typer's own TypeAdapter makes it, errors included."""
    import typer._click as click
    from typer._coercion import build_runtime_param

    from synapse_cli.cli._typer_hooks import _PlainCoercion

    monkeypatch.chdir(tmp_path)
    command = _export_command()
    param = {p.name: p for p in command.params}[name]
    ctx = click.Context(command)
    assert isinstance(param._runtime_param, _PlainCoercion)

    def outcome(coercion):
        try:
            return "value", coercion.coerce(value, param=param, ctx=ctx)
        except click.exceptions.BadParameter as exc:
            return "error", exc.format_message()

    ours, typers = outcome(param._runtime_param), outcome(build_runtime_param(param.type_descriptor))
    assert ours == typers and type(ours[1]) is type(typers[1])
    if name == "params_file" and value == ".":
        assert ours[0] == "error" and "is a directory" in ours[1]


def test_typer_private_hooks_are_as_expected():
    """The fence around typer's private API (cli/_typer_hooks.py): when a typer release moves or reshapes
    what it uses, this fails, rather than start-up quietly slowing down or coercion drifting."""
    import importlib.metadata
    import inspect

    from typer._coercion import build_runtime_param
    from typer._param_types import coerce_cli_path

    from synapse_cli.cli._typer_hooks import _PlainCoercion, _typer_hooks

    assert _typer_hooks()
    version = tuple(int(p) for p in importlib.metadata.version("typer").split(".")[:2])
    assert (0, 29) <= version < (0, 30), "typer outside the range pyproject pins: re-check cli/_typer_hooks.py"
    assert list(inspect.signature(build_runtime_param).parameters) == ["descriptor"]
    assert {"parameter_info", "path_type", "param", "ctx"} <= set(inspect.signature(coerce_cli_path).parameters)
    command = _export_command()
    for param in command.params:  # every option has typer's descriptor and got our coercion in place of its adapter
        assert hasattr(param, "type_descriptor") and isinstance(param._runtime_param, _PlainCoercion), param.name


# -- export params: read in Python when plainly valid, else by pydantic ------------------------------

K = {"time": 0, "x": 437, "y": 0, "width": 405, "height": 720}
E = {"time": 0, "x": 10, "y": 10, "radius_x": 5, "radius_y": 5}
PARAMS = [
    ("framing", {}),
    ("framing", {"keyframes": [K, {**K, "time": 1.5, "x": 10.5}], "interpolation": "Catmull_Rom", "rotate": 90}),
    ("framing", {"output_width": 720, "output_height": 1280, "segments": [{"start": 0, "end": 1, "speed": 2}]}),
    ("overlay", {"keyframes": [E], "effect": "original", "start": 0.5, "end": 2, "fade_s": 0, "stroke_color": "#ff00aa@0.5", "text": "hi"}),
    ("overlay", {"keyframes": [E], "start": None, "text": None}),
    ("annotate", {"clips": [{"start": 0, "end": 1, "rating": "!?", "title": "t", "notes": "n"}], "border": 0}),
]
LAX = [  # valid for pydantic, not plainly: its coercions apply
    ("framing", {"output_width": "720"}),
    ("framing", {"output_width": 720.0, "keyframes": [{**K, "x": "12"}]}),
    ("framing", {"keyframes": [{**K, "x": True}]}),
    ("annotate", {"clips": [{"start": 0, "end": 1}], "border": 3.0}),
]
BAD = [
    ("framing", {"keyframes": [{**K, "width": -5}]}),
    ("framing", {"keyframes": [{**K, "extra": 1}]}),
    ("framing", {"keyframes": [{"time": 0}]}),
    ("framing", {"keyframes": K}),
    ("framing", {"output_width": 811}),
    ("framing", {"output_width": 8}),
    ("framing", {"interpolation": "cubic"}),
    ("framing", {"rotate": float("nan"), "segments": [{"start": 1, "end": 1}]}),
    ("framing", {"segments": [{"start": 0, "end": 1, "speed": 20}]}),
    ("overlay", {"keyframes": []}),
    ("overlay", {"keyframes": [E], "effect": "blur"}),
    ("overlay", {"keyframes": [E], "stroke_color": "white\n"}),
    ("overlay", {"keyframes": [E], "stroke_color": "not a colour"}),
    ("overlay", {"keyframes": [E], "start": -1}),
    ("overlay", {"keyframes": [E], "text": "x" * 501}),
    ("annotate", {"clips": [{"start": 2, "end": 1}]}),
    ("annotate", {"clips": [{"start": 0, "end": 1, "rating": "bad"}]}),
    ("annotate", {"clips": [{"start": 0, "end": 1, "title": "x" * 201}]}),
]


@pytest.mark.parametrize(("job", "params"), PARAMS + LAX)
def test_plain_params_read_as_pydantic_reads_them(job, params):
    from synapse_cli.jobs.export.params import PARAMS as CLASSES
    from synapse_cli.jobs.export.params import _Doubt, _read, _validate_with_pydantic, validate_params

    assert validate_params(job, params) == _validate_with_pydantic(job, params)
    if (job, params) in PARAMS:
        assert _read(CLASSES[job], params) == validate_params(job, params)  # read in Python, no pydantic
    else:
        with pytest.raises(_Doubt):
            _read(CLASSES[job], params)


@pytest.mark.parametrize(("job", "params"), BAD)
def test_bad_params_are_left_to_pydantic(job, params):
    from synapse_cli.jobs.export.params import PARAMS as CLASSES
    from synapse_cli.jobs.export.params import _Doubt, _read, validate_params

    with pytest.raises(_Doubt):
        _read(CLASSES[job], params)
    with pytest.raises(UsageError, match=rf"^{job}: params"):
        validate_params(job, params)


# -- ffmpeg: the wheel's binary, found without running it ------------------------------------------


def test_the_bundled_ffmpeg_is_the_one_imageio_ffmpeg_finds():
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    from synapse_cli.jobs._media import _bundled_ffmpeg

    assert _bundled_ffmpeg() == imageio_ffmpeg.get_ffmpeg_exe()
