"""Webhooks from real jobs, sent from where each job runs: a receiver on loopback verifies every
delivery with the reference ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import json

import pytest
from standardwebhooks import Webhook

from tests.conftest import probe, wait_for
from tests.modal_fake.fixtures import synapse_deployed
from tests.receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
SMALL = ["--set", "output_width=90", "--set", "output_height=160"]


def hooks(receiver: Receiver) -> list[dict]:
    hook = Webhook(SECRET)
    return [hook.verify(r.body, r.headers) for r in receiver.requests]


def test_a_detached_local_job_notifies_from_its_worker_with_the_client_gone(cli, db, tiny, tmp_path):
    with Receiver() as r:
        env = {"SYNAPSE_NOTIFY_URL": r.url + "/hook", "SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_PROGRESS_INTERVAL_S": "0.5"}
        run = cli("export", tiny, "-o", tmp_path / "d.mp4", "--detach", *SMALL, env=env)
        assert run.exit_code == 0, run.stderr  # the client is gone: only the worker is left to notify
        job_id = run.stdout.strip()
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=60)
        bodies = hooks(r)
    assert bodies[0]["type"] == "started" and bodies[-1]["type"] == "finished"
    assert {b["job_id"] for b in bodies} == {job_id}
    finished = bodies[-1]["data"]
    assert finished["result"]["output"] == str(tmp_path / "d.mp4")
    assert [a["path"] for a in finished["artifacts"]] == [str(tmp_path / "d.mp4")]
    assert probe(tmp_path / "d.mp4").width == 90
    wait_for(lambda: json.loads(cli("jobs", "show", job_id, "--json").stdout).get("webhooks", [{}])[-1].get("event") == "finished", timeout=15)
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "completed"
    assert [(w["event"], w["outcome"]) for w in shown["webhooks"]][-1] == ("finished", "delivered")
    assert SECRET[6:] not in json.dumps(shown)
    for f in db.parent.rglob("*"):  # the store, its -wal, the worker's log
        if f.is_file():
            assert SECRET[6:].encode() not in f.read_bytes(), f


@pytest.fixture
def deployed(modal_deployment, monkeypatch):
    with synapse_deployed(modal_deployment, monkeypatch) as fake:
        yield fake


def test_a_detached_modal_job_notifies_from_its_container_with_the_client_gone(cli, db, deployed, tiny, tmp_path):
    with Receiver() as r:
        env = {"SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook"), "SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_ALLOW_HTTP": "1",
               "SYNAPSE_SERVE_ALLOW_HOSTS": "localhost"}  # the container's URL guard admits the test's receiver by name
        run = cli("export", tiny, "--use-modal", "--detach", "--json", "-o", tmp_path / "remote.mp4", *SMALL, env=env)
        assert run.exit_code == 0, run.stderr
        job_id = json.loads(run.stdout)["job_id"]
        call = deployed.function_calls[-1]
        assert call.function_name == "export_detached"
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=60)  # nobody is waiting on the job
        bodies = hooks(r)
    assert [b["type"] for b in bodies][0] == "started" and bodies[-1]["type"] == "finished"
    assert {b["job_id"] for b in bodies} == {job_id}
    assert bodies[-1]["data"]["result"]["output"].startswith("vol:")  # where the output is: on the Volume until jobs wait fetches it
    waited = cli("jobs", "wait", job_id, "--json")  # later, a client: the container's deliveries come with the job
    assert waited.exit_code == 0, waited.stderr
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert [(w["event"], w["outcome"]) for w in shown["webhooks"]][-1] == ("finished", "delivered")
    assert shown["webhooks"][-1]["target"] == r.url_for("localhost", "/hook")
    for f in db.parent.rglob("*"):
        if f.is_file():
            assert SECRET[6:].encode() not in f.read_bytes(), f


def test_a_detached_modal_job_refuses_a_loopback_target_in_its_container(cli, db, deployed, tiny, tmp_path):
    with Receiver() as r:
        env = {"SYNAPSE_NOTIFY_URL": r.url + "/hook", "SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_ALLOW_HTTP": "1"}
        run = cli("export", tiny, "--use-modal", "--detach", "-o", tmp_path / "remote.mp4", *SMALL, env=env)
        assert run.exit_code == 0, run.stderr
        job_id = run.stdout.strip()
        waited = cli("jobs", "wait", job_id, "--json")
        assert waited.exit_code == 0, waited.stderr  # the job completes: a refused webhook never fails it
        assert r.requests == []  # 127.0.0.1 from a container: refused by the guard
    final = json.loads(cli("jobs", "show", job_id, "--json").stdout)["webhooks"][-1]
    assert (final["event"], final["outcome"], final["attempts"]) == ("finished", "failed", 1) and "loopback" in final["detail"]


def test_a_detached_sharded_modal_job_merges_in_a_container_and_notifies_finished_once(cli, db, deployed, tmp_path):
    """No client waits: export_sharded_detached splits the job, runs its shards as calls of export,
    merges them in its container and sends one delivery stream, ``finished`` once, with the merged result."""
    from tests.conftest import make_clip

    clip = make_clip(tmp_path / "clip.mp4", size="320x180", seconds=3.0)
    with Receiver() as r:
        env = {"SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook"), "SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_ALLOW_HTTP": "1",
               "SYNAPSE_SERVE_ALLOW_HOSTS": "localhost"}
        run = cli("export", clip, "--use-modal", "--detach", "--shards", "2", "--json", "-o", tmp_path / "o.mp4", *SMALL, env=env)
        assert run.exit_code == 0, run.stderr
        job_id = json.loads(run.stdout)["job_id"]
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=120)  # nobody is waiting on the job
        bodies = hooks(r)
    names = [c.function_name for c in deployed.function_calls]
    assert names.count("export_sharded_detached") == 1 and names.count("export") == 2, names
    types = [b["type"] for b in bodies]
    assert types[0] == "started" and types.count("started") == 1 and types.count("finished") == 1 and types[-1] == "finished"
    assert {b["job_id"] for b in bodies} == {job_id}
    assert [s["index"] for s in bodies[-1]["data"]["result"]["shards"]] == [0, 1]
    waited = cli("jobs", "wait", job_id, "--json")  # later, a client: it fetches the one merged output
    assert waited.exit_code == 0, waited.stderr
    assert probe(tmp_path / "o.mp4").width == 90 and abs(probe(tmp_path / "o.mp4").duration - 3.0) < 0.2
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert [(w["event"], w["outcome"]) for w in shown["webhooks"]][-1] == ("finished", "delivered")
    assert not [p for p in deployed.volume_files("synapse-data") if p.startswith("outputs/")]


# -- attached runs: sent by this process, the terminal delivery waited for before it exits ---------------


def test_an_attached_local_export_notifies_and_jobs_show_lists_the_deliveries(cli, db, tiny, tmp_path):
    with Receiver() as r:
        run = cli("export", tiny, "-o", tmp_path / "a.mp4", "--json", *SMALL, "--notify", r.url + "/hook",
                  env={"SYNAPSE_NOTIFY_SECRET": SECRET})  # plain http:// to this machine: fine on the local backend
        assert run.exit_code == 0, run.stderr
        bodies = hooks(r)  # no waiting: the command returned after its terminal delivery
    types = [b["type"] for b in bodies]
    assert types[0] == "started" and types[-1] == "finished" and set(types[1:-1]) <= {"progress"}
    # a progress goes out only if the sender is free before the job ends (a terminal message drops one still
    # waiting: tests/test_notify.py pins that down); any that went out carries one of the job's own events
    emitted = [{k: v for k, v in e.items() if k != "type"} for e in run.events() if e["type"] == "progress"]
    assert emitted and all(b["data"] in emitted for b in bodies if b["type"] == "progress"), (bodies, emitted)
    job_id = bodies[0]["job_id"]
    assert bodies[-1]["data"]["result"] == run.events()[-1]["result"]
    shown = cli("jobs", "show", job_id)
    assert "webhook        finished delivered HTTP 200 after 1 attempt(s)" in shown.stdout
    assert SECRET[6:] not in run.stdout + run.stderr


def test_a_sharded_attached_export_sends_one_stream(cli, db, long_clip, tmp_path):
    with Receiver() as r:
        run = cli("export", long_clip, "-o", tmp_path / "s.mp4", *SMALL, "--shards", "2", "--no-cache", "--notify", r.url,
                  env={"SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_FFMPEG_PRESET": "ultrafast"})
        assert run.exit_code == 0, run.stderr
        types = [b["type"] for b in hooks(r)]
    assert types.count("started") == 1 and types.count("finished") == 1 and types[-1] == "finished"
    assert [s["index"] for s in hooks(r)[-1]["data"]["result"]["shards"]] == [0, 1]


def test_compile_notifies(cli, db, tmp_path):
    from tests.test_compile_cli import DATA

    with Receiver() as r:
        run = cli("compile", DATA / "person.json", "-o", tmp_path / "out", "--engine", "llguidance", "--notify", r.url,
                  env={"SYNAPSE_NOTIFY_SECRET": SECRET})
        assert run.exit_code == 0, run.stderr
        bodies = hooks(r)
    assert bodies[0]["type"] == "started" and bodies[-1]["type"] == "finished" and bodies[0]["kind"] == "compile"


def test_infer_notifies(cli, db, tmp_path):
    from tests.conftest import bus_image

    image = bus_image(tmp_path / "in" / "bus.jpg")
    with Receiver() as r:
        run = cli("infer", image, "-o", tmp_path / "bus.json", "--notify", r.url, env={"SYNAPSE_NOTIFY_SECRET": SECRET})
        assert run.exit_code == 0, run.stderr
        bodies = hooks(r)
    assert bodies[0]["kind"] == "infer" and bodies[-1]["type"] == "finished"
    assert bodies[-1]["data"]["result"]["output"] == str(tmp_path / "bus.json")


def test_the_api_takes_notify(db, tiny, tmp_path):
    import synapse_cli as synapse
    from synapse_cli.events import Finished

    with Receiver() as r, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNAPSE_NOTIFY_SECRET", SECRET)
        events = list(synapse.export(tiny, output=tmp_path / "api.mp4", params={"output_width": 90, "output_height": 160}, notify=r.url))
        assert isinstance(events[-1], Finished)
        assert [b["type"] for b in hooks(r)][-1] == "finished"


def test_a_failing_job_notifies_its_error_and_keeps_its_exit_code(cli, db, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with Receiver() as r:
        run = cli("export", bad, "-o", tmp_path / "o.mp4", "--notify", r.url, env={"SYNAPSE_NOTIFY_SECRET": SECRET})
        bodies = hooks(r)
    assert run.exit_code != 0
    assert bodies[-1]["type"] == "error" and bodies[-1]["data"]["code"] == run.exit_code


def test_a_dead_receiver_never_fails_an_attached_job(cli, db, tiny, tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    run = cli("export", tiny, "-o", tmp_path / "d.mp4", *SMALL, "--notify", f"http://127.0.0.1:{port}/hook",
              env={"SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_RETRY_FOR_S": "1"})
    assert run.exit_code == 0, run.stderr
    assert "Warning: webhook finished to" in run.stderr and "failed after" in run.stderr
    assert probe(tmp_path / "d.mp4").width == 90


def test_notify_without_a_secret_or_over_plain_http_elsewhere_is_one_line(cli, db, tiny, tmp_path):
    run = cli("export", tiny, "-o", tmp_path / "x.mp4", "--notify", "https://hooks.example/x")
    assert run.exit_code == 2 and "SYNAPSE_NOTIFY_SECRET" in run.stderr and "Traceback" not in run.stderr
    run = cli("export", tiny, "-o", tmp_path / "x.mp4", "--notify", "ftp://hooks.example/x", env={"SYNAPSE_NOTIFY_SECRET": SECRET})
    assert run.exit_code == 2 and "expected an https:// URL" in run.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_an_attached_modal_run_notifies_from_the_client(cli, db, deployed, tiny, tmp_path):
    with Receiver() as r:
        run = cli("export", tiny, "--use-modal", "-o", tmp_path / "m.mp4", *SMALL, "--notify", r.url, env={"SYNAPSE_NOTIFY_SECRET": SECRET})
        assert run.exit_code == 0, run.stderr
        bodies = hooks(r)
    assert bodies[-1]["type"] == "finished" and bodies[-1]["data"]["result"]["output"] == str(tmp_path / "m.mp4")


def test_a_detached_sharded_local_job_sends_one_stream_from_its_worker(db, long_clip, tmp_path, monkeypatch):
    import synapse_cli as synapse

    monkeypatch.setenv("SYNAPSE_NOTIFY_SECRET", SECRET)
    monkeypatch.setenv("SYNAPSE_FFMPEG_PRESET", "ultrafast")
    with Receiver() as r:
        job = synapse.submit("export", long_clip, output=tmp_path / "sd.mp4", params={"output_width": 90, "output_height": 160},
                             shards=2, cache=False, notify=r.url)  # the API's detached form
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=120)
        types = [b["type"] for b in hooks(r)]
    assert types.count("started") == 1 and types.count("finished") == 1 and types[-1] == "finished"
    assert {b["job_id"] for b in hooks(r)} == {job.id}
    assert [s["index"] for s in hooks(r)[-1]["data"]["result"]["shards"]] == [0, 1]


def test_a_reused_result_is_announced_too(cli, db, tiny, tmp_path):
    with Receiver() as r:
        env = {"SYNAPSE_NOTIFY_SECRET": SECRET}
        first = cli("export", tiny, "-o", tmp_path / "1.mp4", *SMALL, "--notify", r.url, env=env)
        second = cli("export", tiny, "-o", tmp_path / "2.mp4", *SMALL, "--notify", r.url, env=env)  # identical: from the result cache
        assert first.exit_code == second.exit_code == 0, second.stderr
        by_job: dict = {}
        for b in hooks(r):
            by_job.setdefault(b["job_id"], []).append(b)
    assert len(by_job) == 2
    reused = list(by_job.values())[-1]
    assert reused[-1]["type"] == "finished" and reused[-1]["data"]["result"]["output"] == str(tmp_path / "2.mp4")


@pytest.mark.parametrize("kind", ["compile", "infer"])
def test_detached_compile_and_infer_on_modal_notify_from_the_container(cli, db, deployed, tmp_path, kind):
    """Every kind on Modal, not export alone: a detached compile and infer send their webhooks from the container."""
    from tests.conftest import bus_image
    from tests.test_compile_cli import DATA

    with Receiver() as r:
        env = {"SYNAPSE_NOTIFY_URL": r.url_for("localhost", "/hook"), "SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_ALLOW_HTTP": "1",
               "SYNAPSE_SERVE_ALLOW_HOSTS": "localhost"}
        if kind == "compile":
            args = [DATA / "person.json", "-o", tmp_path / "out", "--engine", "llguidance"]
        else:
            args = [bus_image(tmp_path / "in" / "bus.jpg"), "-o", tmp_path / "bus.json"]
        run = cli(kind, *args, "--use-modal", "--detach", "--json", env=env)
        assert run.exit_code == 0, run.stderr
        job_id = json.loads(run.stdout)["job_id"]
        assert deployed.function_calls[-1].function_name == f"{kind}_detached"
        wait_for(lambda: any(b["type"] == "finished" for b in hooks(r)), timeout=120)
        bodies = hooks(r)
    assert bodies[0]["type"] == "started" and {b["job_id"] for b in bodies} == {job_id} and {b["kind"] for b in bodies} == {kind}
    waited = cli("jobs", "wait", job_id, "--json")
    assert waited.exit_code == 0, waited.stderr
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert [(w["event"], w["outcome"]) for w in shown["webhooks"]][-1] == ("finished", "delivered")
