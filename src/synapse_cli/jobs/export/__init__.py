"""``synapse export``: video export (framing, overlay, annotate) on FFmpeg.

- ``job``: ``ExportSpec`` and the ``export_video`` generator (plan, then encode with x264).

Its helpers, each one concern:

- ``params``: each job's params as a dataclass, read in Python or, in doubt, by pydantic (``validate_params``).
- ``graph``: what every filter graph shares (the source or a shard's window of it, the ``Plan``, ffmpeg's threads).
- ``framing`` / ``overlay`` / ``annotate``: each job's planner, params -> filter graph.
- ``windows``: the output timeline as source pieces, and a shard's window of it.
- ``shards``: the ``split``/``merge``/``size`` hooks; ``audio``: the ``beside`` hook, the audio encoded once.
- ``_keyframes``: crop-window interpolation between keyframes; ``_timeline``: the timeline in whole frames.
"""

from synapse_cli.config import Setting, choice, optional_text
from synapse_cli.jobs import JobKind

KIND = JobKind(
    name="export",
    spec="synapse_cli.jobs.export.job:ExportSpec",
    run="synapse_cli.jobs.export.job:export_video",
    build="synapse_cli.jobs.export.build:build_spec",
    command="synapse_cli.cli.export:export",
    settings={
        "default_job": Setting("framing", choice("framing", "overlay", "annotate"), "job used when --job is not given"),
        "output_dir": Setting(None, optional_text, "directory for default outputs; default: beside the input"),
    },
    image="media",
    split="synapse_cli.jobs.export.shards:split_export",
    merge="synapse_cli.jobs.export.shards:merge_export",
    size="synapse_cli.jobs.export.shards:export_seconds",
    beside="synapse_cli.jobs.export.audio:encode_audio",
    shard_by="seconds",
    names="synapse_cli.jobs.export.build:export_names",
)
