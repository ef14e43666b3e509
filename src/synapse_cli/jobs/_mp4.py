"""An MP4/MOV file's stream facts, read from its header (the ``moov`` box) in pure Python.

``_media.probe`` asks this first: reading a few kilobytes of boxes costs next to nothing,
where PyAV costs its import (the largest part of a short export's start-up) and a decoded
frame (which the display matrix used to come from). The display matrix is the track
header's own (``tkhd``), which is where ffmpeg takes the side data it attaches to frames.

Only the plain case is read here, and it reads as libavformat's mov demuxer does: one
edit (or none), a known codec, no fragments, no movie-level matrix. Anything else answers
``None`` and the caller asks PyAV, so an unusual file costs what it always did.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Iterator

# sample entry four-cc -> the decoder name PyAV reports (codec_context.name)
VIDEO_CODECS = {
    b"avc1": "h264", b"avc3": "h264", b"hvc1": "hevc", b"hev1": "hevc", b"av01": "av1", b"vp09": "vp9",
    b"apch": "prores", b"apcn": "prores", b"apcs": "prores", b"apco": "prores", b"ap4h": "prores", b"ap4x": "prores",
}  # fmt: skip
AUDIO_CODECS = {b"Opus": "opus", b"ac-3": "ac3", b"ec-3": "eac3", b"fLaC": "flac", b"alac": "alac"}
# mp4a: the MPEG-4 object type in its esds says which codec it is
MP4A_OBJECT_TYPES = {0x40: "aac", 0x66: "aac", 0x67: "aac", 0x68: "aac", 0x69: "mp3float", 0x6B: "mp3float"}
PCM = {(b"sowt", 16): "pcm_s16le", (b"twos", 16): "pcm_s16be"}

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}
_TOP_LEVEL = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"meta"}
_IDENTITY = (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_MAX_MOOV = 64 << 20  # a longer index is read by PyAV


@dataclass
class Track:
    handler: bytes = b""
    matrix: tuple[int, ...] = _IDENTITY
    timescale: int = 0
    duration: int = 0  # in timescale units (mdhd)
    fourcc: bytes = b""
    width: int = 0
    height: int = 0
    sample_bits: int = 0
    object_type: int | None = None
    stts: tuple[tuple[int, int], ...] = ()
    samples: int = 0
    edits: tuple[tuple[int, int, int], ...] = ()  # (segment duration in movie units, media time, rate)
    fragmented: bool = False


@dataclass(frozen=True)
class Header:
    """The facts ``probe`` needs, as libavformat reports them for this file."""

    width: int
    height: int
    fps: Fraction
    duration: float
    frames: int
    video_codec: str
    audio_codec: str | None
    has_audio: bool
    matrix: tuple[int, ...]


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each box in ``data[start:end]``."""
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, at)
        head = 8
        if size == 1:
            if at + 16 > end:
                raise ValueError("truncated box header")
            size, head = struct.unpack_from(">Q", data, at + 8)[0], 16
        elif size == 0:
            size = end - at
        if size < head or at + size > end:
            raise ValueError(f"bad {kind!r} box size")
        yield kind, at + head, at + size
        at += size


def _find_moov(f: BinaryIO) -> bytes | None:
    """The ``moov`` payload, wherever it is in the file (before or after the media); None if this is not an
    MP4/MOV, or if any top-level box runs past the end of the file (a truncated download or copy: PyAV, which
    decodes a frame, judges it)."""
    f.seek(0, 2)
    size = f.tell()
    at = 0
    first = True
    moov = None
    while at + 8 <= size:
        f.seek(at)
        head = f.read(16)
        if len(head) < 8:
            return None
        length, kind = struct.unpack_from(">I4s", head)
        header = 8
        if length == 1 and len(head) == 16:
            length, header = struct.unpack_from(">Q", head, 8)[0], 16
        elif length == 0:
            length = size - at
        if first and kind not in _TOP_LEVEL:
            return None
        first = False
        if length < header or at + length > size:
            return None
        if kind == b"moov":
            if length - header > _MAX_MOOV:
                return None
            moov = f.read(length - header) if header == 16 else head[8:] + f.read(length - header - 8)
        at += length
    return moov if at == size else None


def _full(data: bytes, at: int) -> int:
    return data[at]  # a full box's version (its flags follow)


def _read_track(data: bytes, start: int, end: int, track: Track) -> None:
    for kind, a, b in _boxes(data, start, end):
        if kind in _CONTAINERS:
            _read_track(data, a, b, track)
        elif kind == b"tkhd":
            skip = 4 + (32 if _full(data, a) == 1 else 20) + 16  # times, id, duration; reserved, layer, group, volume
            track.matrix = struct.unpack_from(">9i", data, a + skip)
        elif kind == b"mdhd":
            if _full(data, a) == 1:
                track.timescale, track.duration = struct.unpack_from(">IQ", data, a + 20)
            else:
                track.timescale, track.duration = struct.unpack_from(">II", data, a + 12)
        elif kind == b"hdlr" and not track.handler:  # the media's handler; a QuickTime minf has a data handler too
            track.handler = data[a + 8 : a + 12]
        elif kind == b"stsd":
            _read_sample_entry(data, a + 8, b, track)
        elif kind == b"stts":
            (count,) = struct.unpack_from(">I", data, a + 4)
            track.stts = tuple(struct.iter_unpack(">II", data[a + 8 : a + 8 + 8 * count]))
        elif kind == b"stsz":
            track.samples = struct.unpack_from(">I", data, a + 8)[0]
        elif kind == b"stz2":
            track.samples = struct.unpack_from(">I", data, a + 8)[0]
        elif kind == b"elst":
            version = _full(data, a)
            (count,) = struct.unpack_from(">I", data, a + 4)
            form, step = (">Qqi", 20) if version == 1 else (">Iii", 12)
            track.edits = tuple(struct.unpack_from(form, data, a + 8 + step * i) for i in range(count))


