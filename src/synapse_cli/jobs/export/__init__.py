"""synapse export: the export job (framing, overlay, annotate) on FFmpeg, with its private helpers."""
