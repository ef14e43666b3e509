"""A sharded export's audio: encoded once over the whole timeline, beside the shards (the ``beside`` hook)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from synapse_cli.events import Event
from synapse_cli.jobs._media import MediaInfo, find_ffmpeg, probe, run_ffmpeg, url_options
from synapse_cli.jobs.export.graph import atempo_chain, threaded
from synapse_cli.jobs.export.params import validate_params
from synapse_cli.jobs.export.windows import output_pieces

if TYPE_CHECKING:
    from synapse_cli.jobs.export.job import ExportSpec


def _keeps_timeline(job: str, params: Any) -> bool:
    """Whether the job's output timeline is the input's, as it is: its planner passes the audio through."""
    return job == "overlay" or (job == "framing" and not params.segments)


def _audio_graph(pieces: list[tuple[int, float, float, float]], info: MediaInfo, whole: bool) -> Any:
    """The output's audio alone: the pieces cut, re-timed and joined exactly as the whole export does
    (``whole``: the input's audio as it is, as the planners of jobs that keep the timeline take it)."""
    import ffmpeg

    src = ffmpeg.input(info.path, **url_options(info.path))
    if whole:
        return src.audio
    split = src.audio.filter_multi_output("asplit", len(pieces))
    parts = [
        atempo_chain(split[k].filter("atrim", start=s, end=e).filter("asetpts", "PTS-STARTPTS"), v)
        for k, (_, s, e, v) in enumerate(pieces)
    ]
    return ffmpeg.concat(*parts, n=len(parts), v=0, a=1)


AUDIO_PIECE = "audio.m4a"
COPYABLE_AUDIO = frozenset({"aac"})  # what an MP4 output carries as it is, in every player


def audio_encoding(audio: Any, info: MediaInfo) -> dict[str, Any]:
    """ffmpeg output options for the output's audio: copied when the job leaves it untouched, else AAC.

    The audio is untouched when it comes straight from the input, with no filter between (no
    segment cut or re-timed, no clips joined), and the input's codec is one an MP4 carries:
    then its packets are copied, losing nothing and costing no encode (2.6 CPU seconds per
    minute of stereo AAC), the same whether the export is sharded or not.
    """
    import ffmpeg

    if isinstance(audio.node, ffmpeg.nodes.InputNode) and info.audio_codec in COPYABLE_AUDIO:
        return {"acodec": "copy"}
    return {"acodec": "aac", "audio_bitrate": "160k"}


def encode_audio(spec: ExportSpec, workdir: Path) -> Iterator[Event]:
    """The sharded output's audio, encoded once over the whole timeline into ``workdir/audio.m4a``.

    The kind's ``beside`` hook: it runs while the shards encode their video-only pieces, so
    the merge only joins. Written to a temporary name and renamed, so the merge never takes a
    half-written file for a finished one. Nothing is written for an input without audio.
    """
    import ffmpeg

    params = validate_params(spec.job, spec.params)
    info = probe(spec.input)
    if not info.has_audio:
        return
    pieces = output_pieces(spec.job, params, info)
    duration = sum((e - s) / v for _, s, e, v in pieces)
    partial = workdir / f".{AUDIO_PIECE}.partial.m4a"
    audio = _audio_graph(pieces, info, _keeps_timeline(spec.job, params))
    args = ffmpeg.output(audio, str(partial), **audio_encoding(audio, info))
    yield from run_ffmpeg(threaded(args.compile(cmd=find_ffmpeg(spec.ffmpeg), overwrite_output=True), spec.threads),
                          max(1, int(duration * info.fps)), info.fps, phase="audio")  # fmt: skip
    partial.replace(workdir / AUDIO_PIECE)
