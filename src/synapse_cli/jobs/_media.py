"""FFmpeg and media probing, shared by the jobs.

- ``find_ffmpeg``: configured path, else ``ffmpeg`` on PATH, else the static
  binary from the imageio-ffmpeg wheel.
- ``probe``: stream facts in displayed pixels: a phone video's display rotation
  is applied to the size, as ffmpeg's autorotate applies it to frames. An
  MP4/MOV is read from its header (``_mp4``: no import of PyAV, nothing
  decoded); anything else through PyAV (the static build has no ffprobe),
  whose first decoded frame carries the display matrix.
- ``display_transform``: the steps ffmpeg's autorotate takes for a display
  matrix, so a decoder of our own (infer) turns frames exactly as ffmpeg does.
- ``run_ffmpeg``: runs a command with ``-progress pipe:1``, drains stderr in a
  thread, yields monotonic ``Progress`` events and kills the child on close.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import struct
import subprocess
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence

from synapse_cli.errors import JobError, UsageError
from synapse_cli.events import Progress


def find_ffmpeg(configured: str | None = None) -> str:
    """The ffmpeg binary to use, by precedence: configured > PATH > imageio-ffmpeg."""
    if configured:
        found = shutil.which(configured)
        if not found:
            raise UsageError(f"ffmpeg not found at {configured!r} (ffmpeg.path / SYNAPSE_FFMPEG)")
        return found
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    bundled = _bundled_ffmpeg()
    if bundled:
        return bundled
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise UsageError(f"no ffmpeg found: install ffmpeg or imageio-ffmpeg, or set SYNAPSE_FFMPEG ({exc})") from None


def _bundled_ffmpeg() -> str | None:
    """The imageio-ffmpeg wheel's binary, found without importing the package or running the binary.

    ``imageio_ffmpeg.get_ffmpeg_exe()`` checks its binary by running ``ffmpeg -version``,
    a process start that delays every job's own ffmpeg. The wheel holds one binary for its
    platform; anything else (none, several, IMAGEIO_FFMPEG_EXE set) is left to it.
    """
    import importlib.util

    if os.environ.get("IMAGEIO_FFMPEG_EXE"):
        return None
    try:
        spec = importlib.util.find_spec("imageio_ffmpeg")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "binaries"
    try:
        found = [p for p in folder.iterdir() if p.name.startswith("ffmpeg-") and p.is_file() and os.access(p, os.X_OK)]
    except OSError:
        return None
    return str(found[0]) if len(found) == 1 else None


@dataclass(frozen=True)
class MediaInfo:
    path: str
    width: int
    height: int
    fps: float
    duration: float  # seconds
    frames: int  # counted from the container, or estimated from duration × fps
    has_audio: bool
    video_codec: str
    audio_codec: str | None = None
    # ffmpeg's autorotate steps for the stream's display matrix (see display_transform);
    # width and height above are already the displayed ones, after these steps
    transform: tuple[str, ...] = ()
    coded_width: int = 0
    coded_height: int = 0


def frame_display_matrix(frame: object) -> tuple[int, ...] | None:
    """The 3x3 display matrix (16.16 fixed point, row-major) a decoded frame carries, if any."""
    import av

    side_data = getattr(frame, "side_data", None)
    if not side_data:
        return None
    # Looked up by key: iterating the container yields the entries up to PyAV 18.1.0 and
    # their types from 18.1.1 on (it became a real Mapping); .get() means the same in both.
    sd = side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)  # type: ignore[attr-defined]  # (PyAV's stubs lack the module)
    if sd is None:
        return None
    data = bytes(sd)
    return struct.unpack("<9i", data[:36]) if len(data) >= 36 else None


def display_transform(matrix: Sequence[int] | None) -> tuple[str, ...]:
    """What ffmpeg's autorotate does for ``matrix``, mirrored from fftools (``get_rotation`` and
    ``configure_input_video_filter``): transpose directions ("clock", "cclock", "clock_flip",
    "cclock_flip"), "hflip", "vflip", or "rotate:<degrees clockwise>" for an odd angle.

    Every job reads frames through this (ffmpeg itself, or infer's decoder), so coordinates
    are the displayed ones everywhere.
    """
    if not matrix or len(matrix) < 9:
        return ()
    a, b, _, c, d = (float(v) for v in matrix[:5])
    scale = (math.hypot(a, c), math.hypot(b, d))
    if not all(scale):
        return ()
    # av_display_rotation_get (counter-clockwise), negated and wrapped as get_rotation does
    theta = -round(-math.degrees(math.atan2(b / scale[1], a / scale[0])))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return ("cclock_flip" if matrix[3] > 0 else "clock",)
    if abs(theta - 180) < 1:
        return tuple(step for step, flipped in (("hflip", matrix[0] < 0), ("vflip", matrix[4] < 0)) if flipped)
    if abs(theta - 270) < 1:
        return ("clock_flip" if matrix[3] < 0 else "cclock",)
    if abs(theta) > 1:
        return (f"rotate:{theta:g}",)
    return ("vflip",) if matrix[4] < 0 else ()


def swaps_axes(transform: Sequence[str]) -> bool:
    return any(step in ("clock", "cclock", "clock_flip", "cclock_flip") for step in transform)


# -- media at a URL (docs/storage.md) ----------------------------------------------------------
#
# A media input may be an https:// URL (or a presigned one for an s3:// input; http:// only where
# [storage] allow_http let it through staging). ffmpeg and PyAV range-read it, never with more
# reach than that: only these protocols (no file:, no data:, no subfile:), only these demuxers
# (no HLS/DASH playlist or concat list, which would fetch other hosts), no redirects, and TLS
# verified (PyAV's GnuTLS build does not verify by default and looks for a Red Hat CA path: certifi's).
URL_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ogg,wav,mp3,aac,image2,png_pipe,jpeg_pipe,webp_pipe"


def is_media_url(path: object) -> bool:
    return isinstance(path, str) and path[:8].lower().startswith(("https://", "http://"))


def url_options(path: object) -> dict[str, str]:
    """The demuxer/protocol options for reading ``path`` (empty for a local file): PyAV's ``options``,
    ffmpeg-python's input keyword arguments, or ``-key value`` pairs before ``-i`` (``url_args``)."""
    if not is_media_url(path):
        return {}
    https = str(path)[:8].lower() == "https://"
    options = {
        "protocol_whitelist": "https,tls,tcp" if https else "http,tcp",
        "format_whitelist": URL_DEMUXERS,
        "max_redirects": "0",
    }
    if https:
        import certifi

        options.update(tls_verify="1", ca_file=certifi.where())
    return options


def url_args(path: object) -> list[str]:
    """``url_options`` as ffmpeg command-line arguments, to go right before ``-i path``."""
    return [arg for key, value in url_options(path).items() for arg in (f"-{key}", value)]


def probe(path: str | os.PathLike) -> MediaInfo:
    """Describe a video or image file. Missing or unreadable media is a UsageError (rejected before the job).

    An MP4/MOV is read from its header alone, which is what keeps a short export's start-up
    short; its media is checked by the ffmpeg that reads it (a corrupt one fails the job).
    """
    if is_media_url(path):
        return _probe_av(str(path))  # a few range requests, never the whole file
    p = Path(path)
    if not p.exists():
        raise UsageError(f"input not found: {p}")
    if not p.is_file():
        raise UsageError(f"input is not a file: {p}")
    from synapse_cli.jobs._mp4 import read_header

    try:
        with open(p, "rb") as f:
            header = read_header(f)
    except (OSError, ValueError, IndexError, struct.error):
        header = None  # PyAV says what is wrong with it
    if header is None:
        return _probe_av(p)
    transform = display_transform(header.matrix)
    shown = (header.height, header.width) if swaps_axes(transform) else (header.width, header.height)
    return MediaInfo(
        path=str(p),
        width=shown[0],
        height=shown[1],
        fps=float(header.fps),
        duration=header.duration,
        frames=max(header.frames, 1),
        has_audio=header.has_audio,
        video_codec=header.video_codec,
        audio_codec=header.audio_codec,
        transform=transform,
        coded_width=header.width,
        coded_height=header.height,
    )


def _probe_av(p: Path | str) -> MediaInfo:
    """``probe`` through PyAV: any container and codec it knows (a URL with ``url_options``)."""
    import av

    try:
        with av.open(str(p), options=url_options(p)) as container:
            video = next((s for s in container.streams if s.type == "video"), None)
            audio = next((s for s in container.streams if s.type == "audio"), None)
            if video is None:
                raise UsageError(f"{p} has no video stream")
            rate = video.average_rate or video.guessed_rate or Fraction(25)
            fps = float(rate)
            duration = 0.0
            if video.duration is not None and video.time_base is not None:
                duration = float(video.duration * video.time_base)
            if duration <= 0 and container.duration is not None:
                duration = container.duration / 1_000_000
            frames = int(video.frames or round(duration * fps))
            width, height = video.codec_context.width, video.codec_context.height  # type: ignore[attr-defined]  # (a video stream's context)
            if not width or not height:
                raise UsageError(f"{p}: video stream has no frame size")
            # PyAV exposes the display matrix only on decoded frames: decode the first one
            # (in this same open; a file that probes but does not decode is refused here too)
            try:
                first = next(container.decode(video))
            except StopIteration:
                raise UsageError(f"{p} has no decodable video frames") from None
            transform = display_transform(frame_display_matrix(first))
            shown = (height, width) if swaps_axes(transform) else (width, height)
            return MediaInfo(
                path=str(p),
                width=shown[0],
                height=shown[1],
                fps=fps,
                duration=duration,
                frames=max(frames, 1),
                has_audio=audio is not None,
                video_codec=video.codec_context.name,
                audio_codec=audio.codec_context.name if audio is not None else None,
                transform=transform,
                coded_width=width,
                coded_height=height,
            )
    except UsageError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise UsageError(f"{p} is not readable media: {exc}") from None


def concat_list(listing: Path, pieces: Sequence[str | os.PathLike]) -> Path:
    """Write the concat demuxer's list of ``pieces`` (absolute paths, quotes escaped) to ``listing``; read it
    with ``-f concat -safe 0``. Sharded export and infer join their pieces this way, by stream copy."""
    listing.write_text("".join("file '{}'\n".format(str(Path(p).resolve()).replace("'", "'\\''")) for p in pieces))
    return listing


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # ffmpeg runs in its own group; take the whole group
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def run_ffmpeg(
    args: Sequence[str],
    total_frames: float,
    fps: float,
    phase: str = "encode",
    feed: Callable[[subprocess.Popen], None] | None = None,
) -> Iterator[Progress]:
    """Run ``args`` (a full command, binary first) and yield monotonic frame progress.

    ``-progress pipe:1 -nostats`` is added here. ffmpeg gets its own process
    group, so Ctrl-C reaches only us and we decide its fate: on close or error
    it is killed. ``feed``, if given, writes the child's stdin from a thread.
    """
    stdin_flag = [] if feed else ["-nostdin"]
    # -xerror: a corrupt or truncated input is a failure, not a silently shorter output
    cmd = [args[0], "-hide_banner", "-xerror", *stdin_flag, "-progress", "pipe:1", "-nostats", *args[1:]]
    proc: subprocess.Popen | None = None
    try:  # from the moment it starts, ffmpeg is killed whatever stops us
        with interrupts_held():  # (Ctrl-C landing inside Popen would lose the ffmpeg it has just started)
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        tail: deque[str] = deque(maxlen=40)
        drain = threading.Thread(
            target=lambda: tail.extend(line.decode("utf-8", "replace").rstrip() for line in proc.stderr),  # type: ignore[union-attr]
            daemon=True,
        )
        drain.start()
        feeder_errors: list[BaseException] = []
        feeder = None
        if feed is not None:

            def _feed() -> None:
                try:
                    feed(proc)
                except (BrokenPipeError, ValueError):
                    pass  # ffmpeg stopped reading: its exit status says why
                except BaseException as exc:  # noqa: BLE001 - reported after ffmpeg exits
                    feeder_errors.append(exc)
                finally:
                    try:
                        proc.stdin.close()  # type: ignore[union-attr]
                    except OSError:
                        pass

            feeder = threading.Thread(target=_feed, daemon=True)
            feeder.start()

        done = 0.0
        block: dict[str, str] = {}
        for raw in proc.stdout:  # type: ignore[union-attr]
            key, _, value = raw.decode("utf-8", "replace").strip().partition("=")
            if key != "progress":
                block[key] = value
                continue
            frame = _frames_done(block, fps)  # "progress=end" comes before the exit status: no jump to 100% here
            if frame > done:
                done = min(frame, total_frames) if total_frames else frame
                speed = block.get("speed", "").strip()
                yield Progress(done=done, total=total_frames, phase=phase, message=f"speed {speed}" if speed and speed != "N/A" else None)
            block = {}
        rc = proc.wait()
        drain.join(timeout=5)
        if feeder is not None:
            feeder.join(timeout=5)
        if feeder_errors:
            raise JobError(f"feeding ffmpeg failed: {feeder_errors[0]}")
        if rc != 0:
            raise JobError(f"ffmpeg exited {rc}: {_error_detail(list(tail))}")
        if total_frames and done < total_frames:
            yield Progress(done=total_frames, total=total_frames, phase=phase)
    finally:
        if proc is not None:
            _kill(proc)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs; then handle them, in the order they came.

    Python runs a signal's handler between two bytecodes of the main thread, so Ctrl-C (or the
    SIGTERM that workers turn into ``KeyboardInterrupt``) can land inside ``subprocess.Popen``
    after the child has started and before its object is returned, and nothing could then stop
    that child. Signals reach only the main thread: elsewhere there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[signal.Signals] = []
    saved = {signum: signal.signal(signum, lambda n, _frame: came.append(signal.Signals(n))) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # (None: a handler set outside Python)
        for signum in came:
            signal.raise_signal(signum)  # to the handler it was meant for (KeyboardInterrupt, by default)


_ERROR_WORDS = ("error", "invalid", "corrupt", "failed", "no such", "unable", "cannot", "not found", "does not")


def _error_detail(lines: list[str]) -> str:
    """The lines of ffmpeg's stderr that say what went wrong (its last lines are often encoder statistics)."""
    errors = [ln for ln in lines if any(w in ln.lower() for w in _ERROR_WORDS) and "Conversion failed" not in ln]
    picked = errors[:2] or [ln for ln in lines if ln][-2:]
    return " | ".join(picked) or "no output"


def _frames_done(block: dict[str, str], fps: float) -> float:
    """Frames written so far: ``frame=`` when ffmpeg reports it, else output time × fps."""
    try:
        frame = float(block.get("frame", "0") or 0)
    except ValueError:
        frame = 0.0
    if frame > 0:
        return frame
    for key, scale in (("out_time_us", 1e-6), ("out_time_ms", 1e-6)):  # out_time_ms is microseconds too
        try:
            return float(int(max(0.0, float(block[key]) * scale * fps)))
        except (KeyError, ValueError):
            continue
    return 0.0
