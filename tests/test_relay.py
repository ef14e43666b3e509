"""A guarded media URL is read through a loopback relay (``storage.relay``): ffmpeg and PyAV never
resolve a stranger's host themselves, so a DNS answer that changes after the guard's check
(DNS rebinding) cannot lead them into the server's own network."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from synapse_cli.config import resolve
from synapse_cli.errors import UsageError
from synapse_cli.jobs import load_job, spec_from_dict
from synapse_cli.netguard import Guard
from synapse_cli.storage.client import Storage
from synapse_cli.storage.staging import staged
from tests.conftest import make_clip, probe


class _Counting(SimpleHTTPRequestHandler):
    seen: list[str]

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        self.seen.append(self.headers.get("Host", ""))
        return super().send_head()


@pytest.fixture
def media(tmp_path):
    """A plain HTTP server on loopback with a clip; (port, the Host headers it was asked with)."""
    root = tmp_path / "www"
    root.mkdir()
    make_clip(root / "clip.mp4", size="320x180", seconds=1.0)
    seen: list[str] = []
    handler = type("Handler", (_Counting,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def _storage(guard: Guard) -> Storage:
    return Storage.guarded(resolve({}, {"SYNAPSE_STORAGE_ALLOW_HTTP": "1"}, {}), buckets=False, guard=guard)


def _export(url: str, out: Path, storage: Storage, seen_by_job: list[str]) -> list:
    spec = spec_from_dict("export", {"input": url, "output": str(out), "job": "framing", "params": {"output_width": 90, "output_height": 160}})

    def run(local):
        seen_by_job.append(local.input)
        return load_job("export")(local)

    return list(staged("export", spec, storage, run))


def test_ffmpeg_reads_a_guarded_url_through_the_relay(media, tmp_path):
    port, seen = media
    guard = Guard(allow_hosts=["media.test"], allow_http=True, resolver=lambda host, p: ["127.0.0.1"])
    by_job: list[str] = []
    events = _export(f"http://media.test:{port}/clip.mp4", tmp_path / "o.mp4", _storage(guard), by_job)
    assert type(events[-1]).__name__ == "Finished"
    assert probe(tmp_path / "o.mp4").width == 90
    assert by_job[0].startswith("http://127.0.0.1:") and "media.test" not in by_job[0]  # the job saw the relay, never the host
    assert seen and set(seen) == {f"media.test:{port}"}  # every request upstream named the user's host (TLS would check it)
    assert str(port) not in by_job[0].split("/")[2]  # the relay's own port, not the server's


def test_a_dns_answer_that_changes_after_the_check_reaches_nothing(media, tmp_path):
    """The check sees a public address; every later lookup says 127.0.0.1 (DNS rebinding). Handed the
    URL itself, ffmpeg would have looked it up again and read the loopback server; through the relay
    every connection is checked, so the loopback server is never asked and the job fails in one line."""
    port, seen = media
    answers = [["93.184.216.34"]]

    def resolver(host, p):
        return answers.pop(0) if answers else ["127.0.0.1"]

    guard = Guard(allow_http=True, resolver=resolver)
    with pytest.raises(UsageError) as caught:
        _export(f"http://rebind.test:{port}/clip.mp4", tmp_path / "o.mp4", _storage(guard), [])
    assert "loopback" in str(caught.value) and "rebind.test" in str(caught.value)
    assert seen == []  # the loopback server was never reached
    assert not (tmp_path / "o.mp4").exists()


def test_the_relay_serves_its_one_path_only(media):
    import httpx

    from synapse_cli.storage.relay import Relay

    port, seen = media
    guard = Guard(allow_hosts=["media.test"], allow_http=True, resolver=lambda host, p: ["127.0.0.1"])
    with Relay(guard, f"http://media.test:{port}/clip.mp4") as relay:
        base = relay.url.rsplit("/", 2)[0]
        assert httpx.get(f"{base}/other/clip.mp4").status_code == 404
        assert httpx.get(f"{base}/../clip.mp4").status_code == 404
        ok = httpx.get(relay.url, headers={"Range": "bytes=0-99"})
        assert ok.status_code in (200, 206) and ok.content[4:8] == b"ftyp"
    assert len(seen) == 1  # the two refused paths never went upstream
