"""Signed webhooks (synapse_cli.notify): a real receiver on loopback, every delivery verified with the
reference Standard Webhooks package; retries, Retry-After, 410, redirects, a dead receiver, the store."""

from __future__ import annotations

import base64
import json
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
from standardwebhooks import Webhook

from synapse_cli.config import resolve
from synapse_cli.errors import JobError, UsageError
from synapse_cli.events import Artifact, Finished, Log, Progress, Started
from synapse_cli.notify import Notifier, Target, notify_events, secret_key, sign
from synapse_cli.store.recording import DeliveryLog, record
from synapse_cli.store import JobStore
from tests.receiver import Receiver, Reply

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def target(url: str, **kwargs) -> Target:
    return Target(url, SECRET, **{"progress_interval_s": 5.0, "retry_for_s": 5.0, "allow_http": True, **kwargs})


def run(events, tgt: Target, job_id: str = "jtest", first_backoff_s: float = 0.05, **kwargs) -> list:
    notifier = Notifier(tgt, job_id, "export", first_backoff_s=first_backoff_s, **kwargs)
    return list(notify_events(iter(events), tgt, job_id, "export", notifier=notifier)), notifier


def verified(receiver: Receiver) -> list[dict]:
    """Every request the receiver got, checked by the reference verifier (it raises on a bad one)."""
    hook = Webhook(SECRET)
    return [hook.verify(r.body, r.headers) for r in receiver.requests]


def job(*extra) -> list:
    return [Started(job="export", total=10), Progress(1, 10), Progress(2, 10), Artifact("/out/reel.mp4", 1234), *extra,
            Finished(result={"output": "/out/reel.mp4"}, elapsed_s=1.5)]


def paced(events: list, gap_s: float = 0.3) -> Iterator:
    """``events`` as a job yields them: a little apart (the sender gets to each before the next)."""
    for event in events:
        yield event
        time.sleep(gap_s)


def test_every_delivery_is_signed_and_carries_the_jobs_events():
    with Receiver() as r:
        passed, notifier = run(paced(job(Log("hello"))), target(r.url + "/hook"))
        assert [type(e).__name__ for e in passed] == ["Started", "Progress", "Progress", "Artifact", "Log", "Finished"]  # unchanged
        bodies = verified(r)
    assert [b["type"] for b in bodies] == ["started", "progress", "finished"]  # the second progress was due 5 s after the first: finished came first
    assert {b["job_id"] for b in bodies} == {"jtest"} and {b["kind"] for b in bodies} == {"export"}
    assert bodies[0]["data"] == {"job": "export", "total": 10}
    assert bodies[1]["data"]["done"] == 1
    assert bodies[2]["data"]["result"] == {"output": "/out/reel.mp4"}
    assert bodies[2]["data"]["artifacts"] == [{"path": "/out/reel.mp4", "bytes": 1234}]
    ids = [req.headers["webhook-id"] for req in r.requests]
    assert len(set(ids)) == 3 and all(req.path == "/hook" for req in r.requests)
    assert [d.outcome for d in notifier.deliveries] == ["delivered"] * 3
    # a signature made with another secret is refused by the reference verifier
    other = Webhook("whsec_" + base64.b64encode(b"x" * 32).decode())
    with pytest.raises(Exception, match="signature"):
        other.verify(r.requests[0].body, r.requests[0].headers)


def test_our_signature_is_the_reference_signature():
    from datetime import datetime, timezone

    body = b'{"type":"started"}'
    ours = sign(secret_key(SECRET), "msg_1", 1700000000, body)
    assert ours == Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(1700000000, timezone.utc), body)


def test_progress_is_coalesced_to_one_per_interval():
    def slow() -> Iterator:
        yield Started(job="export", total=100)
        for i in range(40):
            yield Progress(i + 1, 100)
            time.sleep(0.025)
        yield Finished(result={})

    with Receiver() as r:
        t0 = time.monotonic()
        run(slow(), target(r.url, progress_interval_s=0.3))
        elapsed = time.monotonic() - t0
        bodies = verified(r)
    progress = [b for b in bodies if b["type"] == "progress"]
    assert 2 <= len(progress) <= int(elapsed / 0.3) + 1
    # when each was sent (its timestamp, to the millisecond), not when it arrived: a loaded machine can hold
    # one delivery long enough that the next arrives close behind it
    times = [datetime.fromisoformat(b["timestamp"].replace("Z", "+00:00")).timestamp() for b in progress]
    assert all(later - earlier >= 0.29 for earlier, later in zip(times, times[1:]))  # one per interval (0.3 s), at most
    done = [p["data"]["done"] for p in progress]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert bodies[-1]["type"] == "finished"


