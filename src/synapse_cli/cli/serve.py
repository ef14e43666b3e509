from __future__ import annotations

import ipaddress
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from synapse_cli.cli._options import CONFIG, PROFILE
from synapse_cli.errors import UsageError


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a busy port is one line and exit 2 (and --port 0 works)."""
    try:
        info = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _log_config() -> dict:
    """uvicorn's logging, with the access log on stderr too: stdout is for results only."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def serve(
    host: Annotated[Optional[str], typer.Option("--host", help="Address to bind (default: serve.host, 127.0.0.1).", show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port (default: serve.port, 8000; 0 picks a free one).", show_default=False)] = None,
    work_dir: Annotated[
        Optional[Path], typer.Option("--work-dir", help="Where jobs run and outputs wait for download (default: serve.work_dir, else a temp dir).", file_okay=False, show_default=False)
    ] = None,
    config: CONFIG = None,
    profile: PROFILE = None,
) -> None:
    """Serve every job kind over HTTP: POST /v1/jobs/{kind} streams the job's events as NDJSON.

    The API key comes from SYNAPSE_API_KEY (clients send it as "Authorization: Bearer KEY"). Without a
    key the server only binds to a loopback address. See docs/http.md.

    Example: SYNAPSE_API_KEY=$(openssl rand -hex 24) synapse serve --host 0.0.0.0 --port 8000
    """
    from synapse_cli.cli._run import exit_on_error
    from synapse_cli.config import load_settings

    with exit_on_error():
        flags = {"serve.host": host, "serve.port": port, "serve.work_dir": str(work_dir) if work_dir else None}
        settings = load_settings(flags, config, profile)
        host_, port_ = settings["serve.host"], settings["serve.port"]
        key = settings["api_key"]
        if not key and not is_loopback(host_):
            raise UsageError(f"refusing to serve on {host_} without an API key: set SYNAPSE_API_KEY, or bind to 127.0.0.1")
        import uvicorn

        from synapse_cli.server import create_app

        configured = settings["serve.work_dir"]
        root = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="synapse-serve-"))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create work dir {root}: {exc.strerror}") from None
        sock = _bind(host_, port_)
        try:
            app = create_app(settings, work_dir=root, allow_anonymous=not key)
            bound = sock.getsockname()[1]
            shown = f"[{host_}]" if ":" in host_ else host_
            auth = "API key required" if key else "no API key: loopback only"
            print(f"synapse serve: listening on http://{shown}:{bound} (work dir {root}; {auth})", file=sys.stderr, flush=True)
            server = uvicorn.Server(uvicorn.Config(app, log_config=_log_config(), log_level="info", timeout_graceful_shutdown=5, lifespan="off"))
            server.run(sockets=[sock])
        finally:
            sock.close()
            if not configured:
                shutil.rmtree(root, ignore_errors=True)


def register(root: typer.Typer) -> None:
    root.command("serve")(serve)
