"""The one guard for URLs that a stranger gives a server (or a container) to fetch or to call.

``synapse serve`` and the Modal containers fetch user-given ``https://`` inputs and POST to
user-given webhook targets. Without a guard, such a server is its users' proxy into its own
network: ``http://127.0.0.1:8000/...``, the cloud metadata service at ``169.254.169.254``, a
private database's HTTP port, or a public name whose DNS record says ``127.0.0.1``.

``Guard.client()`` is an ``httpx.Client`` whose every connection goes through ``connect_tcp``
here: the host name is resolved once, every address it resolves to is checked, and the socket
is connected to a checked address (never a second lookup, so a DNS answer that changes between
check and connect cannot slip through). The request keeps its URL, so the ``Host`` header, TLS
SNI and certificate verification use the name, as they would without the guard. Refused:

- loopback, private (RFC 1918), link-local (cloud metadata at 169.254.169.254), CGNAT
  (100.64.0.0/10), unique-local (fc00::/7), multicast, unspecified, reserved, documentation:
  anything that is not a global unicast address;
- IPv4-mapped (``::ffff:127.0.0.1``), 6to4 and Teredo IPv6 addresses, which carry an IPv4 one.

Also: no proxy from the environment (``trust_env=False``), redirects are not followed (a
3xx is the caller's to judge, and were a caller to follow one, the next hop goes through the
same check), plain ``http://`` only where ``allow_http``, a response body capped at
``max_bytes`` and a whole request at ``max_seconds``.

An operator's ``allow_hosts`` (``[serve] allow_hosts``) admits named hosts (a name, or an IP
literal) whatever they resolve to: a private object store, a receiver on the LAN.

The local backend does not use the guard: there the user is the machine's owner.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import httpcore
import httpx

from synapse_cli.errors import UsageError

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # a response body larger than this is cut off (RefusedURL)
DEFAULT_MAX_SECONDS = 300.0  # a whole request, body included
DEFAULT_CONNECT_TIMEOUT_S = 10.0

Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP address strings


# A URL the guard will not fetch (its scheme, or an address it resolves to): exit code 2, a 422 on serve.
# It is a UsageError by name too: users see only the documented error names (README's exit-code table).
RefusedURL = UsageError


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), in the resolver's order, without duplicates."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc.strerror}") from None
    out: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # an IPv6 scope id (fe80::1%eth0) is refused with its address anyway
        if address not in out:
            out.append(address)
    return out


def refusal(address: str) -> str | None:
    """Why ``address`` (an IP literal) must not be connected to, or None for a global unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped address"
        if ip.sixtofour is not None or ip.teredo is not None:
            return "an IPv6 address carrying an IPv4 one (6to4, Teredo)"
        if ip in ipaddress.ip_network("fc00::/7"):
            return "a unique-local address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return "a carrier-grade NAT address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