def test_the_newest_progress_goes_out_when_its_interval_is_up():
    """Coalescing keeps the newest progress and sends it once the interval has passed: the numbers
    before a quiet spell arrive, and no more often than the interval."""
    def quiet() -> Iterator:
        yield Started(job="export", total=3)
        yield Progress(1, 3)
        yield Progress(2, 3)
        yield Progress(3, 3)  # all at once: 1 goes out now, 3 (the newest) when the interval is up
        time.sleep(1.0)  # a quiet spell (an encode's last phase)
        yield Finished(result={})

    with Receiver() as r:
        run(quiet(), target(r.url, progress_interval_s=0.4))
        bodies = verified(r)
        progress = [req for req, b in zip(r.requests, bodies) if b["type"] == "progress"]
    assert [b["data"]["done"] for b in bodies if b["type"] == "progress"][-1] == 3
    assert len(progress) <= 2 and (len(progress) < 2 or progress[1].at - progress[0].at >= 0.35)
    assert bodies[-1]["type"] == "finished"


def test_a_500_once_still_gets_finished_with_the_same_id():
    with Receiver() as r:
        r.script.extend([Reply(200), Reply(500)])  # started ok, the first finished fails
        _, notifier = run([Started(job="export"), Finished(result={"n": 1})], target(r.url))
        bodies = verified(r)
    assert [b["type"] for b in bodies] == ["started", "finished", "finished"]
    assert r.requests[1].headers["webhook-id"] == r.requests[2].headers["webhook-id"]
    final = notifier.deliveries[-1]
    assert (final.event, final.outcome, final.attempts, final.http_status) == ("finished", "delivered", 2, 200)


def test_retry_after_is_honoured():
    with Receiver() as r:
        r.script.append(Reply(503, {"retry-after": "1"}))
        run([Finished(result={})], target(r.url))
        assert len(r.requests) == 2
        gap = r.requests[1].at - r.requests[0].at
    assert gap >= 0.95  # the backoff alone would have been ~0.05 s


def test_a_410_stops_delivery():
    with Receiver(Reply(410)) as r:
        _, notifier = run(job(), target(r.url))
        assert len(r.requests) == 1  # started got 410: nothing more is sent for this job
    assert [(d.event, d.outcome) for d in notifier.deliveries] == [("started", "gone")]


def test_a_redirect_is_a_failure_and_is_not_followed():
    with Receiver() as r:
        r.default = Reply(307, {"location": f"{r.url}/elsewhere"}, b"")
        _, notifier = run([Finished(result={})], target(r.url + "/hook", retry_for_s=0.5))
        assert {req.path for req in r.requests} == {"/hook"} and len(r.requests) >= 2
    final = notifier.deliveries[-1]
    assert final.outcome == "failed" and final.http_status == 307 and "redirect" in final.detail


def test_errors_and_cancels_are_delivered_and_the_job_error_is_unchanged():
    def failing() -> Iterator:
        yield Started(job="export")
        raise JobError("ffmpeg exited 1: bad input")

    with Receiver() as r:
        with pytest.raises(JobError, match="ffmpeg exited 1"):
            run(failing(), target(r.url))
        assert [b["type"] for b in verified(r)] == ["started", "error"]
        assert verified(r)[-1]["data"] == {"code": 1, "message": "ffmpeg exited 1: bad input", "error": "JobError"}

    with Receiver() as r:
        tgt = target(r.url)
        stream = notify_events(iter(job()), tgt, "jcancel", "export", notifier=Notifier(tgt, "jcancel", "export"))
        next(stream)
        stream.close()  # the reader went away before the result: Ctrl-C, a cancel
        assert [b["type"] for b in verified(r)] == ["started", "cancelled"]
        assert verified(r)[-1]["data"]["code"] == 130


def _dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/hook"


