"""Frames to run the model on: a video (PyAV, decoded in its own thread), an image, or a folder of images.

``inspect_source`` rejects what cannot be read before the job starts (a
UsageError). ``open_frames`` returns an iterator of ``Frame`` with a
``close()`` that stops the decoder; frames the model skips (``--every``) are
decoded (they must be) but not converted to arrays unless the annotated video
needs them.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from synapse_cli.errors import JobError, UsageError
from synapse_cli.jobs._media import display_transform, frame_display_matrix, is_media_url, swaps_axes, url_options

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class SourceInfo:
    path: str
    kind: str  # "video" | "image" | "images"
    width: int
    height: int
    fps: float | None
    duration: float | None
    frames: int
    has_audio: bool = False
    audio_codec: str | None = None
    files: tuple[str, ...] = field(default=(), repr=False)


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height as the job will read the image: OpenCV, which applies EXIF orientation.

    A client without OpenCV (the infer extra runs remotely) checks the file with PyAV instead.
    """
    try:
        import cv2
    except ImportError:
        from synapse_cli.jobs._media import probe

        try:
            info = probe(path)
        except UsageError:
            raise UsageError(f"{path} is not a readable image") from None
        return info.width, info.height
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UsageError(f"{path} is not a readable image")
    return img.shape[1], img.shape[0]


def _first_image_size(files: tuple[str, ...]) -> tuple[int, int]:
    """The size of the first readable image (unreadable ones are skipped with a warning later)."""
    for name in files:
        try:
            return _image_size(Path(name))
        except UsageError:
            continue
    raise UsageError(f"none of the {len(files)} images in {Path(files[0]).parent} is readable")


