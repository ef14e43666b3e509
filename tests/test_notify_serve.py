"""Webhooks behind ``synapse serve``: sent by the server, signed with its secret, the target checked by
the URL guard (422 on a refused address). A real server and a real receiver on loopback; every
delivery verified with the reference ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import json

import pytest
from standardwebhooks import Webhook

from tests.conftest import wait_for
from tests.http_fixtures import API_KEY, http, serve_app
from tests.receiver import Receiver, Reply

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "whsec_" + base64.b64encode(b"v" * 32).decode()
TINY = {"output": "s.mp4", "seconds": 0.5, "width": 32, "height": 32, "audio": False}
HOOKS = dict(notify_secret=SECRET, allow_hosts=("localhost",), notify_allow_http=True, notify_progress_interval_s=0.2, notify_retry_for_s=3.0)


def hooks(receiver: Receiver) -> list[dict]:
    hook = Webhook(SECRET)
    return [hook.verify(r.body, r.headers) for r in receiver.requests]


def test_a_detached_job_on_the_server_notifies_with_download_urls(tmp_path):
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        resp = http.post(f"{ep.url}/v1/jobs/sample?detach=true", json={**TINY, "notify": r.url_for("localhost", "/hook")}, headers=AUTH)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=60)
        bodies = hooks(r)
        assert bodies[0]["type"] == "started" and bodies[-1]["type"] == "finished"
        assert {b["job_id"] for b in bodies} == {job_id} and {b["kind"] for b in bodies} == {"sample"}
        finished = bodies[-1]["data"]
        assert finished["result"]["output"] == "s.mp4"  # the client's path, never the server's
        [art] = finished["artifacts"]
        assert art["url"].startswith(f"{ep.url}/v1/artifacts/{job_id}.0")
        data = http.get(art["url"], headers=AUTH).content
        assert len(data) == art["bytes"] and data[4:8] == b"ftyp"
        wait_for(lambda: http.get(f"{ep.url}/v1/jobs/{job_id}", headers=AUTH).json().get("webhooks", [{}])[-1].get("event") == "finished")
        rec = http.get(f"{ep.url}/v1/jobs/{job_id}", headers=AUTH).json()
        assert rec["status"] == "completed"
        assert [(w["event"], w["outcome"]) for w in rec["webhooks"]][-1] == ("finished", "delivered")
        assert all(w["target"] == r.url_for("localhost", "/hook") for w in rec["webhooks"])
    raw = SECRET[6:].encode()
    for f in (tmp_path / "srv").rglob("*"):
        if f.is_file():
            assert raw not in f.read_bytes(), f


def first_finished_fails_once(failed: list | None = None):
    """A receiver rule: the first ``finished`` delivery gets a 500 (and goes into ``failed``), everything else the default."""
    failed = [] if failed is None else failed

    def rule(req):
        if b'"type":"finished"' in req.body and not failed:
            failed.append(req)
            return Reply(500)
        return None

    return rule


def test_a_streamed_job_notifies_and_a_500_once_still_gets_finished(tmp_path):
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        failed: list = []
        r.rule = first_finished_fails_once(failed)
        with http.stream("POST", f"{ep.url}/v1/jobs/sample", json={**TINY, "notify": r.url_for("localhost", "/h")}, headers=AUTH, timeout=60) as resp:
            assert resp.status_code == 200
            events = [json.loads(line) for line in resp.iter_lines() if line.strip()]
        assert events[-1]["type"] == "finished"
        wait_for(lambda: [b["type"] for b in hooks(r)].count("finished") == 2, timeout=30)
        types = [b["type"] for b in hooks(r)]
    assert types[0] == "started" and types[-1] == "finished"
    assert types.count("finished") == 2 and failed  # the 500 was retried, with the same id
    assert len({req.headers["webhook-id"] for req in r.requests if b'"type":"finished"' in req.body}) == 1


@pytest.mark.parametrize(
    "notify, says",
    [
        ("http://127.0.0.1:{port}/hook", "127.0.0.1 is a loopback address"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://10.0.0.7/hook", "private address"),
        ("http://[::ffff:127.0.0.1]:{port}/", "IPv4-mapped"),
        ("http://LocalHost:{port}/hook", None),  # allowed ([serve] allow_hosts), whatever its case
        ("ftp://example.com/hook", "expected an https:// URL"),
        (12, "expected a URL"),
    ],
)
def test_a_refused_target_is_a_422_and_nothing_runs(tmp_path, notify, says):
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        url = notify.format(port=r.port) if isinstance(notify, str) else notify
        resp = http.post(f"{ep.url}/v1/jobs/sample", json={**TINY, "notify": url}, headers=AUTH, timeout=60)
        if says is None:
            assert resp.status_code == 200, resp.text
            return
        assert resp.status_code == 422, resp.text
        assert "notify" in resp.json()["message"] and says in resp.json()["message"]
        assert ep.job_dirs() == [] and r.requests == []


def test_a_name_that_resolves_to_loopback_is_refused_unless_allowed(tmp_path):
    with Receiver() as r, serve_app(tmp_path / "srv", **{**HOOKS, "allow_hosts": ()}) as ep:
        resp = http.post(f"{ep.url}/v1/jobs/sample", json={**TINY, "notify": r.url_for("localhost", "/hook")}, headers=AUTH)
        assert resp.status_code == 422 and "localhost (127.0.0.1) is a loopback address" in resp.json()["message"]


def test_a_server_without_a_secret_refuses_notify_and_plain_http_needs_a_setting(tmp_path):
    with serve_app(tmp_path / "a", **{**HOOKS, "notify_secret": None}) as ep:
        resp = http.post(f"{ep.url}/v1/jobs/sample", json={**TINY, "notify": "https://hooks.example/x"}, headers=AUTH)
        assert resp.status_code == 422 and "SYNAPSE_NOTIFY_SECRET" in resp.json()["message"]
    with serve_app(tmp_path / "b", **{**HOOKS, "notify_allow_http": False}) as ep:
        resp = http.post(f"{ep.url}/v1/jobs/sample", json={**TINY, "notify": "http://localhost:9/x"}, headers=AUTH)
        assert resp.status_code == 422 and "allow_http" in resp.json()["message"]


def test_a_dead_receiver_leaves_the_server_job_completed_and_says_so(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with serve_app(tmp_path / "srv", **{**HOOKS, "notify_retry_for_s": 1.0}) as ep:
        resp = http.post(f"{ep.url}/v1/jobs/sample?detach=true", json={**TINY, "notify": f"http://localhost:{port}/hook"}, headers=AUTH)
        job_id = resp.json()["id"]
        wait_for(lambda: any(w["event"] == "finished" for w in http.get(f"{ep.url}/v1/jobs/{job_id}", headers=AUTH).json().get("webhooks", [])), timeout=60)
        rec = http.get(f"{ep.url}/v1/jobs/{job_id}", headers=AUTH).json()
    assert rec["status"] == "completed"
    final = rec["webhooks"][-1]
    assert final["outcome"] == "failed" and final["attempts"] >= 2 and "ConnectError" in final["detail"]


SMALL = ["--set", "output_width=90", "--set", "output_height=160"]


def test_the_cli_through_an_endpoint_has_the_server_notify(cli, db, tiny, tmp_path):
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        env = {"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook")}  # no secret here: the server signs
        run = cli("export", tiny, "-o", tmp_path / "remote.mp4", "--json", *SMALL, "--endpoint", ep.url, env=env)
        assert run.exit_code == 0, run.stderr
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=30)
        bodies = hooks(r)
        assert bodies[0]["type"] == "started" and bodies[-1]["data"]["result"]["output"] == str(tmp_path / "remote.mp4")
        again = cli("export", tiny, "-o", tmp_path / "again.mp4", *SMALL, "--endpoint", ep.url, env=env)  # identical: not reused,
        assert again.exit_code == 0, again.stderr  # since only the server can send its webhooks
        wait_for(lambda: [b["type"] for b in hooks(r)].count("finished") == 2, timeout=30)
        refused = cli("export", tiny, "-o", tmp_path / "r2.mp4", *SMALL, "--endpoint", ep.url,
                      env={**env, "SYNAPSE_NOTIFY_URL": f"http://127.0.0.1:{r.port}/hook"})
        assert refused.exit_code == 2 and "bad notify" in refused.stderr and "loopback" in refused.stderr


def test_cancelled_jobs_say_so_queued_or_running(tmp_path):
    long = {"output": "long.mp4", "seconds": 300, "width": 1280, "height": 720}
    with Receiver() as r, serve_app(tmp_path / "srv", max_concurrent_jobs=1, **HOOKS) as ep:
        hook = r.url_for("localhost", "/hook")
        running = http.post(f"{ep.url}/v1/jobs/sample?detach=true", json={**long, "notify": hook}, headers=AUTH).json()["id"]
        queued = http.post(f"{ep.url}/v1/jobs/sample?detach=true", json={**TINY, "notify": hook}, headers=AUTH).json()["id"]
        wait_for(lambda: any(b["job_id"] == running and b["type"] == "started" for b in hooks(r)), timeout=30)
        assert http.delete(f"{ep.url}/v1/jobs/{queued}", headers=AUTH).json()["status"] == "cancelled"
        assert http.delete(f"{ep.url}/v1/jobs/{running}", headers=AUTH).json()["status"] == "cancelled"
        wait_for(lambda: {b["job_id"] for b in hooks(r) if b["type"] == "cancelled"} == {running, queued}, timeout=30)
        by_job = {j: [b["type"] for b in hooks(r) if b["job_id"] == j] for j in (running, queued)}
    assert by_job[queued] == ["cancelled"]  # it never started
    assert by_job[running][0] == "started" and by_job[running][-1] == "cancelled" and "finished" not in by_job[running]


def test_the_servers_webhook_settings_come_from_its_settings():
    from synapse_cli.config import resolve
    from synapse_cli.server.app import create_app

    settings = resolve(env={"SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_SERVE_ALLOW_HOSTS": "hooks.lan, 10.0.0.7",
                            "SYNAPSE_NOTIFY_RETRY_FOR_S": "9", "SYNAPSE_NOTIFY_ALLOW_HTTP": "true"})
    opts = create_app(settings, allow_anonymous=True).state.synapse
    assert (opts.notify_secret, opts.allow_hosts, opts.notify_retry_for_s, opts.notify_allow_http) == (SECRET, ("hooks.lan", "10.0.0.7"), 9.0, True)
    assert SECRET not in repr(opts)


def test_a_detached_job_sent_through_an_endpoint_notifies_from_the_server(cli, db, tiny, tmp_path):
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        env = {"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook")}
        run = cli("export", tiny, "-o", tmp_path / "det.mp4", *SMALL, "--endpoint", ep.url, "--detach", "--no-cache", env=env)
        assert run.exit_code == 0, run.stderr  # the client returned: the server tells the receiver
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=60)
        server_id = hooks(r)[-1]["job_id"]
        rec = http.get(f"{ep.url}/v1/jobs/{server_id}", headers=AUTH).json()
        assert rec["status"] == "completed" and hooks(r)[-1]["data"]["result"]["output"] == str(tmp_path / "det.mp4")


@pytest.mark.parametrize("kind", ["compile", "infer"])
def test_compile_and_infer_through_an_endpoint_have_the_server_notify(cli, db, tmp_path, kind):
    """Every kind, not export alone: the server signs and sends the webhooks of a compile and an infer job,
    and ``finished`` names the client's own output."""
    from tests.conftest import bus_image
    from tests.test_compile_cli import DATA

    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        env = {"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook")}
        if kind == "compile":
            args = [DATA / "person.json", "-o", tmp_path / "out", "--engine", "llguidance"]
        else:
            args = [bus_image(tmp_path / "in" / "bus.jpg"), "-o", tmp_path / "bus.json"]
        run = cli(kind, *args, "--endpoint", ep.url, env=env)
        assert run.exit_code == 0, run.stderr
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=60)
        bodies = hooks(r)
    assert bodies[0]["type"] == "started" and {b["kind"] for b in bodies} == {kind}
    result = bodies[-1]["data"]["result"]
    assert (result["output_dir"] == str(tmp_path / "out")) if kind == "compile" else (result["output"] == str(tmp_path / "bus.json"))