def test_a_dead_receiver_leaves_the_job_completed_and_the_outcome_recorded(tmp_path, cli, monkeypatch):
    path = tmp_path / "jobs.sqlite3"
    monkeypatch.setenv("SYNAPSE_JOBS_DB", str(path))
    store = JobStore(path)
    row = store.create("export", {"input": "in.mp4"}, "local", status="processing")
    tgt = target(_dead_url(), retry_for_s=1.0)
    deliveries = DeliveryLog(path, row.id, tgt.url)
    t0 = time.monotonic()
    notifier = Notifier(tgt, row.id, "export", on_delivery=deliveries, first_backoff_s=0.1)
    passed = list(notify_events(record(store, row, paced(job(), 0.1)), tgt, row.id, "export", notifier=notifier))
    elapsed = time.monotonic() - t0
    deliveries.close()
    assert isinstance(passed[-1], Finished)
    assert 1.0 <= elapsed < 4.0  # it waited for the terminal delivery, bounded by retry_for_s
    assert store.get(row.id).status == "completed"
    rows = store.deliveries(row.id)
    assert rows[0]["event"] == "started" and rows[-1]["event"] == "finished" and {d["outcome"] for d in rows} == {"failed"}
    assert rows[-1]["attempts"] > 2 and "ConnectError" in rows[-1]["detail"]
    shown = cli("jobs", "show", row.id)
    assert shown.exit_code == 0, shown.stderr
    assert "completed" in shown.stdout
    assert f"webhook        finished failed after {rows[-1]['attempts']} attempt(s) to {tgt.url}" in shown.stdout
    data = json.loads(cli("jobs", "show", row.id, "--json").stdout)
    assert data["webhooks"][-1]["outcome"] == "failed"
    store.close()


def test_the_secret_stays_out_of_bodies_reprs_and_the_store(tmp_path):
    with Receiver() as r:
        tgt = target(r.url)
        path = tmp_path / "jobs.sqlite3"
        store = JobStore(path)
        row = store.create("export", {"input": "in.mp4"}, "local", status="processing",
                           flags={"notify.url": r.url, "notify.secret": SECRET})
        deliveries = DeliveryLog(path, row.id, tgt.url)
        list(notify_events(record(store, row, iter(job())), tgt, row.id, "export", on_delivery=deliveries))
        deliveries.close()
        store.close()
    raw = SECRET[len("whsec_"):]
    assert raw not in repr(tgt)
    for req in r.requests:
        assert raw not in req.body.decode() and all(raw not in v for v in req.headers.values())
    for f in tmp_path.iterdir():
        assert raw.encode() not in f.read_bytes() and SECRET.encode() not in f.read_bytes(), f


def test_settings_and_refusals():
    settings = resolve(env={"SYNAPSE_NOTIFY_SECRET": SECRET, "SYNAPSE_NOTIFY_RETRY_FOR_S": "7"})
    tgt = Target.from_settings(settings, "https://app.example/hook")
    assert (tgt.retry_for_s, tgt.progress_interval_s) == (7.0, 5.0)
    assert Target.from_settings(settings) is None  # no URL: no webhooks
    assert settings.report()["settings"]["notify.secret"]["value"] == "***"
    with pytest.raises(UsageError, match="expected an https:// URL"):
        Target.from_settings(settings, "http://app.example/hook")  # plain http off the local backend
    assert Target.from_settings(settings, "http://127.0.0.1:9/hook", local=True).allow_http
    with pytest.raises(UsageError, match="SYNAPSE_NOTIFY_SECRET"):
        Target.from_settings(resolve(env={}), "https://app.example/hook")
    with pytest.raises(UsageError, match="not a webhook secret"):
        Target("https://app.example/hook", "whsec_short")
    with pytest.raises(UsageError, match="notify.secret is a secret"):
        resolve(file_data={"notify.secret": SECRET}, file_path=Path(".synapse.toml"))
    assert "notbase64" not in str(pytest.raises(UsageError, Target, "https://a.example/", "whsec_!!notbase64!!").value)  # never echoed


def test_a_webhook_target_refused_by_the_guard_fails_once_and_never_the_job():
    from synapse_cli.netguard import Guard

    with Receiver() as r:
        tgt = target(r.url)
        client = Guard(allow_http=True).client()
        passed, notifier = run(job(), tgt, client=client)
        client.close()
        assert r.requests == []  # loopback: refused before any connection
    assert isinstance(passed[-1], Finished)
    final = notifier.deliveries[-1]
    assert final.outcome == "failed" and final.attempts == 1 and "loopback" in final.detail


def test_no_stray_threads():
    import threading

    before = {t.name for t in threading.enumerate()}
    with Receiver() as r:
        run(job(), target(r.url))
    assert not {t.name for t in threading.enumerate() if t.name.startswith("synapse-notify")} - before


def test_retry_after_reads_seconds_and_http_dates():
    from email.utils import formatdate

    from synapse_cli.notify import _retry_after

    assert _retry_after("3") == 3.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert 8.0 <= _retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10.0
    assert _retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0
