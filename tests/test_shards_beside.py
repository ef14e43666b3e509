"""Work beside the shards: a kind's ``beside`` hook (export: the audio) runs while the shards run.

The export tests run the real CLI with a logging ``ffmpeg`` in front of the real one, so they see
when each ffmpeg ran and with which arguments. The ``run_sharded`` tests drive it with plain
generators standing in for shards (they are its inputs, not our code), so a failure or a slow
beside hook can be placed exactly.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from synapse_cli.errors import JobError
from synapse_cli.events import Finished, Progress, Started
from synapse_cli.shards import run_sharded
from tests.conftest import ffmpeg_exe, make_clip


def logging_ffmpeg(path: Path, log: Path) -> Path:
    """An ``ffmpeg`` that records its start, its arguments and its end (wall-clock seconds), then runs the real one."""
    path.write_text(
        "#!/bin/sh\n"
        f'echo "start $(date +%s.%N) $$ $*" >> "{log}"\n'
        f'"{ffmpeg_exe()}" "$@"\n'
        "rc=$?\n"
        f'echo "end $(date +%s.%N) $$" >> "{log}"\n'
        "exit $rc\n"
    )
    path.chmod(0o755)
    return path


def ffmpeg_runs(log: Path) -> list[dict]:
    """Each ffmpeg run: its arguments, start and end."""
    runs: dict[str, dict] = {}
    for line in log.read_text().splitlines():
        what, when, pid, *args = line.split(" ")
        if what == "start":
            runs[pid] = {"args": args, "start": float(when)}
        else:
            runs[pid]["end"] = float(when)
    return list(runs.values())


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("beside") / "rally.mp4", size="640x360", seconds=4.0)


def test_the_audio_is_encoded_once_while_the_shards_encode(cli, clip, tmp_path):
    log = tmp_path / "ffmpeg.log"
    env = {"SYNAPSE_FFMPEG": str(logging_ffmpeg(tmp_path / "ffmpeg", log)), "SYNAPSE_FFMPEG_THREADS": "1", "SYNAPSE_FFMPEG_PRESET": "slow"}
    out = tmp_path / "out.mp4"
    run = cli("export", clip, "-o", out, "--shards", "2", "--no-cache", "--json", "--set", "output_width=180", "--set", "output_height=320", env=env)
    assert run.exit_code == 0, run.stderr
    assert run.events()[-1]["result"]["audio"] is True

    runs = ffmpeg_runs(log)
    audio = [r for r in runs if any(a.endswith(".partial.m4a") for a in r["args"])]
    shards = [r for r in runs if any(Path(a).name.startswith(".part0") for a in r["args"]) and "concat" not in r["args"]]
    merge = [r for r in runs if "concat" in r["args"]]
    assert len(audio) == 1 and len(shards) == 2 and len(merge) == 1, [r["args"] for r in runs]
    # beside the shards, not after them: it started before the last shard's encode ended, and the merge came after both
    assert audio[0]["start"] < max(s["end"] for s in shards)
    assert merge[0]["start"] >= max([audio[0]["end"]] + [s["end"] for s in shards])
    # [ffmpeg] threads reaches every decoder and the filter graph, not only x264
    for r in shards + audio:
        args = r["args"]
        assert args[args.index("-i") - 2 : args.index("-i")] == ["-threads", "1"] and "-filter_threads" in args, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg", "ffmpeg.log", "out.mp4"]


def test_threads_zero_leaves_ffmpeg_its_own_choice(cli, clip, tmp_path):
    log = tmp_path / "ffmpeg.log"
    env = {"SYNAPSE_FFMPEG": str(logging_ffmpeg(tmp_path / "ffmpeg", log)), "SYNAPSE_FFMPEG_THREADS": "0"}
    run = cli("export", clip, "-o", tmp_path / "out.mp4", "--no-cache", "--set", "output_width=180", "--set", "output_height=320", env=env)
    assert run.exit_code == 0, run.stderr
    (only,) = ffmpeg_runs(log)
    assert "-threads" not in only["args"] and "-filter_threads" not in only["args"]


# -- run_sharded with plain generators as shards --------------------------------------------------


class Shards:
    """Shards that each yield ``steps`` progress events ``pause`` seconds apart, and record how they ended."""

    def __init__(self, steps: int = 5, pause: float = 0.05) -> None:
        self.steps, self.pause = steps, pause
        self.closed: list[int] = []
        self.merged = threading.Event()

    def split(self, spec, n, work, settings):
        return list(range(n))

    def start(self, index: int) -> Iterator:
        try:
            yield Started(job="test", total=self.steps)
            for i in range(self.steps):
                time.sleep(self.pause)
                yield Progress(done=i + 1, total=self.steps)
            yield Finished(result={"index": index})
        finally:
            self.closed.append(index)

    def merge(self, spec, parts, results, work) -> Iterator:
        self.merged.set()
        yield Finished(result={"beside": (work / "beside.txt").read_text(), "parts": [r["index"] for r in results]})


def test_the_merge_waits_for_the_beside_hook(tmp_path):
    shards = Shards(steps=2, pause=0.01)

    def beside(spec, work: Path) -> Iterator:
        time.sleep(0.5)  # slower than every shard
        (work / "beside.txt").write_text("done")
        yield Progress(done=1, total=1)

    events = list(run_sharded("test", None, 3, shards.start, shards.split, shards.merge, workdir=tmp_path, beside=beside))
    assert events[-1].result["beside"] == "done" and events[-1].result["parts"] == [0, 1, 2]
    assert events[-1].elapsed_s >= 0.5  # the whole job's time, split to merge, not the merge's own
    assert list(tmp_path.iterdir()) == []  # the shards' folder is gone


def test_a_failing_beside_hook_fails_the_job_and_cancels_the_shards(tmp_path):
    shards = Shards(steps=200, pause=0.05)  # 10 s each, unless cancelled

    def beside(spec, work: Path) -> Iterator:
        time.sleep(0.3)
        yield Progress(done=0, total=1)
        raise JobError("audio: the input's audio cannot be decoded")

    started = time.monotonic()
    with pytest.raises(JobError, match="audio"):
        list(run_sharded("test", None, 2, shards.start, shards.split, shards.merge, workdir=tmp_path, beside=beside))
    assert time.monotonic() - started < 5
    assert sorted(shards.closed) == [0, 1] and not shards.merged.is_set()
    assert list(tmp_path.iterdir()) == []


def test_closing_the_stream_stops_the_beside_hook(tmp_path):
    shards = Shards(steps=200, pause=0.05)
    stopped = threading.Event()

    def beside(spec, work: Path) -> Iterator:
        try:
            while True:
                time.sleep(0.05)
                yield Progress(done=0, total=1)
        finally:
            stopped.set()

    stream = run_sharded("test", None, 2, shards.start, shards.split, shards.merge, workdir=tmp_path, beside=beside)
    assert isinstance(next(stream), Started)
    stream.close()  # what Ctrl-C does to the command's loop
    assert stopped.wait(5) and sorted(shards.closed) == [0, 1]
    assert list(tmp_path.iterdir()) == []


def test_an_export_without_audio_runs_no_audio_encode(cli, tmp_path):
    silent = make_clip(tmp_path / "silent.mp4", size="320x180", seconds=2.0, audio=False)
    log = tmp_path / "ffmpeg.log"
    env = {"SYNAPSE_FFMPEG": str(logging_ffmpeg(tmp_path / "ffmpeg", log))}
    run = cli("export", silent, "-o", tmp_path / "out.mp4", "--shards", "2", "--no-cache", "--json", "--set", "output_width=90", "--set", "output_height=160", env=env)
    assert run.exit_code == 0, run.stderr
    assert run.events()[-1]["result"]["audio"] is False
    assert not [r for r in ffmpeg_runs(log) if any(a.endswith(".m4a") for a in r["args"])]
    assert json.loads(run.stdout.splitlines()[-1])["result"]["frames"] == 60