def _show(cli, job_id: str, env: dict) -> dict:
    shown = cli("jobs", "show", job_id, "--json", env=env)
    assert shown.exit_code == 0, shown.stderr
    return json.loads(shown.stdout)


def test_an_endpoint_jobs_deliveries_are_in_the_local_jobs_show(cli, db, tiny, tmp_path):
    """Attached: the server reports what became of each webhook at the end of the stream (it waits for the
    terminal delivery, as a local run does before it exits), and the client keeps them in its job store."""
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        r.rule = first_finished_fails_once()
        env = {"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook")}
        run = cli("export", tiny, "-o", tmp_path / "remote.mp4", "--json", *SMALL, "--endpoint", ep.url, env=env)
        assert run.exit_code == 0, run.stderr
        assert json.loads(run.stdout.splitlines()[-1])["type"] == "finished"  # --json's stream is unchanged: no report in it
        assert [b["type"] for b in hooks(r)].count("finished") == 2  # the client returned after the retried delivery
        [job] = json.loads(cli("jobs", "list", "--json", env=env).stdout)["jobs"]
        shown = _show(cli, job["id"], env)
        text = cli("jobs", "show", job["id"], env=env).stdout
    assert shown["status"] == "completed"
    webhooks = shown["webhooks"]
    assert webhooks[0]["event"] == "started" and webhooks[-1]["event"] == "finished"
    assert (webhooks[-1]["outcome"], webhooks[-1]["attempts"], webhooks[-1]["http_status"]) == ("delivered", 2, 200)
    assert {w["target"] for w in webhooks} == {r.url_for("localhost", "/hook")} and all(isinstance(w["at"], float) for w in webhooks)
    assert f"finished delivered HTTP 200 after 2 attempt(s) to {r.url_for('localhost', '/hook')}" in text


