"""``_remote.StagedNames``: the other side's names for staged files, mapped back to the user's paths in text."""

from __future__ import annotations

import pytest

from synapse_cli.backends._remote import StagedNames
from synapse_cli.errors import UsageError
from synapse_cli.events import Artifact, Failed, Finished, Log, Progress, Started

H = "b86ab7802a10ae8849c6916f9a2866d19af645ee411d545c4b8ae4adb5013a22"
NAMES = StagedNames(
    {
        f"inputs/{H}/clip.mp4": "/home/me/clip.mp4",
        f"inputs/{H}/schemas": "my schemas",  # a folder input (a space in the user's name is kept)
        "outputs/j1/output/o.mp4": "out/o.mp4",
        "outputs/j1/output/": "out/",  # the output's folder: a temporary sibling lands there
    },
    schemes=("vol:",),
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"/data/inputs/{H}/clip.mp4 is not readable media", "/home/me/clip.mp4 is not readable media"),  # under the mount
        (f"'/tmp/x/modal-fake/volumes/v/inputs/{H}/clip.mp4'", "'/home/me/clip.mp4'"),  # under any mount
        (f"vol:inputs/{H}/clip.mp4.", "/home/me/clip.mp4."),  # the vol: form; a full stop is not part of the name
        (f"cannot read /data/inputs/{H}/schemas/sub/a.json: x", "cannot read my schemas/sub/a.json: x"),  # below a staged folder
        ("muxer for /data/outputs/j1/output/.o.1a2b.part.mp4: Invalid", "muxer for out/.o.1a2b.part.mp4: Invalid"),
        ("wrote /data/outputs/j1/output/o.mp4", "wrote out/o.mp4"),  # the output itself, not its folder + name
        (f"/data/inputs/{H}/clip.mp42 and inputs/{H}/clip.mp4_x", f"/data/inputs/{H}/clip.mp42 and inputs/{H}/clip.mp4_x"),  # other names
        ("/data/outputs/j2/output/o.mp4 and /home/me/clip.mp4", "/data/outputs/j2/output/o.mp4 and /home/me/clip.mp4"),  # not staged here
    ],
)
def test_text(text, expected):
    assert NAMES.text(text) == expected


def test_events_and_the_error_that_ends_them():
    staged = f"/data/inputs/{H}/clip.mp4"
    events = [
        Started(job="x", total=2),
        Log(f"{staged}: frame 3 skipped", level="warning", shard="1/2"),
        Progress(done=1, total=2, phase="read", message=staged),
        Progress(done=2, total=2),
        Artifact(path="out/o.mp4", bytes=3),
        Finished(result={"notes": [f"read {staged}"], "n": 1}, elapsed_s=0.5),
        Failed(code=1, message=f"{staged} broke", error="JobError"),
    ]
    assert list(NAMES.stream(iter(events))) == [
        Started(job="x", total=2),
        Log("/home/me/clip.mp4: frame 3 skipped", level="warning", shard="1/2"),
        Progress(done=1, total=2, phase="read", message="/home/me/clip.mp4"),
        Progress(done=2, total=2),
        Artifact(path="out/o.mp4", bytes=3),
        Finished(result={"notes": ["read /home/me/clip.mp4"], "n": 1}, elapsed_s=0.5),
        Failed(code=1, message="/home/me/clip.mp4 broke", error="JobError"),
    ]

    def failing():
        yield Log("started")
        raise UsageError(f"{staged}:1: not JSON")

    with pytest.raises(UsageError, match=r"^/home/me/clip\.mp4:1: not JSON$"):
        list(NAMES.stream(failing()))


def test_closing_the_stream_closes_what_it_reads():
    closed = []

    def events():
        try:
            yield Log("a")
            yield Log("b")
        finally:
            closed.append(True)

    inner = events()  # held here too: only an explicit close() ends it now
    stream = NAMES.stream(inner)
    assert next(stream) == Log("a")
    stream.close()
    assert closed == [True]  # Ctrl-C or a consumer that stops: the remote call is cancelled


def test_nothing_staged_changes_nothing():
    names = StagedNames({})
    assert names.text("/data/inputs/x/clip.mp4") == "/data/inputs/x/clip.mp4"
    assert list(names.stream(iter([Failed(1, "/data/inputs/x/clip.mp4")]))) == [Failed(1, "/data/inputs/x/clip.mp4")]
