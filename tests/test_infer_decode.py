"""Infer's decoder converts frames through one reformatter with one thread: the pixels must be ``to_ndarray``'s.

Every frame of upright, rotated, odd-size (4:4:4), full-range (yuvj420p) and 10-bit clips, compared exactly
with PyAV's own ``frame.to_ndarray(format="bgr24")`` (turned upright the same way), which is what the decoder
used before.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from synapse_cli.jobs._media import display_transform, frame_display_matrix
from synapse_cli.jobs.infer.sources import BgrConverter, VideoFrames, _orient
from tests.conftest import ffmpeg_exe

av = pytest.importorskip("av")


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def _src(size: str, frames: int = 7) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=10", "-frames:v", str(frames)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("decode")
    c = {name: d / f"{name}.mp4" for name in ("upright", "rot90", "rot270", "odd", "full_range", "ten_bit")}
    _ffmpeg(*_src("320x180"), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(c["upright"]))
    for angle in (90, 270):
        _ffmpeg("-display_rotation", str(angle), "-i", str(c["upright"]), "-c", "copy", str(c[f"rot{angle}"]))
    _ffmpeg(*_src("321x179"), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p", str(c["odd"]))
    _ffmpeg(*_src("320x180"), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuvj420p", "-color_range", "pc", str(c["full_range"]))
    _ffmpeg(*_src("320x180"), "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error",
            str(c["ten_bit"]))  # fmt: skip
    return c


def _reference(path: Path) -> list[np.ndarray]:
    """Every frame as the decoder made it before: ``to_ndarray(format="bgr24")`` per frame, turned upright."""
    out = []
    with av.open(str(path)) as container:
        transform = None
        for frame in container.decode(video=0):
            if transform is None:
                transform = display_transform(frame_display_matrix(frame))
            out.append(_orient(frame.to_ndarray(format="bgr24"), transform))
    return out


@pytest.mark.parametrize("name", ["upright", "rot90", "rot270", "odd", "full_range", "ten_bit"])
def test_decoder_pixels_equal_to_ndarray(clips, name):
    reference = _reference(clips[name])
    frames = VideoFrames(str(clips[name]))
    try:
        decoded = [f.image for f in frames]
    finally:
        frames.close()
    assert len(decoded) == len(reference) == 7
    for i, (a, b) in enumerate(zip(decoded, reference)):
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8, (i, a.shape, b.shape)
        assert np.array_equal(a, b), (name, i, int(np.abs(a.astype(int) - b).max()))
    if name.startswith("rot"):
        assert (frames.width, frames.height) == (180, 320)


def test_full_range_clip_really_is_full_range(clips):
    """The full-range case tests something: its frames say JPEG range, and their luma goes outside 16-235."""
    with av.open(str(clips["full_range"])) as container:
        frame = next(container.decode(video=0))
        assert frame.format.name == "yuvj420p" or int(frame.color_range) == 2
        luma = frame.to_ndarray(format="gray")
        assert luma.min() < 16 or luma.max() > 235


def test_converter_is_reused_and_falls_back_without_threads(clips):
    """One reformatter for the whole video; a PyAV whose ``reformat`` has no ``threads`` keyword still converts."""

    class OldReformatter:
        """PyAV before ``threads``: ``reformat`` refuses the keyword."""

        calls = 0

        def reformat(self, frame, format=None):  # noqa: A002 - PyAV's own name
            OldReformatter.calls += 1
            return frame.reformat(format=format)

    convert = BgrConverter()
    old = BgrConverter()
    old._reformatter = OldReformatter()  # type: ignore[assignment]
    with av.open(str(clips["odd"])) as container:
        for frame in container.decode(video=0):
            expected = frame.to_ndarray(format="bgr24")
            assert np.array_equal(convert(frame), expected)
            assert np.array_equal(old(frame), expected)
    assert "threads" not in old._kwargs and convert._kwargs["threads"] == 1
    assert OldReformatter.calls == 7  # the refused keyword never reached the body: every frame converted once