@pytest.mark.parametrize("show_first", [True, False])
def test_a_detached_endpoint_jobs_deliveries_reach_jobs_show_and_jobs_wait_adds_none_twice(cli, db, tiny, tmp_path, show_first):
    """``jobs show`` keeps what the server's record says of the webhooks so far; ``jobs wait`` asks for the
    server's report after the job's last event (``/events?report_webhooks=true``): each delivery once."""
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        env = {"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook")}
        run = cli("export", tiny, "-o", tmp_path / "det.mp4", *SMALL, "--endpoint", ep.url, "--detach", "--no-cache", "--json", env=env)
        assert run.exit_code == 0, run.stderr
        job_id = json.loads(run.stdout)["job_id"]
        if show_first:
            wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=60)
            server_id = hooks(r)[-1]["job_id"]
            wait_for(lambda: http.get(f"{ep.url}/v1/jobs/{server_id}", headers=AUTH).json().get("webhooks", [{}])[-1].get("event") == "finished")
            early = _show(cli, job_id, env)  # not downloaded yet: `jobs show` asks the server, and keeps what it says of the webhooks
            assert "not downloaded yet" in early["outputs"] and early["webhooks"][-1]["event"] == "finished"
        waited = cli("jobs", "wait", job_id, env=env)
        assert waited.exit_code == 0, waited.stderr
        shown = _show(cli, job_id, env)
        server_id = hooks(r)[-1]["job_id"]
        server = http.get(f"{ep.url}/v1/jobs/{server_id}", headers=AUTH).json()["webhooks"]
    assert shown["status"] == "completed"
    assert [(w["event"], w["outcome"], w["attempts"]) for w in shown["webhooks"]] == [(w["event"], w["outcome"], w["attempts"]) for w in server]
    assert shown["webhooks"][0]["event"] == "started" and shown["webhooks"][-1]["event"] == "finished"
    assert shown["webhooks"][-1]["outcome"] == "delivered"


