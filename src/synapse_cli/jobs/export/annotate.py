"""annotate's filter graph: rated clips, each framed in its rating's colour with its title and notes, joined."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from synapse_cli.jobs._media import MediaInfo
from synapse_cli.jobs.export.graph import Plan, Window, open_source, write_text
from synapse_cli.jobs.export.params import AnnotateParams
from synapse_cli.jobs.export.windows import annotate_pieces

RATING_COLORS = {"!!": "0x1baca6", "!": "0x5c8bb0", "!?": "0xe6c229", "?": "0xe58f2a", "??": "0xca3431"}


def plan_annotate(p: AnnotateParams, info: MediaInfo, workdir: Path, window: Optional[Window] = None) -> Plan:
    import ffmpeg

    logs: list[str] = []
    pieces = annotate_pieces(p, info, logs)
    if window is not None:
        pieces = list(window.pieces)
    clips = [(p.clips[i], start, end) for i, start, end, _ in pieces]
    source, source_audio = open_source(info, window)
    has_audio = source_audio is not None
    vsplit = source.filter_multi_output("split", len(clips))
    asplit = source_audio.filter_multi_output("asplit", len(clips)) if source_audio is not None else None
    parts: list[Any] = []
    for i, (c, start, end) in enumerate(clips):
        v = vsplit[i].trim(start=start, end=end).setpts("PTS-STARTPTS")
        color = RATING_COLORS.get(c.rating or "", "0x808080")
        if p.border:
            v = v.drawbox(0, 0, "iw", "ih", color=color, thickness=p.border)
        common = dict(fontcolor="white", box=1, boxcolor="black@0.55", boxborderw=10, expansion="none")
        if c.title or c.rating:
            title = f"{c.rating}  {c.title}".strip() if c.rating else c.title
            v = v.drawtext(textfile=write_text(workdir, f"title{i}.txt", title), fontsize="h/16", x=f"{p.border}+24", y=f"{p.border}+24", **common)
        if c.notes:
            v = v.drawtext(textfile=write_text(workdir, f"notes{i}.txt", c.notes), fontsize="h/28", x=f"{p.border}+24", y=f"h-th-{p.border}-30", **common)
        parts.append(v)
        if asplit is not None:
            parts.append(asplit[i].filter("atrim", start=start, end=end).filter("asetpts", "PTS-STARTPTS"))
    joined = ffmpeg.concat(*parts, n=len(clips), v=1, a=1 if has_audio else 0)
    video, audio = (joined.node[0], joined.node[1]) if has_audio else (joined, None)
    duration = sum(end - start for _, start, end in clips)
    return Plan(video, audio, duration, info.width, info.height, logs)
