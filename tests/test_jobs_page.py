"""The jobs page (issue #15): ``GET /``, its session cookie (``POST /v1/session``), and the page itself
driven in headless Chromium through a real ``synapse serve`` on loopback.

The cookie tests play the browser with raw HTTP (httpx): what a page on another site could send
(a foreign ``Origin``), a forged or missing cookie. The browser test needs Debian's ``chromium`` and
``chromium-driver`` and ``selenium`` (``.ci/run`` installs them); without them it is skipped."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
from typing import Iterator

import httpx
import pytest

from synapse_cli.server import session
from tests.http_fixtures import API_KEY, Served, paused, serve_app, serve_process, server_ffmpeg

SAMPLE = {"output": "s.mp4", "seconds": 0.2, "width": 64, "height": 64, "audio": False}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def login(client: httpx.Client, url: str, key: str = API_KEY) -> httpx.Response:
    return client.post(f"{url}/v1/session", json={"key": key})


# -- the page and the cookie, over raw HTTP --------------------------------------------------------


def test_the_page_is_served_without_a_key_holds_no_data_and_allows_only_its_own_inline_code(tmp_path):
    with serve_app(tmp_path / "srv") as ep:
        r = httpx.get(ep.url + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert API_KEY not in html and "http://" not in html and "https://" not in html  # no CDN, no absolute URLs
        csp = r.headers["content-security-policy"]
        (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in csp
        assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert not re.search(r"<(script|img|iframe)[^>]* src=|<link[^>]* href=\"(?!data:)", html)  # one file: nothing else to fetch


def test_a_session_cookie_is_an_opaque_httponly_strict_token_that_stands_in_for_the_key(tmp_path):
    with serve_app(tmp_path / "srv") as ep, httpx.Client() as client:
        r = login(client, ep.url)
        assert r.status_code == 204, r.text
        header = r.headers["set-cookie"]
        parts = [p.strip() for p in header.split(";")]
        name, _, token = parts[0].partition("=")
        assert name == "synapse_session" and len(token) >= 40
        assert API_KEY not in header and token != API_KEY
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(parts)
        assert "Secure" not in parts  # plain http on loopback: a Secure cookie would never come back

        # the cookie alone runs a job and reads its artifact, as the page does
        r = client.post(f"{ep.url}/v1/jobs/sample", json=SAMPLE)
        assert r.status_code == 200, r.text
        finished = json.loads(r.text.splitlines()[-1])
        assert finished["type"] == "finished", r.text
        (artifact,) = [json.loads(line) for line in r.text.splitlines() if '"artifact"' in line]
        download = client.get(ep.url + artifact["path"])
        assert download.status_code == 200 and download.content[4:8] == b"ftyp"
        # the page's own origin is fine (browsers send Origin with POST/DELETE)
        assert client.get(ep.url + artifact["path"], headers={"Origin": ep.url}).status_code == 200
        # ... a page on any other origin is not, with or without the cookie
        for origin in ("https://evil.example", "null", ep.url.replace("127.0.0.1", "localhost")):
            r = client.get(ep.url + artifact["path"], headers={"Origin": origin})
            assert r.status_code == 403, (origin, r.status_code)
            assert client.post(f"{ep.url}/v1/jobs/sample", json=SAMPLE, headers={"Origin": origin}).status_code == 403
        # no cookie, a forged one, one for a path the cookie does not cover
        assert httpx.get(ep.url + artifact["path"]).status_code == 401
        forged = {"synapse_session": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")}
        r = httpx.get(ep.url + artifact["path"], cookies=forged)
        assert r.status_code == 401 and r.json()["error"] == "BackendError"
        assert httpx.post(f"{ep.url}/v1/jobs/sample", json=SAMPLE, cookies={"synapse_session": API_KEY}).status_code == 401
        assert client.get(ep.url + "/v1/openapi.json", headers={"Origin": ep.url}).status_code == 403
        assert client.get(ep.url + "/v1/openapi.json").status_code == 401
        described = httpx.get(ep.url + "/v1/openapi.json", headers=AUTH).json()["paths"]["/v1/session"]["post"]
        assert described["security"] == [] and {"204", "401", "429"} <= set(described["responses"])
        assert described["requestBody"]["content"]["application/json"]["schema"]["required"] == ["key"]


def test_a_wrong_key_posted_for_a_session_is_refused_and_counted_like_any_wrong_key(tmp_path):
    with serve_app(tmp_path / "srv", max_key_failures=3) as ep, httpx.Client() as client:
        r = login(client, ep.url, "not-the-key-0123456789")
        assert r.status_code == 401 and "set-cookie" not in r.headers
        assert r.json() == {"type": "error", "code": 3, "message": "missing or wrong API key", "error": "BackendError"}
        assert httpx.get(ep.url + "/v1/artifacts/" + "a" * 22 + ".0", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        assert login(client, ep.url, "").status_code == 401
        # three failures, from either route: the address now waits, whatever it sends
        r = login(client, ep.url)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "set-cookie" not in r.headers
        for bad in (b"{}", b'{"key": 12}', b"key=x", b'{"key": "\\ud800"}'):
            assert client.post(f"{ep.url}/v1/session", content=bad).status_code == 422, bad
        assert client.post(f"{ep.url}/v1/session", content=b"x" * 10_000).status_code == 413
        # a page on another site cannot use the route as a key oracle
        assert client.post(f"{ep.url}/v1/session", json={"key": API_KEY}, headers={"Origin": "https://evil.example"}).status_code == 403


def test_a_server_without_a_key_has_no_sessions(tmp_path):
    with serve_app(tmp_path / "srv", key=None) as ep:
        assert httpx.post(ep.url + "/v1/session", json={"key": "anything-at-all-123"}).status_code == 404
        assert httpx.get(ep.url + "/").status_code == 200


def test_tokens_expire_are_bounded_and_unknown_ones_are_refused():
    now = [1000.0]
    sessions = session.Sessions(ttl_s=60, max_sessions=3, clock=lambda: now[0])
    first = sessions.issue()
    assert sessions.valid(first) and not sessions.valid(first + "x") and not sessions.valid("") and not sessions.valid(None)
    now[0] += 59
    assert sessions.valid(first)
    now[0] += 1
    assert not sessions.valid(first) and len(sessions) == 0
    tokens = [sessions.issue() for _ in range(4)]
    assert len(sessions) == 3 and not sessions.valid(tokens[0]) and all(sessions.valid(t) for t in tokens[1:])
    assert len(set(tokens)) == 4


# -- the page in a real browser, against a real `synapse serve` --------------------------------------


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    return (browser, driver) if browser and driver else None


@pytest.fixture
def served(tmp_path) -> Iterator[Served]:
    """``synapse serve`` in its own process on a free loopback port, with ``API_KEY``."""
    with serve_process(tmp_path / "srv", env={"XDG_RUNTIME_DIR": str(tmp_path / "run")}) as server:
        yield server


@pytest.fixture
def browser(tmp_path):
    found = _chromium()
    if found is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium; the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,720",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def until(predicate, timeout_s: float, what: str, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


ROW = """const tr = document.querySelector('tr[data-id="' + arguments[0] + '"]');
if (!tr) return null;
const bar = tr.querySelector('[role=progressbar]');
return {status: tr.querySelector('.status').textContent, now: bar.getAttribute('aria-valuenow'),
        elapsed: tr.querySelector('.elapsed').textContent, links: [...tr.querySelectorAll('.artifacts a')].map(a => a.getAttribute('href')),
        cancel: !tr.querySelector('button.cancel').hidden, streaming: tr.classList.contains('streaming'), mark: window.__mark || null};"""


def detach(url: str, **spec) -> str:
    r = httpx.post(f"{url}/v1/jobs/sample?detach=true", json={"output": "clip.mp4", "audio": False, **spec}, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.mark.slow
def test_the_jobs_page_in_headless_chromium_shows_live_progress_and_cancels(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url = served.url
    browser.get(url + "/")
    key = until(lambda: (lambda e: e if e.is_displayed() else None)(browser.find_element(By.ID, "key")), 10, "the key prompt")
    key.send_keys("not-the-key-0123456789")
    browser.find_element(By.ID, "open").click()
    until(lambda: browser.find_element(By.ID, "login-error").text == "Wrong key.", 10, "the wrong key to be refused")
    key.clear()
    key.send_keys(API_KEY)
    browser.find_element(By.ID, "open").click()
    until(lambda: browser.find_element(By.ID, "jobs").is_displayed(), 10, "the job list")
    browser.execute_script("window.__mark = 'no reload since login'")  # gone if the page ever reloads

    cookie = browser.get_cookie("synapse_session")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != API_KEY
    assert "synapse_session" not in browser.execute_script("return document.cookie")
    assert API_KEY not in browser.current_url

    # a job submitted by someone else, through the API: it appears, and its bar moves to 100 % live.
    # Its ffmpeg is held (SIGSTOP) from its start until the page (which re-reads the list every 2 s)
    # has the row's event stream open, so every progress event from then on reaches the page live.
    # ffmpeg reports progress every 0.5 s: 10 s of 640x360 takes about 1 s here; a machine so fast that
    # the encode ends before its first report gets one longer job
    for seconds in (10, 60):
        first = detach(url, seconds=seconds, width=640, height=360)
        with paused(until(lambda: server_ffmpeg(served, first), 15, "the job's ffmpeg", every_s=0.01)):
            seen: list[int] = []
            live: list[int] = []  # the values shown while the row's EventSource was open
            state = until(lambda: (lambda s: s if s and s["streaming"] else None)(browser.execute_script(ROW, first)), 15, "the new job's row, streaming")

        def progressed():
            nonlocal state
            state = browser.execute_script(ROW, first)
            if state["now"] is not None and (not seen or int(state["now"]) != seen[-1]):
                seen.append(int(state["now"]))
                if state["streaming"]:
                    live.append(seen[-1])
            return state["status"] == "completed" and seen and seen[-1] == 100

        t0 = time.monotonic()
        until(progressed, 300, "the job to complete on the page")
        print(f"a {seconds} s sample: the bar, {time.monotonic() - t0:.1f} s after its row appeared: {seen} (live: {live})")
        assert seen == sorted(seen), f"the bar went backwards: {seen}"
        if any(0 < v < 100 for v in live):
            break
    else:
        raise AssertionError(f"the bar never showed a value between 0 and 100 from its event stream: {seen} (live: {live})")
    assert state["mark"] == "no reload since login"
    # its artifact link downloads, with the cookie
    state = until(lambda: (lambda s: s if s["links"] else None)(browser.execute_script(ROW, first)), 10, "the artifact link")
    assert re.fullmatch(r"\d+:\d\d", state["elapsed"]), state
    (link,) = browser.execute_script(ROW, first)["links"]
    assert link.startswith("/v1/artifacts/")
    fetched = browser.execute_async_script(
        "const done = arguments[1]; fetch(arguments[0]).then(async r => done([r.status, (await r.arrayBuffer()).byteLength]))", link)
    assert fetched[0] == 200 and fetched[1] > 1000

    # a longer one: its cancel button stops it. Its ffmpeg is held while the page catches up (a running job
    # either way: the server sees its process), and let go just before the click
    second = detach(url, seconds=300, width=640, height=360)
    with paused(until(lambda: server_ffmpeg(served, second), 15, "the second job's ffmpeg", every_s=0.01)):
        until(lambda: (lambda s: s and s["status"] == "processing" and s["cancel"])(browser.execute_script(ROW, second)), 30,
              "the second job to run, with a cancel button")
        time.sleep(1)
    browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{second}"] button.cancel').click()
    state = until(lambda: (lambda s: s if s["status"] == "cancelled" else None)(browser.execute_script(ROW, second)), 15, "cancelled")
    assert not state["cancel"] and state["mark"] == "no reload since login"
    record = httpx.get(f"{url}/v1/jobs/{second}", headers=AUTH).json()
    assert record["status"] == "cancelled" and record["artifacts"] == []

    shot = tmp_path / "jobs-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
