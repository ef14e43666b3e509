"""What the HTTP client and ``synapse serve`` share: media types, and where the server's generated key lives.

The client (``backends/http/``) imports this module, never anything under ``server/`` (which
needs FastAPI). Imports nothing heavy.

The key file: ``synapse serve`` writes the API key it generated (as Jupyter writes its token), one
file per port: ``$XDG_RUNTIME_DIR/synapse/serve-<port>.key``, else
``$XDG_DATA_HOME/synapse/runtime/serve-<port>.key`` (``~/.local/share/synapse/runtime/...``); the
folder is 0700 and the file 0600. The HTTP client reads it when ``SYNAPSE_API_KEY`` is unset and the
endpoint is on this machine's loopback.
"""

from __future__ import annotations

import os
from pathlib import Path

NDJSON = "application/x-ndjson"  # a job's events, one JSON object a line (the stream --json prints)
SSE = "text/event-stream"  # the same events for an EventSource (GET /v1/jobs/{id}/events)
DIR_TAR = "application/x-synapse-dir+tar"  # a multipart part holding a directory input, as an uncompressed tar
MIN_KEY_CHARS = 16  # the shortest API key synapse serve takes (and generates longer ones)


def is_loopback_host(host: str) -> bool:
    """``localhost``, or an address in 127.0.0.0/8 or ::1 (no port; brackets allowed)."""
    import ipaddress

    host = host.strip().lower().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def runtime_dir(env: "os._Environ[str] | dict[str, str] | None" = None) -> Path:
    env = os.environ if env is None else env
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "synapse"
    data = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "share")
    return Path(data) / "synapse" / "runtime"


def key_path(port: int, env: "os._Environ[str] | dict[str, str] | None" = None) -> Path:
    return runtime_dir(env) / f"serve-{int(port)}.key"


def write_key(port: int, key: str) -> Path:
    """Write ``key`` to ``key_path(port)``, readable by this user only."""
    path = key_path(port)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return path


def read_key(port: int) -> str | None:
    """The key a local ``synapse serve`` on ``port`` generated, if this user can read it."""
    try:
        key = key_path(port).read_text().strip()
    except OSError:
        return None
    return key or None
