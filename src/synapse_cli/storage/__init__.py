"""Data where it lives: ``s3://`` and ``https://`` inputs and outputs (docs/storage.md).

- ``urls``: which values are URLs, bucket/key/prefix, the scheme rules, redaction.
- ``client``: ``Storage``, obstore behind one class (head, presign, download, list, upload).
- ``staging``: ``staged(kind, spec, settings, run)`` wraps a job's events where the job runs:
  URL inputs become presigned/plain URLs (media, range-read by ffmpeg/PyAV) or temp files
  (small inputs); URL outputs are written to temp files and uploaded once the job succeeded.

No typer, rich or modal here: Modal containers and the server import it.
"""

from synapse_cli.storage.urls import ObjectURL, check_url, is_url, parse_s3, redact, redact_text

__all__ = ["ObjectURL", "check_url", "is_url", "parse_s3", "redact", "redact_text"]
