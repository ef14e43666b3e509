"""A loopback relay for one guarded media URL: ffmpeg and PyAV never resolve a stranger's host themselves.

On ``synapse serve`` and in containers, a user's ``https://`` media input is range-read by ffmpeg
and PyAV. Handed the URL itself, they would look its host up again after the guard checked it, and
a DNS answer that changes between the two lookups (DNS rebinding) would reach the server's own
network. So they are handed ``http://127.0.0.1:<port>/<token>/<name>`` instead: this relay answers
there, and makes each request upstream through the guard's client, which resolves the host, checks
every address and connects to a checked one, on every connection. TLS (SNI, the certificate) is
checked against the user's host name, as before.

What goes through: ``GET`` and ``HEAD`` of that one path, with ``Range``/``If-Range``; the status
(200, 206, 416, 404, ...), the length, range, type, ETag and Last-Modified of the answer, and its
body as it comes. A redirect is not followed (the reader sees a 502). A refused address ends the
relay's work: every request gets a 502, and ``refused`` says why, for the job's error message.
"""

from __future__ import annotations

import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

from synapse_cli.netguard import Guard, RefusedURL, redact

FORWARDED_REQUEST = ("Range", "If-Range")
FORWARDED_RESPONSE = ("Content-Length", "Content-Range", "Content-Type", "Accept-Ranges", "ETag", "Last-Modified")


class Relay:
    """``with Relay(guard, url) as relay:`` ffmpeg reads ``relay.url``; the upstream is ``url``, through ``guard``."""

    def __init__(self, guard: Guard, url: str) -> None:
        self.upstream = url
        # the same admission rules, without the whole-response caps: a media input is read in windows, for as long as the job runs
        self.guard = Guard(allow_hosts=guard.allow_hosts, allow_http=guard.allow_http, max_bytes=None, max_seconds=None,
                           connect_timeout_s=guard.connect_timeout_s, resolver=guard.resolver)  # fmt: skip
        self.refused: str | None = None
        self._client: Any = None
        self._server: ThreadingHTTPServer | None = None
        name = PurePosixPath(urlsplit(url).path).name or "input"
        self.path = f"/{secrets.token_hex(16)}/{quote(name)}"
        self.url = ""

    def start(self) -> "Relay":
        self.guard.check_url(self.upstream, "input")
        self._client = self.guard.client()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{self.path}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="synapse-relay", daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "Relay":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def forward(self, method: str, headers: dict[str, str]) -> Any:
        """The upstream response (streamed; the caller closes it), or None once an address was refused."""
        import httpx

        if self.refused is not None:
            return None
        try:
            return self._client.send(self._client.build_request(method, self.upstream, headers=headers), stream=True)
        except RefusedURL as exc:
            self.refused = str(exc)
            return None
        except httpx.HTTPError:
            return None


def _handler(relay: Relay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: ffmpeg makes a request per seek
        disable_nagle_algorithm = True  # else each response's body waits for the ACK of its headers (40 ms a request)

        def do_GET(self) -> None:
            self._relay("GET")

        def do_HEAD(self) -> None:
            self._relay("HEAD")

        def _relay(self, method: str) -> None:
            if self.path != relay.path:
                self._status(404)
                return
            response = relay.forward(method, {k: v for k in FORWARDED_REQUEST if (v := self.headers.get(k))})
            if response is None or response.is_redirect:
                if response is not None:
                    response.close()
                self._status(502)
                return
            try:
                self.send_response(response.status_code)
                for name in FORWARDED_RESPONSE:
                    if name in response.headers:
                        self.send_header(name, response.headers[name])
                if "Content-Length" not in response.headers:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if method == "GET":
                    for chunk in response.iter_raw():
                        self.wfile.write(chunk)
            except (ConnectionError, OSError):  # the reader had what it needed and hung up (a seek)
                self.close_connection = True
            except Exception:  # noqa: BLE001 - the upstream broke mid-body: the reader sees a short answer
                self.close_connection = True
            finally:
                response.close()

        def _status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # no access log on stderr: the URL carries the relay's token

    return Handler


def refused_message(relays: list[Relay]) -> str | None:
    """Why the first relay that met a refused address stopped, naming the user's URL (redacted)."""
    for relay in relays:
        if relay.refused is not None:
            return f"input {redact(relay.upstream)}: {relay.refused}"
    return None
