"""Issue #15, the client side: `--endpoint --detach`, then `synapse jobs list/show/wait/cancel` on the
endpoint's job, through a real `synapse serve` process on loopback and the real CLI in processes of
its own. The one thing between them that is not ours is a small TCP relay (``Relay``) that a test
cuts and restarts while `jobs wait` follows the job's events."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import ContextManager, Iterator

import psutil
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (fastapi, uvicorn)")

from synapse_cli.store import JobStore
from tests.conftest import INTERRUPTIBLE, bus_image, make_clip, probe, results_header, synapse_cmd
from tests.http_fixtures import API_KEY, Served, http, paused, serve_process, server_ffmpeg

SMALL = ["--set", "output_width=270", "--set", "output_height=480"]  # a fast encode
# long_clip at SMALL on one thread: a few seconds of ffmpeg on a quiet machine, a progress event every 0.5 s of them
ONE_THREAD = {"SYNAPSE_FFMPEG_THREADS": "1"}
TINY_FRAME = ["--set", "output_width=90", "--set", "output_height=160"]  # where the encode is beside the point
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """One `synapse serve` process for the module (key ``API_KEY``)."""
    with serve_process(tmp_path_factory.mktemp("server"), stop_timeout_s=20) as running:
        yield running


@pytest.fixture(scope="module")
def server(served: Served) -> str:
    """Its URL."""
    return served.url


def synapse(*args: object, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    """The CLI in a process of its own."""
    return subprocess.run([*synapse_cmd(), *map(str, args)], capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout)


def client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"SYNAPSE_JOBS_DB": str(tmp_path / "jobs.db"), "SYNAPSE_API_KEY": API_KEY, "SYNAPSE_HTTP_INITIAL_BACKOFF_MS": "50", **extra}


def detach(src: Path, out: Path, endpoint: str, env: dict[str, str], *extra: str) -> str:
    run = synapse("export", src, "-o", out, "--endpoint", endpoint, "--detach", "--json", *extra, env=env)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["status"] == "pending" and answer["backend"] == "http"
    return answer["job_id"]


def events(run: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


def stored(db: Path, job_id: str) -> list[dict]:
    store = JobStore(db)
    try:
        return [data for _, data in store.events(job_id)]
    finally:
        store.close()


def row(db: Path, job_id: str):
    store = JobStore(db)
    try:
        return store.get(job_id)
    finally:
        store.close()


def server_events(server: str, remote_id: str) -> list[dict]:
    r = http.get(f"{server}/v1/jobs/{remote_id}/events", params={"after": 0}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return [e for e in map(json.loads, filter(str.strip, r.text.splitlines())) if e.get("type") != "keepalive"]


def events_until(server: str, remote_id: str, enough) -> list[dict]:
    """The job's events from the first, read from the server as they come, until ``enough(events)`` (then the stream is closed)."""
    out: list[dict] = []
    with http.stream("GET", f"{server}/v1/jobs/{remote_id}/events", params={"after": 0}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.strip() and (event := json.loads(line))["type"] != "keepalive":
                out.append(event)
                if enough(out):
                    break
    return out


def pause_its_ffmpeg(served: Served, remote_id: str, enough) -> ContextManager[psutil.Process]:
    """Once the job has sent ``enough`` events (a predicate on the list so far), its ffmpeg, paused (``paused``):
    the job then stays part-way through, for as long as the test needs, with nothing encoded meanwhile."""
    events = events_until(served.url, remote_id, enough)
    assert events and events[-1]["type"] not in ("finished", "error"), events[-3:]
    ffmpeg = until(lambda: server_ffmpeg(served, remote_id), 30)
    assert ffmpeg is not None, "the job's ffmpeg was not found"
    return paused(ffmpeg)


def no_temp_files(folder: Path) -> bool:
    return not any(".part" in p.name for p in folder.iterdir())


def until(predicate, timeout_s: float, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return predicate()


# -- submit, then wait from a second process ---------------------------------------------------------


def test_detach_prints_the_id_and_jobs_wait_from_another_process_downloads_the_output(server, tiny, tmp_path):
    env = client_env(tmp_path)
    out = tmp_path / "out.mp4"
    job_id = detach(tiny, out, server, env, *SMALL)
    job = row(tmp_path / "jobs.db", job_id)
    assert job.backend == "http" and job.status == "processing"
    assert job.remote["endpoint"] == server and job.remote["id"]
    assert API_KEY.encode() not in (tmp_path / "jobs.db").read_bytes()  # the store keeps no key
    # the job runs on the server with nobody connected
    assert until(lambda: http.get(f"{server}/v1/jobs/{job.remote['id']}", headers=AUTH).json()["status"] == "completed", 60)
    assert not out.exists()

    waited = synapse("jobs", "wait", job_id, "--json", env=env)
    assert waited.returncode == 0, waited.stderr
    lines = events(waited)
    assert lines[0]["type"] == "started" and lines[-1]["type"] == "finished"
    assert [e["path"] for e in lines if e["type"] == "artifact"] == [str(out)]
    assert lines[-1]["result"]["output"] == str(out)
    assert probe(out).width == 270 and no_temp_files(tmp_path)
    assert row(tmp_path / "jobs.db", job_id).status == "completed"
    # the store mirrors the server's events one for one
    assert stored(tmp_path / "jobs.db", job_id) == [{k: v for k, v in e.items() if k != "index"} for e in server_events(server, job.remote["id"])]

    again = synapse("jobs", "wait", job_id, env=env)  # a finished job: its stored events, exit 0
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_a_detached_infer_results_file_names_the_clients_source(server, tmp_path):
    """`infer --endpoint --detach`, then `jobs wait`: the downloaded results' header is a local run's, the client's path in it."""
    env = client_env(tmp_path)
    bus, out = bus_image(tmp_path / "in" / "bus.jpg"), tmp_path / "detached.json"
    run = synapse("infer", bus, "-o", out, "--endpoint", server, "--detach", "--json", env=env)
    assert run.returncode == 0, run.stderr
    waited = synapse("jobs", "wait", json.loads(run.stdout)["job_id"], "--json", env=env)
    assert waited.returncode == 0, waited.stderr
    assert events(waited)[-1]["result"]["output"] == str(out)
    local = synapse("infer", bus, "-o", tmp_path / "local.json", "--no-modal", "--no-cache", env=env)
    assert local.returncode == 0, local.stderr
    assert json.loads(out.read_text())["source"] == str(bus)
    assert results_header(out) == results_header(tmp_path / "local.json")


def test_an_output_that_appeared_meanwhile_is_not_clobbered_and_a_later_wait_still_downloads(server, tiny, tmp_path):
    env = client_env(tmp_path)
    out = tmp_path / "out.mp4"
    job_id = detach(tiny, out, server, env, *SMALL)
    out.write_bytes(b"someone else's file")
    refused = synapse("jobs", "wait", job_id, env=env)
    assert refused.returncode == 2 and "already exists" in refused.stderr, refused.stderr
    assert out.read_bytes() == b"someone else's file" and no_temp_files(tmp_path)
    assert row(tmp_path / "jobs.db", job_id).status == "processing"  # its outputs are still to come

    out.unlink()
    waited = synapse("jobs", "wait", job_id, env=env)  # every event is stored: nothing to follow, only the download
    assert waited.returncode == 0, waited.stderr
    assert probe(out).width == 270 and row(tmp_path / "jobs.db", job_id).status == "completed"
    remote = server_events(server, row(tmp_path / "jobs.db", job_id).remote["id"])
    assert stored(tmp_path / "jobs.db", job_id) == [{k: v for k, v in e.items() if k != "index"} for e in remote]  # none twice


def test_an_existing_output_is_refused_before_anything_is_sent(server, tiny, tmp_path):
    env = client_env(tmp_path)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    before = http.get(f"{server}/v1/jobs", headers=AUTH).json()["jobs"]
    run = synapse("export", tiny, "-o", out, "--endpoint", server, "--detach", *SMALL, env=env)
    assert run.returncode == 2 and "already exists" in run.stderr
    assert http.get(f"{server}/v1/jobs", headers=AUTH).json()["jobs"] == before
    assert out.read_bytes() == b"keep me"


# -- show, list and cancel a running job ----------------------------------------------------------


def test_show_and_list_ask_the_endpoint_for_progress_and_cancel_stops_the_job(cli, served, long_clip, tmp_path):
    server = served.url
    env = client_env(tmp_path)
    out = tmp_path / "out.mp4"
    job_id = detach(long_clip, out, server, env, *SMALL)
    remote_id = row(tmp_path / "jobs.db", job_id).remote["id"]

    def progress():
        shown = cli("jobs", "show", job_id, "--json", env=env)
        assert shown.exit_code == 0, shown.stderr
        data = json.loads(shown.stdout)
        moving = data["status"] == "processing" and data["progress"] and float(data["progress"].split("/")[0]) > 0
        return data if moving else None  # the first look can come before the first frame: 0/N

    # paused after its first progress event, until the cancel kills it: part-way through, however fast the machine
    with pause_its_ffmpeg(served, remote_id, lambda events: events[-1]["type"] == "progress"):
        data = until(progress, 60, every_s=0.3)
        assert data, "jobs show never showed the endpoint's progress"
        done, total = map(float, data["progress"].split("/"))
        assert 0 < done < total and data["endpoint"].startswith(server)
        listed = cli("jobs", "list", env=env)
        assert listed.exit_code == 0
        (line,) = [row for row in listed.stdout.splitlines() if row.startswith(job_id)]
        assert " processing " in line and "/" in line.split()[3]

        cancelled = cli("jobs", "cancel", job_id, env=env)
        assert cancelled.exit_code == 0, cancelled.stderr
    assert http.get(f"{server}/v1/jobs/{remote_id}", headers=AUTH).json()["status"] == "cancelled"
    assert json.loads(cli("jobs", "show", job_id, "--json", env=env).stdout)["status"] == "cancelled"
    waited = synapse("jobs", "wait", job_id, env=env)
    assert waited.returncode == 130, waited.stderr
    assert not out.exists() and no_temp_files(tmp_path)
    again = cli("jobs", "cancel", job_id, env=env)
    assert again.exit_code == 2 and "already cancelled" in again.stderr


def test_a_job_the_server_does_not_have_is_exit_3_and_failed(cli, server, tiny, tmp_path):
    env = client_env(tmp_path)
    job_id = detach(tiny, tmp_path / "out.mp4", server, env, *SMALL)
    store = JobStore(tmp_path / "jobs.db")
    store.set_remote(job_id, {**store.get(job_id).remote, "id": "jnosuchjob000"})
    store.close()
    waited = synapse("jobs", "wait", job_id, env=env)
    assert waited.returncode == 3 and "has no job jnosuchjob000" in waited.stderr, waited.stderr
    assert row(tmp_path / "jobs.db", job_id).status == "failed"


def test_a_wrong_key_is_exit_3_and_the_job_stays_waitable(server, tiny, tmp_path):
    env = client_env(tmp_path)
    out = tmp_path / "out.mp4"
    job_id = detach(tiny, out, server, env, *SMALL)
    refused = synapse("jobs", "wait", job_id, env={**env, "SYNAPSE_API_KEY": "not-the-key-0123456789"})
    assert refused.returncode == 3 and "endpoint rejected the API key" in refused.stderr
    assert row(tmp_path / "jobs.db", job_id).status == "processing"
    assert synapse("jobs", "wait", job_id, env=env).returncode == 0 and out.exists()


# -- a connection that drops mid-stream ------------------------------------------------------------


class Relay:
    """A TCP relay on a loopback port to ``target``, that ``cut()`` closes (every connection, and the
    port) and ``restart()`` opens again on the same port."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.port = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.generation = 0  # which listener is the open one: a connection accepted just before a cut is closed too
        self.restart()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        with self.lock:
            self.generation += 1
        threading.Thread(target=self._accept, args=(self.listener, self.generation), daemon=True).start()

    def cut(self) -> None:
        self.listener.close()
        with self.lock:
            self.generation += 1
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket, generation: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                if generation != self.generation:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_connection_cut_mid_events_resumes_with_no_gap_and_no_duplicate(served, long_clip, tmp_path):
    server = served.url
    relay = Relay(server)
    env = client_env(tmp_path, **ONE_THREAD)
    db, out = tmp_path / "jobs.db", tmp_path / "out.mp4"
    try:
        job_id = detach(long_clip, out, relay.url, env, *SMALL)
        with open(tmp_path / "wait.err", "w") as err:
            waiting = subprocess.Popen([*synapse_cmd(), "jobs", "wait", job_id, "--json"], stdout=subprocess.PIPE, stderr=err,
                                       text=True, env={**os.environ, **env})  # fmt: skip
        said: list[str] = []  # its --json lines, as they come (the store gets them in batches)
        reader = threading.Thread(target=lambda: said.extend(iter(waiting.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            # The job must still run at the cut, a few seconds of ffmpeg after its start: it is paused at its first
            # progress event until jobs wait (a second or more to start) follows it, and then runs across the cut.
            with pause_its_ffmpeg(served, row(db, job_id).remote["id"], lambda events: events[-1]["type"] == "progress"):
                assert until(lambda: any(json.loads(line)["type"] == "progress" for line in said), 60), "jobs wait printed no progress"
            assert until(lambda: len(stored(db, job_id)) >= 3, 60), "jobs wait recorded no events"
            relay.cut()
            cut_at = len(stored(db, job_id))
            assert stored(db, job_id)[-1]["type"] in ("started", "progress"), "the job ended before the cut"
            time.sleep(1.0)  # connections are refused meanwhile: jobs wait retries with backoff
            relay.restart()
            waiting.wait(timeout=180)
            reader.join(timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
        assert waiting.returncode == 0, (tmp_path / "wait.err").read_text()
    finally:
        relay.cut()
    lines = [json.loads(line) for line in said if line.strip()]
    resumed = [e["message"] for e in lines if e["type"] == "log" and "resuming from event" in e["message"]]
    assert resumed, "the connection was not cut mid-stream"
    assert int(resumed[0].rsplit(" ", 1)[1]) >= cut_at
    remote = server_events(server, row(db, job_id).remote["id"])
    assert remote[-1]["type"] == "finished" and len(remote) > cut_at  # events came after the cut
    assert [e["index"] for e in remote] == list(range(len(remote)))
    # the store holds each of the server's events once, in order; so does what jobs wait printed
    assert stored(db, job_id) == [{k: v for k, v in e.items() if k != "index"} for e in remote]
    printed = [e for e in lines if e["type"] in ("started", "progress")]
    assert printed == [{k: v for k, v in e.items() if k != "index"} for e in remote if e["type"] in ("started", "progress")]
    assert probe(out).width == 270 and no_temp_files(tmp_path)


def test_an_interrupted_wait_leaves_the_job_running_and_the_next_wait_goes_on_from_the_store(served, long_clip, tmp_path):
    server = served.url
    env = client_env(tmp_path, **ONE_THREAD)
    db, out = tmp_path / "jobs.db", tmp_path / "out.mp4"
    job_id = detach(long_clip, out, server, env, *SMALL)
    remote_id = row(db, job_id).remote["id"]
    # The job must still run when the wait is interrupted: on a quiet machine it takes a few seconds, and a
    # loaded one can start `jobs wait` later than that. Its ffmpeg is paused from its third event until then.
    with pause_its_ffmpeg(served, remote_id, lambda events: len(events) >= 3):
        first = subprocess.Popen([*synapse_cmd(), "jobs", "wait", job_id, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, **env}, **INTERRUPTIBLE)  # fmt: skip
        printed: list[str] = []  # its --json lines, as they come (the store gets them in batches)
        reader = threading.Thread(target=lambda: printed.extend(iter(first.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            assert until(lambda: len(printed) >= 3, 60), "jobs wait printed no events"
            first.send_signal(signal.SIGINT)  # Ctrl-C: stop waiting, not the job
            first.wait(timeout=30)
            reader.join(timeout=30)
            stderr = first.stderr.read()
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 130, stderr
    assert stored(db, job_id), "the interrupted wait left nothing in the store"
    kept = len(stored(db, job_id))
    assert row(db, job_id).status == "processing"
    assert http.get(f"{server}/v1/jobs/{remote_id}", headers=AUTH).json()["status"] in ("processing", "completed")
    assert not out.exists() and no_temp_files(tmp_path)

    second = synapse("jobs", "wait", job_id, "--json", env=env)
    assert second.returncode == 0, second.stderr
    remote = server_events(server, remote_id)
    assert len(remote) > kept
    assert stored(db, job_id) == [{k: v for k, v in e.items() if k != "index"} for e in remote]  # no gap, none twice
    shown = [e for e in events(second) if e["type"] in ("started", "progress")]  # the stored events, then the live ones
    assert shown == [{k: v for k, v in e.items() if k != "index"} for e in remote if e["type"] in ("started", "progress")]
    assert probe(out).width == 270 and row(db, job_id).status == "completed"


def test_the_python_api_submits_to_an_endpoint_and_waits(server, tiny, tmp_path, monkeypatch):
    from synapse_cli import api

    monkeypatch.setenv("SYNAPSE_JOBS_DB", str(tmp_path / "jobs.db"))
    out = tmp_path / "out.mp4"
    job = api.submit("export", str(tiny), output=str(out), params={"output_width": 90, "output_height": 160}, endpoint=server, api_key=API_KEY)
    assert row(tmp_path / "jobs.db", job.id).remote["endpoint"] == server
    assert job.wait()["output"] == str(out)
    assert probe(out).duration > 0 and job.status == "completed"


def test_detach_with_shards_is_split_by_the_server(server, tmp_path):
    env = client_env(tmp_path)
    src, out = make_clip(tmp_path / "in.mp4", size="320x180", seconds=4), tmp_path / "out.mp4"
    job_id = detach(src, out, server, env, *TINY_FRAME, "--shards", "2")
    waited = synapse("jobs", "wait", job_id, "--json", env=env)
    assert waited.returncode == 0, waited.stderr
    assert len(events(waited)[-1]["result"]["shards"]) == 2
    assert abs(probe(out).duration - 4.0) < 0.2  # both halves: one alone would be 2 s


def test_outputs_that_expired_on_the_server_fail_the_job_with_one_line(tiny, tmp_path):
    """`jobs wait` after the server's artifacts expired: exit 3 with one line, and the local row is `failed`
    (it stayed `processing` for ever), with nothing written where the output would go."""
    from tests.http_fixtures import serve_app

    env = client_env(tmp_path)
    out = tmp_path / "out.mp4"
    with serve_app(tmp_path / "srv", artifact_ttl_s=0) as ep:
        job_id = detach(tiny, out, ep.url, env, *TINY_FRAME)
        remote = JobStore(tmp_path / "jobs.db").get(job_id).remote["id"]
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert until(lambda: http.get(f"{ep.url}/v1/jobs/{remote}", headers=auth).json()["status"] == "completed", 60)
        time.sleep(0.05)
        detach(tiny, tmp_path / "other.mp4", ep.url, env, *TINY_FRAME, "--no-cache")  # a new job sweeps the expired folder
        assert until(lambda: not (ep.work_dir / "jobs" / remote).exists(), 10)
        waited = synapse("jobs", "wait", job_id, env=env)
    assert waited.returncode == 3, waited.stderr
    last = waited.stderr.strip().splitlines()[-1]
    assert last.startswith("BackendError: downloading ") and "no longer has it (HTTP 410)" in last  # a documented name, never a private class's
    assert JobStore(tmp_path / "jobs.db").get(job_id).status == "failed"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.mp4")]