def _read_sample_entry(data: bytes, start: int, end: int, track: Track) -> None:
    """The first sample description: its four-cc, and the frame size or the audio codec details."""
    for kind, a, b in _boxes(data, start, end):
        track.fourcc = kind
        if track.handler == b"vide":
            track.width, track.height = struct.unpack_from(">HH", data, a + 24)
        elif track.handler == b"soun":
            version = struct.unpack_from(">H", data, a + 8)[0]
            track.sample_bits = struct.unpack_from(">H", data, a + 18)[0]
            children = a + 28 + {0: 0, 1: 16, 2: 36}.get(version, 0)
            if kind == b"mp4a":
                for child, c, d in _boxes(data, children, b):
                    if child == b"esds":
                        track.object_type = _object_type(data, c + 4, d)
        return


def _object_type(data: bytes, at: int, end: int) -> int | None:
    """The objectTypeIndication of an esds box's DecoderConfigDescriptor."""

    def descriptor(at: int) -> tuple[int, int, int]:
        tag, at, size = data[at], at + 1, 0
        for _ in range(4):
            byte = data[at]
            at += 1
            size = size << 7 | byte & 0x7F
            if not byte & 0x80:
                break
        return tag, at, size

    tag, at, _ = descriptor(at)
    if tag != 3:  # ES_Descriptor: id, flags, then optional fields
        return None
    flags = data[at + 2]
    at += 3
    if flags & 0x80:
        at += 2
    if flags & 0x40:
        at += 1 + data[at]
    if flags & 0x20:
        at += 2
    tag, at, _ = descriptor(at)
    return data[at] if tag == 4 and at < end else None


def read_header(f: BinaryIO) -> Header | None:
    """The stream facts of an MP4/MOV file, or None where this reader would not match libavformat."""
    moov = _find_moov(f)
    if moov is None:
        return None
    movie_timescale, tracks = 0, []
    for kind, a, b in _boxes(moov, 0, len(moov)):
        if kind == b"mvhd":
            v1 = _full(moov, a) == 1
            movie_timescale = struct.unpack_from(">I", moov, a + (20 if v1 else 12))[0]
            if struct.unpack_from(">9i", moov, a + (48 if v1 else 36)) != _IDENTITY:  # after times, rate, volume
                return None  # ffmpeg composes a movie matrix with the track's: leave that to it
        elif kind == b"mvex":
            return None  # fragmented: the samples are in the fragments
        elif kind == b"trak":
            track = Track()
            _read_track(moov, a, b, track)
            tracks.append(track)
    video = next((t for t in tracks if t.handler == b"vide"), None)
    audio = next((t for t in tracks if t.handler == b"soun"), None)
    if video is None or video.fourcc not in VIDEO_CODECS or not video.timescale or not movie_timescale:
        return None
    if not video.samples or not video.stts or sum(n for n, _ in video.stts) != video.samples:
        return None
    if len(video.stts) > 1 and video.stts[-1][0] == 1:
        return None  # a lone last sample: ffmpeg may take its duration for a bogus one and recompute the rate
    if not video.width or not video.height:
        return None
    audio_codec = None
    if audio is not None:
        if audio.fourcc == b"mp4a":
            audio_codec = MP4A_OBJECT_TYPES.get(audio.object_type or -1)
        else:
            audio_codec = AUDIO_CODECS.get(audio.fourcc) or PCM.get((audio.fourcc, audio.sample_bits))
        if audio_codec is None:
            return None
    duration = _stream_duration(video, movie_timescale)
    if not duration or not sum(n * delta for n, delta in video.stts):
        return None  # ffmpeg falls back to the container's duration, or guesses a rate
    return Header(
        width=video.width,
        height=video.height,
        fps=_average_rate(video),
        duration=duration / video.timescale,
        frames=video.samples,
        video_codec=VIDEO_CODECS[video.fourcc],
        audio_codec=audio_codec,
        has_audio=audio is not None,
        matrix=video.matrix,
    )


def _average_rate(track: Track) -> Fraction:
    """libavformat's avg_frame_rate for an mp4 track: samples over the summed sample durations."""
    return Fraction(track.timescale * track.samples, sum(n * delta for n, delta in track.stts))


def _stream_duration(track: Track, movie_timescale: int) -> int | None:
    """The stream's duration in its own timescale, as libavformat sets it; None for an edit list it would rework.

    One edit that starts the media at or after its first sample and runs at least to its
    end leaves the media's duration as it is (ffmpeg keeps the shorter of the two); an
    edit that cuts the end, an empty edit (an offset) or several edits are left to PyAV.
    """
    if not track.edits:
        return track.duration
    if len(track.edits) != 1:
        return None
    segment, media_time, rate = track.edits[0]
    if rate != 0x10000 or media_time < 0 or segment * track.timescale < track.duration * movie_timescale:
        return None
    return track.duration
