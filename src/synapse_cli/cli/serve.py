from __future__ import annotations

import ipaddress
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

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
        # info's protocol (IPPROTO_TCP), not 0: asyncio turns Nagle's algorithm off only for sockets that say
        # they are TCP, and with it on, each keep-alive response's body waited 40 ms for the client's delayed ACK
        sock = socket.socket(info[0], socket.SOCK_STREAM, info[2])
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

    The API key comes from SYNAPSE_API_KEY (clients send it as "Authorization: Bearer KEY"). Without
    one the server binds only to a loopback address, generates a key for this run, prints it once and
    writes it to a file only you can read (synapse clients on this machine pick it up). See
    docs/http.md and docs/security.md.

    Example: SYNAPSE_API_KEY=$(openssl rand -hex 24) synapse serve --host 0.0.0.0 --port 8000
    """
    from synapse_cli.cli._run import exit_on_error
    from synapse_cli.config import load_settings
    from synapse_cli.protocol import MIN_KEY_CHARS

    with exit_on_error():
        flags = {"serve.host": host, "serve.port": port, "serve.work_dir": str(work_dir) if work_dir else None}
        settings = load_settings(flags, config, profile)
        host_, port_ = settings["serve.host"], settings["serve.port"]
        key = settings["api_key"]
        if not key and not is_loopback(host_):
            raise UsageError(f"refusing to serve on {host_} without an API key: set SYNAPSE_API_KEY, or bind to 127.0.0.1")
        if key and len(key) < MIN_KEY_CHARS:
            raise UsageError(f"the API key (SYNAPSE_API_KEY) is {len(key)} characters long; use at least {MIN_KEY_CHARS} (e.g. openssl rand -hex 24)")
        import secrets

        import uvicorn

        from synapse_cli.server import create_app
        from synapse_cli.protocol import write_key

        configured = settings["serve.work_dir"]
        root = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="synapse-serve-"))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create work dir {root}: {exc.strerror}") from None
        sock = _bind(host_, port_)
        key_file: Path | None = None
        opts = None
        try:
            bound = sock.getsockname()[1]
            generated = not key
            if generated:  # a keyless loopback server can be driven by any web page its user opens
                key = secrets.token_urlsafe(32)
                key_file = write_key(bound, key)
            app = create_app(settings, work_dir=root, api_key=key)
            opts = app.state.synapse
            shown = f"[{host_}]" if ":" in host_ else host_
            print(f"synapse serve: listening on http://{shown}:{bound} (work dir {root}; API key required)", file=sys.stderr, flush=True)
            if generated:
                print(f"synapse serve: API key for this run: {key} (also in {key_file}, readable by you only)", file=sys.stderr, flush=True)
            config = uvicorn.Config(
                app, log_config=_log_config(), log_level="info", timeout_graceful_shutdown=5, lifespan="on",
                limit_concurrency=LIMIT_CONNECTIONS, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
            )
            # uvicorn re-raises SIGTERM once it has stopped, which would end the process before the
            # jobs are stopped and the key file removed: a handler of ours takes it instead
            previous = signal.signal(signal.SIGTERM, lambda *_: None)
            try:
                _Server(config, opts).run(sockets=[sock])
            finally:
                signal.signal(signal.SIGTERM, previous)
        finally:
            sock.close()
            if opts is not None and not opts.shutdown(timeout_s=10):
                print("synapse serve: some jobs did not stop within 10 s", file=sys.stderr, flush=True)
            if key_file is not None:
                key_file.unlink(missing_ok=True)
            if not configured:
                shutil.rmtree(root, ignore_errors=True)


LIMIT_CONNECTIONS = 256  # open connections (streams included) before uvicorn answers 503


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGTERM/SIGINT also stop every job at once (their ffmpeg included):
        each stream ends with an error line, so the graceful shutdown does not wait on them."""

        def __init__(self, config: Any, opts: Any) -> None:
            super().__init__(config)
            self._opts = opts

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            import threading

            # not in the signal handler itself: cancelling takes locks the interrupted code may hold
            threading.Thread(target=self._opts.cancel_all, name="synapse-shutdown", daemon=True).start()

    return Server


def _Server(config: Any, opts: Any) -> Any:
    return _server_class()(config, opts)
