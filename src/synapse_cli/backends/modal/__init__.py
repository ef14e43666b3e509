"""The Modal backend: the same job generators, run by the Modal functions in ``synapse_cli/modal_app.py``.

Files never travel as call arguments (Modal inlines at most 2 MiB): inputs are
uploaded to the shared Volume under a content-hash key (skipped when the key
exists), the job reads and writes ``vol:`` paths, and each output is downloaded
to a temporary file beside the requested one as its ``artifact`` arrives; all are
renamed into place when ``finished`` arrives, or none (``_remote.collect_outputs``).
What the job says about its Volume copies (``/data/inputs/<sha256>/clip.mp4``) is said
about the user's paths (``_remote.StagedNames``).
Reaching Modal (connection, Volume and function lookups) has one budget,
``connect_timeout_s``; a call is retried (stamina) only before its first event.

This is the only module of synapse_cli that imports modal, and it does so
lazily: ``synapse --help`` never pays for it. Modal's exceptions are mapped to
ours here, at the edge.

The package, by concern: ``backend`` (``ModalBackend``: calls), ``detached`` (spawned calls, their
follow and cancel), ``inside`` (a sharded job split and merged in a container), ``credentials`` (where Modal's token comes from, checked before any call), ``errors``
(Modal's exceptions as ours, and a deadline on each step), ``files`` (inputs to the Volume, outputs
back), ``calls`` (a spawned call's progress, webhooks and shard followers).
"""

from synapse_cli.backends.modal.backend import CALL_EVENT, ModalBackend
from synapse_cli.backends.modal.detached import PROGRESS_DICT
from synapse_cli.backends.modal.credentials import credentials_source, require_credentials
from synapse_cli.backends.modal.errors import map_modal_errors

__all__ = ["CALL_EVENT", "PROGRESS_DICT", "ModalBackend", "credentials_source", "map_modal_errors", "require_credentials"]