class Guard:
    """What may be fetched from here, and an ``httpx.Client`` that fetches nothing else.

    ``allow_hosts``: names (or IP literals) admitted whatever they resolve to. ``allow_http``:
    plain ``http://`` too. ``any_address``: every address is admitted (the local backend, where
    the user owns the machine: the same fetch, its caps and no redirects, without the refusals).
    ``resolver``: a seam for tests, ``(host, port) -> [addresses]``.
    """

    def __init__(
        self,
        allow_hosts: Iterable[str] = (),
        allow_http: bool = False,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_seconds: float | None = DEFAULT_MAX_SECONDS,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        resolver: Resolver | None = None,
        any_address: bool = False,
    ) -> None:
        self.any_address = any_address
        self.allow_hosts = frozenset(_host_key(h) for h in allow_hosts if h and h.strip())
        self.allow_http = allow_http
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.connect_timeout_s = connect_timeout_s
        self.resolver: Resolver = resolver or _resolve

    @classmethod
    def from_settings(cls, settings: Any, allow_http: bool = False, **kwargs: Any) -> "Guard":
        """The server's guard: ``[serve] allow_hosts`` admits named private hosts."""
        return cls(allow_hosts=settings["serve.allow_hosts"], allow_http=allow_http, **kwargs)

    # -- checks --------------------------------------------------------------------

    def check_url(self, url: str, what: str = "URL") -> None:
        """Refuse (``RefusedURL``) a URL whose scheme is not allowed or that names no host.

        The address is checked when the connection is made (``addresses``), not here: a check
        now and a lookup later could see two different DNS answers."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise RefusedURL(f"{what} {redact(url)} is not a valid URL: {exc}") from None
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            plain = " (plain http:// is not allowed here)" if parts.scheme == "http" else ""
            raise RefusedURL(f"{what} {redact(url)}: only {' and '.join(s + '://' for s in schemes)} URLs are allowed{plain}")
        if not parts.hostname:
            raise RefusedURL(f"{what} {redact(url)} names no host")

    def addresses(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` once; every address it has must be allowed, else ``RefusedURL``. Returns them."""
        key = _host_key(host)
        found = list(self.resolver(host, port))
        if not found:
            raise httpcore.ConnectError(f"{host!r} resolves to no address")
        if self.any_address or key in self.allow_hosts:
            return found
        for address in found:
            why = refusal(address)
            if why is not None:
                named = host if host == address else f"{host} ({address})"
                raise RefusedURL(f"{named} is {why}: refused (an operator may admit a host with [serve] allow_hosts)")
        return found

    # -- the client ------------------------------------------------------------------

    def client(self, timeout: float | httpx.Timeout | None = None, verify: ssl.SSLContext | bool = True, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` that connects only to checked addresses, ignores proxy settings,
        does not follow redirects and caps every response (``max_bytes``, ``max_seconds``)."""
        for refused in ("transport", "trust_env", "proxy", "mounts", "follow_redirects"):
            if refused in kwargs:
                raise TypeError(f"Guard.client() sets {refused} itself")
        timeout = timeout if timeout is not None else httpx.Timeout(30.0, connect=self.connect_timeout_s)
        return httpx.Client(transport=GuardedTransport(self, verify=verify), trust_env=False, follow_redirects=False, timeout=timeout, **kwargs)

    def download(self, url: str, dest: Path | str, client: httpx.Client | None = None, what: str = "URL") -> int:
        """GET ``url`` into ``dest`` (a temporary sibling, renamed when complete); returns the byte count.

        A redirect, an error status, a body over ``max_bytes`` or a transfer over ``max_seconds``
        leaves no file at ``dest``."""
        from synapse_cli.errors import JobError

        self.check_url(url, what)
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        own = client is None
        client = client or self.client()
        try:
            with client.stream("GET", url) as response:
                if response.is_redirect:
                    raise RefusedURL(f"{what} {redact(url)} redirects ({response.status_code}); redirects are not followed")
                if response.status_code == 404:
                    raise UsageError(f"input not found: {redact(url)}")
                if response.status_code >= 400:
                    raise JobError(f"{what} {redact(url)}: HTTP {response.status_code}")
                size = 0
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                        size += len(chunk)
            os.replace(tmp, dest)
            return size
        except httpx.HTTPError as exc:
            raise JobError(f"{what} {redact(url)}: {type(exc).__name__}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
            if own:
                client.close()


def _host_key(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def redact(url: str) -> str:
    """``url`` without user info and query string (presigned URLs carry credentials there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a malformed URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=netloc, query="…" if parts.query else "", fragment="").geturl()


# -- the transport: httpcore with a network backend that connects to checked addresses only --


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, except that ``connect_tcp`` resolves and checks the host itself
    and connects to a checked address. TLS is started afterwards on that socket with the URL's
    host as the server name (httpcore's ``start_tls``), so SNI and the certificate check are
    those of the name."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._sync = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in self.guard.addresses(host, port):
            try:  # the address is passed as an IP literal: the resolver below does no lookup of its own
                return self._sync.connect_tcp(address, port, timeout=timeout, local_address=local_address, socket_options=socket_options)
            except httpcore.ConnectError as exc:  # the next address, as create_connection would
                last = exc
            except httpcore.ConnectTimeout as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise RefusedURL("unix sockets are not reachable through the URL guard")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# httpcore's exceptions carry the names of httpx's: ConnectError -> httpx.ConnectError, ReadTimeout -> httpx.ReadTimeout
def _httpx_error(exc: Exception) -> Exception:
    cls = getattr(httpx, type(exc).__name__, None)
    if isinstance(cls, type) and issubclass(cls, httpx.TransportError):
        return cls(str(exc))
    return httpx.TransportError(f"{type(exc).__name__}: {exc}")


class _Body(httpx.SyncByteStream):
    """A response body read through the caps: ``max_bytes`` in all, the request's ``deadline``."""

    def __init__(self, stream: Iterable[bytes], close: Callable[[], None], url: str, guard: Guard, deadline: float | None) -> None:
        self._stream, self._close, self._url, self._guard, self._deadline = stream, close, url, guard, deadline

    def __iter__(self) -> Iterator[bytes]:
        size = 0
        try:
            for part in self._stream:
                size += len(part)
                if self._guard.max_bytes is not None and size > self._guard.max_bytes:
                    raise RefusedURL(f"{redact(self._url)}: the response is over {self._guard.max_bytes} bytes")
                if self._deadline is not None and time.monotonic() > self._deadline:
                    raise httpx.ReadTimeout(f"{redact(self._url)}: the response took over {self._guard.max_seconds:g} s")
                yield part
        except httpcore.TimeoutException as exc:
            raise _httpx_error(exc) from None
        except httpcore.NetworkError as exc:
            raise _httpx_error(exc) from None
        except httpcore.ProtocolError as exc:
            raise _httpx_error(exc) from None

    def close(self) -> None:
        self._close()


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport over an httpcore pool whose every connection is made by ``_GuardedBackend``.

    Built on httpcore's public API only (the pool's ``network_backend`` argument), rather than
    on httpx's ``HTTPTransport`` internals."""

    def __init__(self, guard: Guard, verify: ssl.SSLContext | bool = True) -> None:
        self.guard = guard
        context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify, trust_env=False)
        self._pool = httpcore.ConnectionPool(ssl_context=context, network_backend=_GuardedBackend(guard), max_connections=20,
                                             max_keepalive_connections=5, keepalive_expiry=5.0)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.guard.check_url(url)
        deadline = time.monotonic() + self.guard.max_seconds if self.guard.max_seconds else None
        timeouts = dict(request.extensions.get("timeout") or {})
        if deadline is not None:  # no single phase may outlast the whole request's cap
            timeouts = {k: (self.guard.max_seconds if v is None else min(v, self.guard.max_seconds)) for k, v in timeouts.items()} or \
                {"connect": self.guard.connect_timeout_s, "read": self.guard.max_seconds, "write": self.guard.max_seconds, "pool": self.guard.max_seconds}
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions={**request.extensions, "timeout": timeouts},
        )
        try:
            response = self._pool.handle_request(core)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            raise _httpx_error(exc) from None
        stream = response.stream
        assert isinstance(stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(stream, response.close, url, self.guard, deadline),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()
