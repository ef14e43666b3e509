"""Who may drive the endpoint (issue #12 item 2): generated keys, web pages, DNS rebinding, guessing.

Real servers on loopback sockets; a browser is played by raw HTTP requests carrying what a
browser would send (an ``Origin`` header, a foreign ``Host``)."""

from __future__ import annotations

import json
import stat

import pytest

from tests.conftest import wait_for
from tests.http_fixtures import API_KEY, http, serve_app, serve_process

SAMPLE = {"output": "s.mp4", "seconds": 0.1, "width": 32, "height": 32, "audio": False}


def test_serve_without_a_key_generates_one_prints_it_once_and_the_client_finds_it(cli, clips, tmp_path):
    """`synapse serve` with no SYNAPSE_API_KEY: a per-start key, in a 0600 file; keyless requests are
    refused; the CLI on this machine reads the file; the file goes when the server stops."""
    with serve_process(tmp_path / "srv", key=None, env={"XDG_RUNTIME_DIR": str(tmp_path / "run")}, stop_timeout_s=20) as (url, server, log):
        first, second = wait_for(lambda: log[:2] if len(log) >= 2 else None)
        assert first.split("listening on ")[1].split()[0] == url
        port = int(url.rsplit(":", 1)[1])
        key = second.split("API key for this run: ")[1].split()[0]
        key_file = tmp_path / "run" / "synapse" / f"serve-{port}.key"
        assert key_file.read_text().strip() == key and len(key) >= 32
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700

        assert http.post(f"{url}/v1/jobs/sample", json=SAMPLE).status_code == 401  # a web page's form post
        r = http.post(f"{url}/v1/jobs/sample", json=SAMPLE, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["type"] == "finished"

        # the CLI, with no key configured, picks the file up for a loopback endpoint
        small = ["--set", "output_width=270", "--set", "output_height=480"]
        run = cli("export", clips["portrait"], "-o", tmp_path / "c.mp4", "--json", *small, "--endpoint", url,
                  env={"XDG_RUNTIME_DIR": str(tmp_path / "run"), "SYNAPSE_JOBS_DB": str(tmp_path / "j.db")})
        assert run.exit_code == 0, run.stderr
        assert (tmp_path / "c.mp4").stat().st_size > 0
    assert server.returncode == 0  # the end of the block sent SIGTERM, and it stopped in time: no SIGKILL
    assert not key_file.exists()


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},  # a page's fetch()/form POST
        {"Origin": "null"},  # a sandboxed iframe or file:// page
        {"Host": "evil.example:8000"},  # DNS rebinding: the page's own name, resolved to 127.0.0.1
        {"Host": "127.0.0.1.nip.io"},
    ],
)
def test_a_keyless_server_refuses_browser_requests(tmp_path, headers):
    with serve_app(tmp_path / "srv", key=None) as ep:
        for method, path, kwargs in (("GET", "/v1/health", {}), ("POST", "/v1/jobs/sample", {"json": SAMPLE}),
                                     ("POST", "/v1/jobs/sample", {"data": {"spec": json.dumps(SAMPLE)}})):
            r = http.request(method, ep.url + path, headers=headers, **kwargs)
            assert r.status_code == 403, (path, r.text)
            assert "need the API key" in r.json()["message"]
        assert ep.job_dirs() == []
        # the same requests from a local program (loopback Host, no Origin) are fine
        assert http.get(ep.url + "/v1/health", headers={"Host": "localhost:1234"}).status_code == 200
        assert http.post(ep.url + "/v1/jobs/sample", json=SAMPLE, headers={"Host": "[::1]:80"}).status_code == 200


def test_with_the_key_origin_and_any_host_are_fine(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        headers = {"Authorization": f"Bearer {API_KEY}", "Origin": "https://ui.example", "Host": "synapse.example.com"}
        assert http.post(ep.url + "/v1/jobs/sample", json=SAMPLE, headers=headers).status_code == 200
        assert http.get(ep.url + "/v1/health", headers={"Origin": "https://evil.example"}).status_code == 403
        assert http.post(ep.url + "/v1/jobs/sample", json=SAMPLE, headers={"Origin": "https://evil.example"}).status_code == 403


def test_short_keys_are_refused_at_start(cli, tmp_path):
    from synapse_cli.server import create_app

    with pytest.raises(ValueError, match="at least 16"):
        create_app(work_dir=tmp_path, api_key="short-key-15chr")
    run = cli("serve", "--port", "0", env={"SYNAPSE_API_KEY": "x" * 15})
    assert run.exit_code == 2 and "at least 16" in run.stderr


def test_health_does_not_say_whether_a_key_is_right(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        right = http.get(ep.url + "/v1/health", headers={"Authorization": f"Bearer {API_KEY}"})
        wrong = http.get(ep.url + "/v1/health", headers={"Authorization": "Bearer wrong-but-long-enough"})
        assert right.status_code == wrong.status_code == 200
        assert right.json() == wrong.json() and "key_accepted" not in right.json()


def test_repeated_wrong_keys_from_one_address_are_slowed(tmp_path):
    with serve_app(tmp_path / "srv", max_key_failures=5) as ep:
        codes = [http.post(ep.url + "/v1/jobs/sample", json=SAMPLE, headers={"Authorization": f"Bearer guess-{i:012d}"}).status_code
                 for i in range(8)]
        assert codes == [401] * 5 + [429] * 3
        r = http.post(ep.url + "/v1/jobs/sample", json=SAMPLE, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60  # even the right key: no oracle
        assert ep.job_dirs() == []
