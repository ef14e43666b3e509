"""``synapse export``: video export (framing, overlay, annotate) on FFmpeg.

- ``job``: ``ExportSpec``, the params models and planners, and the ``export_video`` generator.
- ``_keyframes``: crop-window interpolation between keyframes.
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
    split="synapse_cli.jobs.export.job:split_export",
    merge="synapse_cli.jobs.export.job:merge_export",
    size="synapse_cli.jobs.export.job:export_seconds",
    beside="synapse_cli.jobs.export.job:encode_audio",
    shard_by="seconds",
    names="synapse_cli.jobs.export.build:export_names",
)
