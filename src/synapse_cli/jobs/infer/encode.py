"""The ``--annotated`` video: raw BGR frames piped into our FFmpeg, H.264 mp4 with the source's audio.

``run_ffmpeg`` is a generator that must be drained (its stdout carries the
progress lines) while its ``feed`` thread writes stdin. The inference loop is
busy in the job's own generator, so the drain runs in a thread here and the
loop hands frames over through a small queue: it blocks only when FFmpeg
falls behind, which bounds memory.
"""

from __future__ import annotations

import queue
import threading
from fractions import Fraction
from typing import Any

from synapse_cli.errors import JobError
from synapse_cli.jobs._media import url_args

_END = object()
# Audio codecs an mp4 can carry as they are; anything else is re-encoded to AAC.
_MP4_AUDIO = frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"})


def ffmpeg_args(
    ffmpeg: str,
    out: str,
    width: int,
    height: int,
    fps: float,
    audio_from: str | None,
    audio_codec: str | None,
    preset: str,
    crf: int,
) -> list[str]:
    rate = Fraction(fps).limit_denominator(1001) if fps and fps > 0 else Fraction(25)
    args = [ffmpeg, "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-framerate", str(rate), "-i", "pipe:0"]
    if audio_from:
        args += [*url_args(audio_from), "-i", audio_from, "-map", "0:v:0", "-map", "1:a:0"]
        args += ["-c:a", "copy"] if (audio_codec or "") in _MP4_AUDIO else ["-c:a", "aac", "-b:a", "128k"]
    if width % 2 or height % 2:  # yuv420p needs even sizes
        args += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    args += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
    args += ["-f", "mp4", "-y", out]
    return args


class AnnotatedEncoder:
    """``write(frame)`` frames in display order, then ``finish()``; ``abort()`` kills FFmpeg."""

    def __init__(self, args: list[str], total_frames: float, fps: float, ahead: int = 8) -> None:
        from synapse_cli.jobs._media import run_ffmpeg

        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._proc: Any = None
        self._error: BaseException | None = None
        self._done = False
        self._aborted = False

        def feed(proc: Any) -> None:
            self._proc = proc
            while True:
                frame = self._queue.get()
                if frame is _END:
                    if self._aborted:  # abort() may have come before ffmpeg started: it cannot have killed it
                        from synapse_cli.jobs._media import _kill

                        _kill(proc)
                    return
                proc.stdin.write(frame.data if frame.flags.c_contiguous else frame.copy(order="C").data)

        def drain() -> None:
            try:
                for _ in run_ffmpeg(args, total_frames, fps, phase="encode", feed=feed):
                    pass
            except BaseException as exc:  # noqa: BLE001 - re-raised in the job's thread
                self._error = exc

        self._thread = threading.Thread(target=drain, name="synapse-encode", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise JobError("ffmpeg stopped before the annotated video was complete")

    def write(self, frame: Any) -> None:
        while True:
            self._check()
            try:
                self._queue.put(frame, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Close FFmpeg's input and wait for it to write the file."""
        while True:
            self._check()
            try:
                self._queue.put(_END, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._done = True
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop FFmpeg now (failure or Ctrl-C); the caller removes the partial file."""
        if self._done:
            return
        self._done = self._aborted = True
        from synapse_cli.jobs._media import _kill

        if self._proc is not None:  # else the feeder kills it when it reads the _END put below
            _kill(self._proc)
        try:  # unblock the feeder if it waits for a frame
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait(_END)
        except queue.Full:
            pass
        self._thread.join(timeout=10)
