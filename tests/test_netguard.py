"""The URL guard (synapse_cli.netguard) with real sockets on loopback: what it refuses, that it connects
to the address it checked (one lookup, Host header and TLS name kept), redirects, caps, proxies."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest

from synapse_cli.config import resolve
from synapse_cli.errors import JobError
from synapse_cli.netguard import Guard, RefusedURL, redact, refusal
from tests.receiver import Receiver, Reply, tls_cert


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"),
        ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"),
        ("::ffff:127.0.0.1", "IPv4-mapped"), ("::ffff:8.8.8.8", "IPv4-mapped"),
        ("2002:7f00:1::1", "6to4"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("192.0.2.1", "private"),
    ],
)  # fmt: skip
def test_refused_addresses(address, why):
    assert why in (refusal(address) or "")


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "100.128.0.1"])
def test_public_addresses_pass(address):
    assert refusal(address) is None


def test_a_name_resolving_to_loopback_is_refused_on_a_real_socket():
    with Receiver() as r:
        guard = Guard(allow_http=True)
        with guard.client() as client, pytest.raises(RefusedURL, match=r"localhost \(127\.0\.0\.1\) is a loopback address"):
            client.get(r.url_for("localhost"))
        with guard.client() as client, pytest.raises(RefusedURL, match="127.0.0.1 is a loopback address"):
            client.get(r.url)
        assert r.requests == []  # nothing reached the server


def test_an_allowed_host_passes_and_keeps_its_name():
    with Receiver(Reply(body=b"hello")) as r:
        guard = Guard(allow_hosts=["localhost"], allow_http=True)
        with guard.client() as client:
            response = client.get(r.url_for("localhost", "/x"))
        assert response.status_code == 200 and response.text == "hello"
        assert r.requests[0].headers["host"] == f"localhost:{r.port}"


def test_the_connection_goes_to_the_address_that_was_checked():
    """The name is resolved once, by the guard, and the socket goes to that address: a resolver that
    answers a public address first and loopback after (DNS rebinding) never gets its second say."""
    answers = [["8.8.8.8"], ["127.0.0.1"]]
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls) - 1, 1)]

    with Receiver() as r:
        guard = Guard(allow_http=True, resolver=rebinding, connect_timeout_s=0.3)
        with guard.client() as client, pytest.raises((httpx.ConnectError, httpx.ConnectTimeout)):  # 8.8.8.8 is out of reach here
            client.get(r.url_for("rebind.test"))
        assert calls == ["rebind.test"]
        assert r.requests == []  # the loopback answer was never asked for, nor connected to
    # an allowed name mapped to the receiver: one lookup per connection, and the Host header is the name
    with Receiver() as r:
        looked_up: list[str] = []

        def resolver(host: str, port: int) -> list[str]:
            looked_up.append(host)
            return ["127.0.0.1"]

        guard = Guard(allow_hosts=["receiver.test"], allow_http=True, resolver=resolver)
        with guard.client() as client:
            assert client.get(r.url_for("receiver.test", "/a")).status_code == 200
        assert looked_up == ["receiver.test"]
        assert r.requests[0].headers["host"] == f"receiver.test:{r.port}"


def test_tls_verifies_the_name_while_connecting_to_the_vetted_address(tmp_path):
    cert, key = tls_cert(tmp_path, "receiver.test")
    context = ssl.create_default_context(cafile=str(cert))
    with Receiver(Reply(body=b"secure"), tls=(cert, key)) as r:
        guard = Guard(allow_hosts=["receiver.test"], resolver=lambda host, port: ["127.0.0.1"])
        with guard.client(verify=context) as client:
            assert client.get(r.url_for("receiver.test")).text == "secure"  # SNI and the check use the name
        other = Guard(allow_hosts=["other.test"], resolver=lambda host, port: ["127.0.0.1"])
        with other.client(verify=context) as client, pytest.raises(httpx.ConnectError, match="certificate|hostname"):
            client.get(r.url_for("other.test"))


def test_plain_http_is_refused_unless_allowed():
    guard = Guard(allow_hosts=["localhost"])
    with guard.client() as client, pytest.raises(RefusedURL, match="only https:// URLs are allowed"):
        client.get("http://localhost:9/")
    for url in ("ftp://example.com/x", "file:///etc/passwd"):
        with pytest.raises(RefusedURL):
            guard.check_url(url)


def test_redirects_are_not_followed_and_a_followed_one_is_checked(tmp_path):
    with Receiver() as r:
        r.default = Reply(302, {"location": f"http://127.0.0.1:{r.port}/inside"}, b"")
        guard = Guard(allow_hosts=["receiver.test"], allow_http=True, resolver=lambda host, port: ["127.0.0.1"])
        with guard.client() as client:
            assert client.get(r.url_for("receiver.test")).status_code == 302  # handed back, not followed
            with pytest.raises(RefusedURL, match="127.0.0.1 is a loopback address"):
                client.get(r.url_for("receiver.test"), follow_redirects=True)  # a caller that follows still goes through the check
        with pytest.raises(RefusedURL, match="redirects"):
            guard.download(r.url_for("receiver.test"), tmp_path / "out.bin")
        assert [q.path for q in r.requests] == ["/", "/", "/"]
        assert not list(tmp_path.iterdir())


def test_size_and_time_caps_leave_no_file(tmp_path):
    with Receiver(Reply(body=b"x" * 5000)) as r:
        guard = Guard(allow_hosts=["localhost"], allow_http=True, max_bytes=1000)
        with pytest.raises(RefusedURL, match="over 1000 bytes"):
            guard.download(r.url_for("localhost", "/big"), tmp_path / "big.bin")
        ok = Guard(allow_hosts=["localhost"], allow_http=True)
        assert ok.download(r.url_for("localhost", "/big"), tmp_path / "big.bin") == 5000
        assert (tmp_path / "big.bin").read_bytes() == b"x" * 5000
        r.default = Reply(body=b"y" * 40, drip_s=0.05)
        slow = Guard(allow_hosts=["localhost"], allow_http=True, max_seconds=0.5)
        with pytest.raises(JobError, match="ReadTimeout"):
            slow.download(r.url_for("localhost", "/slow"), tmp_path / "slow.bin")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_proxy_settings_from_the_environment_are_ignored(monkeypatch):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    with Receiver() as r:
        guard = Guard(allow_hosts=["localhost"], allow_http=True)
        with guard.client() as client:
            assert client.get(r.url_for("localhost")).status_code == 200
        with pytest.raises(TypeError):
            guard.client(trust_env=True)


def test_allow_hosts_comes_from_the_serve_setting():
    settings = resolve(env={"SYNAPSE_SERVE_ALLOW_HOSTS": "minio.internal, Receiver.LAN."})
    guard = Guard.from_settings(settings)
    assert guard.allow_hosts == {"minio.internal", "receiver.lan"}
    assert Guard(allow_hosts=["minio.internal"], resolver=lambda h, p: ["10.0.0.5"]).addresses("MINIO.internal", 443) == ["10.0.0.5"]
    with pytest.raises(RefusedURL, match="private"):
        Guard(resolver=lambda h, p: ["10.0.0.5"]).addresses("minio.internal", 443)


def test_redact_drops_credentials():
    assert redact("https://user:pw@host.example/a/b?X-Amz-Signature=abc") == "https://host.example/a/b?…"
