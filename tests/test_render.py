"""Renderers on literal event lists."""

from __future__ import annotations

import io
import json

from synapse_cli.events import Artifact, Failed, Finished, Log, Progress, Started, from_dict, to_dict
from synapse_cli.render import choose_mode
from synapse_cli.render.ndjson import render_ndjson
from synapse_cli.render.plain import render_plain

EVENTS = [
    Started(job="export", total=100),
    Progress(done=10, total=100, phase="encode"),
    Progress(done=20, total=100, phase="encode", message="speed 2x"),
    Log("keyframe 0 clamped", level="warning"),
    Progress(done=100, total=100, phase="encode"),
    Artifact(path="out.mp4", bytes=1234),
    Finished(result={"output": "out.mp4"}, elapsed_s=1.5),
]


def test_wire_round_trip_for_every_event_type():
    for event in EVENTS + [Failed(code=3, message="unreachable", error="BackendError")]:
        assert from_dict(json.loads(json.dumps(to_dict(event)))) == event
    assert to_dict(Progress(done=1, total=2)) == {"type": "progress", "done": 1, "total": 2}  # optional fields left out
    assert from_dict({"type": "log", "message": "m", "future_field": 1}) == Log("m")


def test_ndjson_prints_one_event_per_line():
    out = io.StringIO()
    result = render_ndjson(EVENTS, out=out)
    lines = out.getvalue().splitlines()
    assert [json.loads(ln)["type"] for ln in lines] == ["started", "progress", "progress", "log", "progress", "artifact", "finished"]
    assert result == {"output": "out.mp4"}


def test_plain_throttles_to_one_progress_line_a_second_and_puts_result_on_stdout():
    ticks = iter([0.0, 0.1, 0.2, 0.3, 5.0, 5.1, 5.2])
    out, err = io.StringIO(), io.StringIO()
    render_plain(EVENTS, summarize=lambda r: r["output"], out=out, err=err, clock=lambda: next(ticks))
    assert out.getvalue() == "out.mp4\n"
    text = err.getvalue()
    assert "10/100" in text and "20/100" not in text  # the second progress came 0.1 s later
    assert "100/100" in text  # the final one always shows
    assert "warning: keyframe 0 clamped" in text
    assert "\x1b[" not in text  # no colour or cursor codes


def test_rich_bar_draws_on_a_terminal():
    from rich.console import Console

    from synapse_cli.render.rich_bar import render_rich

    err = Console(file=io.StringIO(), force_terminal=True, width=80)
    out = Console(file=io.StringIO(), force_terminal=False, width=80)
    render_rich(EVENTS, summarize=lambda r: r["output"], console=err, out=out)
    drawn = err.file.getvalue()
    assert "export" in drawn and "100%" in drawn and "keyframe 0 clamped" in drawn
    assert out.file.getvalue() == "out.mp4\n"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_mode_selection():
    assert choose_mode(True, _Tty(), {}) == "ndjson"
    assert choose_mode(False, _Tty(), {}) == "rich"
    assert choose_mode(False, io.StringIO(), {}) == "plain"
    assert choose_mode(False, _Tty(), {"TERM": "dumb"}) == "plain"
    assert choose_mode(False, _Tty(), {"CI": "true"}) == "plain"
