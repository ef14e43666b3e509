"""A real S3-protocol server (moto's threaded server) and a plain HTTP server on loopback, started by the suite.

``s3_server`` (session): moto behind a WSGI wrapper that records every request and the body
bytes it served, so a test can say how much of an object a job read. ``s3`` (per test): a fresh
bucket and the environment a job needs to reach it (``AWS_*`` credentials, ``[storage]``
endpoint, path-style, plain http allowed on loopback).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "AKIASYNAPSETESTKEY01"
SECRET_KEY = "synapseTestSecret/NeverPrinted+42"


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    bytes: int


@dataclass
class S3Server:
    endpoint: str
    port: int
    requests: list[Served] = field(default_factory=list)
    # while set, a multipart part waits (at most a minute) for it to be cleared before moto reads it: a test
    # that kills an upload holds its parts, so no scheduling can let the upload finish before the signal lands
    parts_held: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self, key_suffix: str, method: str = "GET") -> list[Served]:
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path.split("?")[0].endswith(key_suffix)]

    def make_bucket(self) -> str:
        import httpx

        name = "b" + uuid.uuid4().hex[:12]
        assert httpx.put(f"{self.endpoint}/{name}").status_code == 200
        return name


# What a reader may hold received but not yet read before the server writes more. The kernel grows a
# reader's receive buffer as it reads (up to tcp_rmem's maximum, 32 MiB on these machines), so a reader that
# stops to think (ffmpeg encoding the frames it has) could otherwise be sent megabytes it never reads, and a
# count of what was written would say it read them.
UNREAD_MAX = 256 * 1024


class _Unread:
    """The bytes a loopback reader has received and not read: its socket's receive queue, asked of the kernel
    by sock_diag (netlink: one lookup of that socket, microseconds) or, where netlink is refused, read from
    /proc/net/tcp (the kernel walks its whole socket table to write that file: about a millisecond a read,
    and a big reader is asked once per 16 KiB piece). Where neither can be read, nothing is waited for."""

    def __init__(self, server_port: int, client_addr: str | None, client_port: str | None) -> None:
        self.server_port = server_port
        self.client = (client_addr or "127.0.0.1", int(client_port)) if client_port else None
        # /proc/net/tcp names the reader's socket by its local and remote address, the ports in hex
        self.key = f":{int(client_port):04X} 0100007F:{server_port:04X}" if client_port else None
        self._netlink: socket.socket | None = None
        self._request = b""
        if self.client:
            try:
                self._netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
                self._request = _diag_request(*self.client, self.server_port)
            except (OSError, AttributeError, ValueError):  # no AF_NETLINK here, or an address not IPv4
                self._netlink = None

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()

    def queued(self) -> int | None:
        if self._netlink is not None:
            try:
                self._netlink.send(self._request)
                reply = self._netlink.recv(4096)
            except OSError:
                self._netlink.close()
                self._netlink = None
            else:
                if struct.unpack_from("=H", reply, 4)[0] == _NLMSG_ERROR:  # ENOENT: the reader has gone
                    return None
                return struct.unpack_from("=I", reply, _RQUEUE_AT)[0]
        return self._queued_proc()

    def _queued_proc(self) -> int | None:
        try:
            with open("/proc/net/tcp") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and f"{fields[1]} {fields[2]}".endswith(self.key or "-"):
                        return int(fields[4].split(":")[1], 16)
        except OSError:
            pass
        return None

    def wait_below(self, limit: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.key and (queued := self.queued()) is not None and queued > limit and time.monotonic() < deadline:
            time.sleep(0.002)


# sock_diag (linux/inet_diag.h): a request for the one TCP socket with these addresses and ports, any state,
# no cookie; the reply's inet_diag_msg carries idiag_rqueue, what /proc/net/tcp shows as rx_queue.
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, _NLMSG_ERROR = 4, 20, 1, 2
_RQUEUE_AT = 16 + 4 + 48 + 4  # nlmsghdr, family/state/timer/retrans, inet_diag_sockid, idiag_expires


def _diag_request(addr: str, port: int, server_port: int) -> bytes:
    loopback = socket.inet_aton("127.0.0.1")
    body = (struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + struct.pack("!HH", port, server_port) + socket.inet_aton(addr) + bytes(12) + loopback + bytes(12)
            + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))  # fmt: skip
    return struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body


class _Counting:
    """WSGI middleware: what each request asked for and how many body bytes went back."""

    def __init__(self, app: Any, server: S3Server) -> None:
        self.app, self.server = app, server

    def __call__(self, environ: dict, start_response: Any) -> Any:
        record = Served(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE"), 0)
        with self.server.lock:
            self.server.requests.append(record)
        if record.method == "PUT" and "partNumber=" in environ.get("QUERY_STRING", ""):
            deadline = time.monotonic() + 60
            while self.server.parts_held.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        body = self.app(environ, start_response)
        reader = _Unread(self.server.port, environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"))
        try:
            for chunk in body:
                for at in range(0, len(chunk), 16384):  # counted once written: a reader that hangs up stops the count
                    reader.wait_below(UNREAD_MAX)
                    piece = chunk[at:at + 16384]
                    yield piece
                    record.bytes += len(piece)
        finally:
            reader.close()
            if hasattr(body, "close"):
                body.close()


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    server = S3Server(f"http://{host}:{port}", port)
    moto._server.app = _Counting(moto._server.app, server)  # werkzeug's handler calls server.app per request
    # a small send buffer (inherited by accepted sockets): what was counted is close to what a reader took
    moto._server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    try:
        yield server
    finally:
        moto.stop()


@dataclass
class S3:
    server: S3Server
    bucket: str

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def served(self, key: str, method: str = "GET") -> list[Served]:
        """The requests for this test's object ``key`` (its own bucket: other tests' objects never count)."""
        return self.server.served(f"/{self.bucket}/{key}", method)

    _store: Any = field(default=None, init=False, repr=False, compare=False)

    def store(self):
        """An obstore store of the test's own, with the credentials given (the job's environment may have none).
        Made once per test: each new S3Store builds its HTTP client (a few ms of CPU, and tests call this often)."""
        if self._store is None:
            from obstore.store import S3Store

            self._store = S3Store(self.bucket, endpoint=self.server.endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                                  secret_access_key=SECRET_KEY, virtual_hosted_style_request=False, client_options={"allow_http": True})  # fmt: skip
        return self._store

    def put(self, key: str, path_or_bytes: Path | bytes) -> str:
        import obstore

        data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
        obstore.put(self.store(), key, data)
        return self.url(key)

    def get(self, key: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(self.store(), key).bytes())
        except FileNotFoundError:
            return None

    def keys(self, prefix: str = "") -> list[str]:
        import obstore

        return sorted(o["path"] for batch in obstore.list(self.store(), prefix=prefix) for o in batch)

    def open_uploads(self) -> list[Any]:
        import httpx

        text = httpx.get(f"{self.server.endpoint}/{self.bucket}?uploads").text
        return [part for part in text.split("<Upload>")[1:]]


def storage_env(server: S3Server) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "SYNAPSE_STORAGE_ENDPOINT": server.endpoint,
        "SYNAPSE_STORAGE_PATH_STYLE": "1",
        "SYNAPSE_STORAGE_ALLOW_HTTP": "1",
    }


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    for name, value in storage_env(s3_server).items():
        monkeypatch.setenv(name, value)
    return S3(s3_server, s3_server.make_bucket())


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_files(tmp_path):
    """A plain HTTP server on loopback serving ``tmp_path/www``: (base URL, folder)."""
    import functools

    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