def test_the_server_reports_the_webhooks_only_to_a_client_that_asks(tmp_path):
    """``?report_webhooks=true``: a streamed job's last line, and a detached job's ``/events`` after its last event,
    is a ``webhooks`` line; without it the streams are unchanged (the last line is ``finished``)."""
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        body = {**TINY, "notify": r.url_for("localhost", "/hook")}
        with http.stream("POST", f"{ep.url}/v1/jobs/sample?report_webhooks=true", json=body, headers=AUTH, timeout=60) as resp:
            lines = [json.loads(line) for line in resp.iter_lines() if line.strip()]
        assert [e["type"] for e in lines[-2:]] == ["finished", "webhooks"]
        assert lines[-1]["webhooks"][-1]["event"] == "finished" and lines[-1]["webhooks"][-1]["outcome"] == "delivered"
        job_id = http.post(f"{ep.url}/v1/jobs/sample?detach=true", json=body, headers=AUTH).json()["id"]
        plain = http.get(f"{ep.url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=60).text.splitlines()
        assert json.loads(plain[-1])["type"] == "finished"
        told = [json.loads(line) for line in http.get(f"{ep.url}/v1/jobs/{job_id}/events?report_webhooks=true", headers=AUTH, timeout=60).text.splitlines()]
        assert [e["type"] for e in told[-2:]] == ["finished", "webhooks"] and "index" not in told[-1]
        assert [w["event"] for w in told[-1]["webhooks"]][-1] == "finished"
        bad = http.get(f"{ep.url}/v1/jobs/{job_id}/events?report_webhooks=maybe", headers=AUTH)
        assert bad.status_code == 422 and "report_webhooks" in bad.json()["message"]
        with http.stream("POST", f"{ep.url}/v1/jobs/sample?report_webhooks=1", json=TINY, headers=AUTH, timeout=60) as resp:
            quiet = [json.loads(line) for line in resp.iter_lines() if line.strip()]
        assert quiet[-1] == {"type": "webhooks", "webhooks": []}  # no notify: nothing was sent


def test_an_endpoint_compile_that_fails_after_its_result_reports_both_webhooks(cli, db, tmp_path):
    """compile with one broken schema through an endpoint: ``finished``, then the ``error`` (events.Outcome); the
    client exits 1 as a local run does, and its ``jobs show`` lists both terminal deliveries the server made."""
    import shutil

    pytest.importorskip("llguidance")
    from tests.test_compile_cli import DATA

    batch = tmp_path / "schemas"
    batch.mkdir()
    for name in ("person.json", "bad-ref.json"):
        shutil.copy(DATA / name, batch / name)
    with Receiver() as r, serve_app(tmp_path / "srv", **HOOKS) as ep:
        env = {"SYNAPSE_API_KEY": API_KEY, "SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook"), "SYNAPSE_COMPILE_ENGINE_TIMEOUT_S": "120"}
        run = cli("compile", batch, "-o", tmp_path / "out", "--engine", "llguidance", "--json", "--endpoint", ep.url, env=env)
        assert run.exit_code == 1, run.stderr
        assert [json.loads(line)["type"] for line in run.stdout.splitlines()][-2:] == ["finished", "error"]
        [job] = json.loads(cli("jobs", "list", "--json", env=env).stdout)["jobs"]
        shown = _show(cli, job["id"], env)
    assert shown["status"] == "failed" and shown["result"]["failed"] == 1 and (tmp_path / "out" / "person.lark").exists()
    assert [(w["event"], w["outcome"]) for w in shown["webhooks"]][-2:] == [("finished", "delivered"), ("error", "delivered")]
