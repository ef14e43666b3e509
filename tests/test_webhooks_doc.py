"""docs/webhooks.md's standard-library receiver is code that works: its ``verify`` accepts a real
delivery from synapse and refuses a tampered body, a wrong secret and a stale timestamp."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest

from synapse_cli.events import Finished, Started
from synapse_cli.notify import Notifier, Target, notify_events, signed_headers, secret_key
from tests.receiver import Receiver

DOC = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"
SECRET = "whsec_" + base64.b64encode(b"d" * 32).decode()


def doc_receiver(monkeypatch) -> dict:
    block = re.search(r"<!-- receiver: .*?-->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/webhooks.md lost its receiver block"
    monkeypatch.setenv("SYNAPSE_NOTIFY_SECRET", SECRET)
    namespace: dict = {"__name__": "webhooks_doc"}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_the_documented_receiver_verifies_real_deliveries(monkeypatch):
    verify = doc_receiver(monkeypatch)["verify"]
    with Receiver() as r:
        tgt = Target(r.url, SECRET, allow_http=True, retry_for_s=2)
        list(notify_events(iter([Started(job="export"), Finished(result={"output": "o.mp4"})]), tgt, "jdoc", "export",
                           notifier=Notifier(tgt, "jdoc", "export")))
    events = [verify(SECRET, req.headers, req.body) for req in r.requests]
    assert [e["type"] for e in events] == ["started", "finished"]
    req = r.requests[-1]
    with pytest.raises(ValueError, match="bad signature"):
        verify(SECRET, req.headers, req.body.replace(b"o.mp4", b"x.mp4"))
    with pytest.raises(ValueError, match="bad signature"):
        verify("whsec_" + base64.b64encode(b"e" * 32).decode(), req.headers, req.body)
    stale = signed_headers(secret_key(SECRET), "msg_1", b"{}", now=time.time() - 600)
    with pytest.raises(ValueError, match="stale"):
        verify(SECRET, stale, b"{}")
