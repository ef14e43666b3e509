"""Webhooks from real jobs, sent from where each job runs: a receiver on loopback verifies every
delivery with the reference ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import json

import pytest
from standardwebhooks import Webhook

from tests.conftest import probe, wait_for
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
def deployed(modal_fake):
    from modal_functions import app as modal_app

    modal_app.app.deploy(name="synapse")
    return modal_fake


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
    assert SECRET[6:] not in db.read_bytes().decode("latin-1")


def test_a_detached_modal_job_refuses_a_loopback_target_in_its_container(cli, db, deployed, tiny, tmp_path):
    with Receiver() as r:
        env = {"SYNAPSE_NOTIFY_URL": r.url + "/hook", "SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_ALLOW_HTTP": "1"}
        run = cli("export", tiny, "--use-modal", "--detach", "-o", tmp_path / "remote.mp4", *SMALL, env=env)
        assert run.exit_code == 0, run.stderr
        job_id = run.stdout.strip()
        waited = cli("jobs", "wait", job_id, "--json")
        assert waited.exit_code == 0, waited.stderr  # the job completes: a refused webhook never fails it
        assert r.requests == []  # 127.0.0.1 from a container: refused by the guard


def test_notify_with_detached_modal_shards_is_refused_in_one_line(cli, db, deployed, long_clip, tmp_path):
    env = {"SYNAPSE_NOTIFY_URL": "https://hooks.example/x", "SYNAPSE_NOTIFY_SECRET": SECRET}
    run = cli("export", long_clip, "--use-modal", "--detach", "--shards", "2", "-o", tmp_path / "o.mp4", env=env)
    assert run.exit_code == 2 and "--notify with --detach --shards on Modal" in run.stderr