def inspect_source(source: str) -> SourceInfo:
    """What ``source`` is and its size; unreadable input is a UsageError."""
    if is_media_url(source):  # a video at a URL (an image or a folder there is fetched whole by staging)
        from synapse_cli.jobs._media import probe

        info = probe(source)
        return SourceInfo(source, "video", info.width, info.height, info.fps, info.duration, info.frames, info.has_audio, info.audio_codec)
    p = Path(source)
    if not p.exists():
        raise UsageError(f"input not found: {p}")
    if p.is_dir():
        files = tuple(str(f) for f in sorted(p.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"{p} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        w, h = _first_image_size(files)
        return SourceInfo(str(p), "images", w, h, None, None, len(files), files=files)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        w, h = _image_size(p)
        return SourceInfo(str(p), "image", w, h, None, None, 1, files=(str(p),))
    from synapse_cli.jobs._media import probe

    info = probe(p)
    return SourceInfo(
        str(p), "video", info.width, info.height, info.fps, info.duration, info.frames, info.has_audio, info.audio_codec
    )


@dataclass
class Frame:
    index: int
    timestamp: float | None
    image: Any  # np.ndarray (BGR, HxWx3) or None when not needed
    process: bool  # run the model on it (``--every``)
    name: str | None = None  # the file, for image sources
    error: str | None = None  # an image that could not be read (the frame is skipped)


_END = object()


def _orient(image: Any, transform: tuple[str, ...]) -> Any:
    """Turn a decoded frame upright exactly as ffmpeg's autorotate does (``_media.display_transform``),
    so infer's coordinates are the displayed ones that export's keyframes use."""
    import numpy as np

    for step in transform:
        if step == "clock":
            image = np.rot90(image, -1)
        elif step == "cclock":
            image = np.rot90(image, 1)
        elif step == "cclock_flip":  # a transpose about the main diagonal
            image = image.transpose(1, 0, 2)
        elif step == "clock_flip":
            image = np.rot90(image, -1)[::-1]
        elif step == "hflip":
            image = image[:, ::-1]
        elif step == "vflip":
            image = image[::-1]
        elif step.startswith("rotate:"):  # ffmpeg's rotate filter: clockwise about the centre, same size, black corners
            import cv2

            h, w = image.shape[:2]
            m = cv2.getRotationMatrix2D((w / 2, h / 2), -float(step.partition(":")[2]), 1.0)
            image = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    return np.ascontiguousarray(image) if transform else image


class BgrConverter:
    """Decoded frames to BGR arrays through one reformatter per video, with one scaling thread.

    PyAV 18.1's ``frame.to_ndarray(format="bgr24")`` builds a new reformatter, so a new SwsContext, for every
    frame, with ``threads=0`` (a slice thread per core): a known upstream regression (PyAV issues #2200 and
    #2320, fixed after 18.1.0). Keeping one reformatter gives swscale its cached context; one thread per
    conversion is enough beside the decoder's own threads. The pixels are the same conversion's (the swscale
    call and its flags are unchanged), which ``tests/test_infer_decode.py`` checks against ``to_ndarray``.
    A PyAV without the ``threads`` keyword gets the reformatter alone.

    ``threads`` 0 is swscale's own choice (a thread per core, kept with the context once it is reused). On the
    shared 2-core machine a conversion-only loop ran faster with 0 than with 1 when cores were idle
    (docs/infer.md); in the job the cores are the model's, and on a GPU machine ``bench/infer_decode.py``
    measures 1 against 0 so the default can follow the card's figures.
    """

    def __init__(self, threads: int = 1) -> None:
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()
        self._kwargs: dict[str, Any] = {"format": "bgr24", "threads": int(threads)}

    def __call__(self, frame: Any) -> Any:
        try:
            converted = self._reformatter.reformat(frame, **self._kwargs)
        except TypeError:
            if "threads" not in self._kwargs:
                raise
            del self._kwargs["threads"]  # an older PyAV: no thread count to give
            converted = self._reformatter.reformat(frame, **self._kwargs)
        return converted.to_ndarray()


class VideoFrames:
    """Decodes a video in a background thread, a few frames ahead of the model.

    The first frame is decoded here, synchronously, so a file that probes but
    does not decode is rejected before the job starts, and its display
    rotation (phone videos) is known: frames come out upright and
    ``width``/``height`` are the upright size.
    """

    def __init__(self, path: str, every: int = 1, need_all: bool = False, ahead: int = 4, start: int = 0, stop: int | None = None) -> None:
        import av

        self.path, self.every, self.need_all = path, every, need_all
        self.start, self.stop = max(0, int(start)), stop  # a shard's frames: [start, stop) of the whole video
        try:
            self._container = av.open(path, options=url_options(path))
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"  # let FFmpeg decode with its own threads too
            self._decoded = self._container.decode(stream)
            first = next(self._decoded)
        except StopIteration:
            self._close_container()
            raise UsageError(f"{path} has no decodable video frames") from None
        except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
            self._close_container()
            raise UsageError(f"{path} is not readable media: {exc}") from None
        self.transform = display_transform(frame_display_matrix(first))
        w, h = first.width, first.height
        self.width, self.height = (h, w) if swaps_axes(self.transform) else (w, h)
        tb = stream.time_base
        self._start = float(stream.start_time * tb) if stream.start_time is not None and tb is not None else None
        fps = stream.average_rate or stream.guessed_rate
        self._fps = float(fps) if fps else 25.0
        self._seeked = False
        if self.start > 0 and tb is not None:
            # A shard: seek to the keyframe a second before its first frame, then number the frames by
            # their timestamps (frame index = round(time × fps)), so a shard's indices are the whole video's.
            target = (self._start or 0.0) + max(0.0, (self.start - 0.5) / self._fps - 1.0)
            try:
                self._container.seek(int(target / tb), stream=stream, backward=True)
                self._decoded = self._container.decode(stream)
                first = next(self._decoded)
                self._seeked = True
            except StopIteration:
                self._close_container()
                raise UsageError(f"{path} has no frames after frame {self.start}") from None
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                self._close_container()
                raise UsageError(f"{path}: cannot seek to frame {self.start}: {exc}") from None
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first,), name="synapse-decode", daemon=True)
        self._thread.start()

    def _close_container(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            container.close()

    def _timestamp(self, frame: Any, index: int) -> float:
        t = frame.time
        if t is None:
            return index / self._fps
        if self._start is None:
            self._start = t
        return max(0.0, t - self._start)

    def _index_of(self, frame: Any) -> int:
        """The frame's index in the whole video, from its timestamp (after a seek, counting is not enough)."""
        if frame.time is None:
            return self.start
        return int(round((frame.time - (self._start or 0.0)) * self._fps))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, first: Any) -> None:
        import av

        index = self._index_of(first) if self._seeked else 0
        frame = first
        to_bgr = BgrConverter()
        try:
            while True:
                if self._seeked and frame.time is not None:
                    index = self._index_of(frame)
                if self.stop is not None and index >= self.stop:
                    break
                if index >= self.start:
                    process = index % self.every == 0
                    image = None
                    if process or self.need_all:
                        image = _orient(to_bgr(frame), self.transform)
                    if not self._put(Frame(index, self._timestamp(frame, index), image, process)):
                        return
                index += 1
                frame = next(self._decoded, None)
                if frame is None:
                    break
            self._put(_END)
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self._put(JobError(f"decoding {self.path} failed after frame {index}: {exc}"))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)
        finally:
            self._close_container()

    def __iter__(self) -> Iterator[Frame]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop decoding; safe to call twice and from a generator's cleanup."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=10)


class ImageFrames:
    """An image or a sorted folder of images, read with OpenCV (which applies EXIF orientation)."""

    def __init__(self, files: tuple[str, ...], every: int = 1) -> None:
        self.files, self.every = files, every

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        for index, name in enumerate(self.files):
            process = index % self.every == 0
            image = cv2.imread(name, cv2.IMREAD_COLOR) if process else None
            error = f"{name} is not a readable image; skipped" if process and image is None else None
            yield Frame(index, None, image, process and error is None, name=Path(name).name, error=error)

    def close(self) -> None:
        pass


def open_frames(info: SourceInfo, every: int = 1, need_all: bool = False, start: int = 0, stop: int | None = None) -> VideoFrames | ImageFrames:
    if info.kind == "video":
        return VideoFrames(info.path, every, need_all, start=start, stop=stop)
    return ImageFrames(info.files, every)
