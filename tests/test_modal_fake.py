"""End-to-end tests of the fake Modal control plane with the real modal client (1.6.4).

Every test talks gRPC to `tests.modal_fake` on loopback; nothing here mocks modal.
"""

from __future__ import annotations

import io
import os
import time

import pytest

pytest.importorskip("modal", reason="modal is not installed (pip install synapse-cli[modal])")

from tests.modal_fake import toy_app  # noqa: E402 - imports modal


@pytest.fixture
def deployed(modal_fake):
    toy_app.app.deploy()
    return modal_fake


def lookup(name: str):
    import modal

    return modal.Function.from_name(toy_app.APP_NAME, name)


def wait_until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_deploy_then_from_name_remote(deployed):
    assert lookup("add").remote(2, b=3) == 5

    for rpc in ("AppCreate", "MountPutFile", "FunctionCreate", "AppPublish", "FunctionGet", "FunctionMap"):
        assert rpc in deployed.calls
    record = deployed.function_calls[-1]
    assert (record.function_name, record.args, record.kwargs, record.outcome) == ("add", (2,), {"b": 3}, "ok")
    assert deployed.unimplemented == []


def test_redeploy_keeps_function_ids(deployed):
    first = lookup("add").hydrate().object_id
    toy_app.app.deploy()
    second = lookup("add").hydrate()
    assert second.object_id == first
    assert second.remote(1) == 1
    assert "AppGetLayout" in deployed.calls


def test_ephemeral_app_run(modal_fake):
    with toy_app.app.run():
        assert toy_app.add.remote(1, 2) == 3
    assert "AppClientDisconnect" in modal_fake.calls


@pytest.mark.parametrize(("app_name", "fn_name"), [("no-such-app", "add"), (toy_app.APP_NAME, "no_such_fn")])
def test_unknown_app_or_function_is_not_found(deployed, app_name, fn_name):
    import modal
    from modal.exception import NotFoundError

    with pytest.raises(NotFoundError):
        modal.Function.from_name(app_name, fn_name).hydrate()


def test_remote_gen_streams_items_as_they_are_produced(deployed):
    arrived = []
    items = []
    for item in lookup("count").remote_gen(3, delay=0.3):
        arrived.append(time.time())
        items.append(item)

    assert [i["i"] for i in items] == [0, 1, 2]
    # the first item reached us before the body produced its last one
    assert arrived[0] < items[-1]["t"]
    assert "FunctionCallGetDataOut" in deployed.calls


def test_remote_gen_with_no_items(deployed):
    assert list(lookup("count").remote_gen(0)) == []


def test_remote_gen_error_comes_after_the_items(deployed):
    got = []
    with pytest.raises(toy_app.ToyError, match="after 3 items"):
        for item in lookup("count_then_fail").remote_gen(3):
            got.append(item)
    assert got == [0, 1, 2]


def test_remote_exception_keeps_its_class(deployed):
    with pytest.raises(toy_app.ToyError, match="boom"):
        lookup("fail").remote("boom")
    assert deployed.function_calls[-1].outcome == "error"


def test_spawn_get_and_from_id(deployed):
    import modal

    call = lookup("add").spawn(40, b=2)
    assert modal.FunctionCall.from_id(call.object_id).get(timeout=5) == 42
    assert call.get(timeout=5) == 42


def test_get_timeout_raises_builtin_timeout(deployed):
    from modal.exception import FunctionTimeoutError

    call = lookup("sleepy").spawn(0.5)
    with pytest.raises(TimeoutError) as info:
        call.get(timeout=0.05)
    assert not isinstance(info.value, FunctionTimeoutError)
    assert call.get(timeout=5) == "woke"


def test_cancel_stops_the_body_and_get_raises(deployed):
    import modal
    from modal.exception import RemoteError

    status = modal.Dict.from_name(toy_app.DICT_NAME, create_if_missing=True)
    call = lookup("wait_for_cancel").spawn("c1")
    assert wait_until(lambda: status.get("c1") == "started")
    call.cancel()
    with pytest.raises(RemoteError):
        call.get(timeout=5)
    assert wait_until(lambda: status.get("c1") == "stopped: InputCancellation")
    assert deployed.function_calls[-1].outcome == "cancelled"


def test_server_side_retries_follow_the_retry_policy(deployed):
    assert lookup("flaky").remote("k1") == "ok after 2 runs"
    outcomes = [r.outcome for r in deployed.function_calls if r.function_name == "flaky"]
    assert outcomes == ["error", "ok"]


def test_fail_next_calls_injects_transient_failures(deployed):
    deployed.fail_next_calls("flaky", 1)
    assert lookup("flaky").remote("k2") == "ok after 2 runs"
    assert [r.outcome for r in deployed.function_calls] == ["injected", "error", "ok"]

    deployed.fail_next_calls("add", 1)  # no retries declared: the caller sees the failure
    with pytest.raises(ConnectionError, match="injected"):
        lookup("add").remote(1)


def test_fail_next_calls_with_grpc_error_is_retried_by_the_client(deployed):
    from grpclib import GRPCError, Status

    deployed.fail_next_calls("add", 1, GRPCError(Status.UNAVAILABLE, "try again"))
    assert lookup("add").remote(3) == 3
    assert deployed.calls.count("FunctionMap") == 2


def test_function_timeout(deployed):
    from modal.exception import FunctionTimeoutError

    t0 = time.monotonic()
    with pytest.raises(FunctionTimeoutError):
        lookup("sleepy").remote(10)
    assert time.monotonic() - t0 < 5
    assert deployed.function_calls[-1].outcome == "timeout"


def test_volume_upload_read_list_and_body_writes(deployed):
    import modal

    vol = modal.Volume.from_name(toy_app.VOLUME_NAME, create_if_missing=True)
    big = bytes(range(256)) * (9 * 4096 + 7)  # > 8 MiB: two download blocks, blob upload
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"hello"), "/inputs/a.txt")
        batch.put_file(io.BytesIO(big), "/inputs/big.bin")

    assert b"".join(vol.read_file("inputs/a.txt")) == b"hello"
    assert b"".join(vol.read_file("inputs/big.bin")) == big
    assert sorted(e.path for e in vol.listdir("/inputs")) == ["inputs/a.txt", "inputs/big.bin"]

    assert lookup("write_report").remote("r1.txt", "report one") == ["r1.txt"]
    assert b"".join(vol.read_file("reports/r1.txt")) == b"report one"
    files = deployed.volume_files(toy_app.VOLUME_NAME)
    assert files["reports/r1.txt"] == b"report one"
    assert files["inputs/a.txt"] == b"hello"
    assert deployed.volume_dir(toy_app.VOLUME_NAME).is_dir()
    assert "SYNAPSE_VOLUME_ROOT" not in os.environ  # set only while the body ran

    with pytest.raises(FileNotFoundError):
        b"".join(vol.read_file("nope.txt"))


def test_dict_from_client_and_body(deployed):
    import modal

    d = modal.Dict.from_name(toy_app.DICT_NAME, create_if_missing=True)
    d.put("a", 1)
    d["b"] = {"x": [1, 2]}
    d.update(c=3)
    assert d.get("a") == 1 and d["b"] == {"x": [1, 2]} and "c" in d and "zz" not in d
    assert d.get("zz", "default") == "default"
    with pytest.raises(KeyError):
        d["zz"]

    lookup("write_report").remote("r2.txt", "12345")
    assert d["r2.txt"] == 5
    assert deployed.dict_contents(toy_app.DICT_NAME) == {"a": 1, "b": {"x": [1, 2]}, "c": 3, "r2.txt": 5}


def test_large_arguments_go_through_blob_upload(deployed):
    payload = b"\x01" * (3 * 1024 * 1024)
    assert lookup("size_of").remote(payload) == len(payload)
    assert deployed.calls.count("BlobCreate") == 1

    call = lookup("size_of").spawn(b"\x02" * 20_000)  # spawn inlines only up to 8 KiB
    assert call.get(timeout=5) == 20_000
    assert deployed.calls.count("BlobCreate") == 2


def test_large_results_come_back_through_blob_download(deployed):
    assert lookup("make_bytes").remote(3 * 1024 * 1024) == b"\x07" * (3 * 1024 * 1024)
    assert "BlobGet" in deployed.calls


def test_spawned_calls_run_concurrently(deployed):
    """Three spawned bodies meet at a rendezvous: each returns only once all three are running at once,
    however loaded the machine. Run one at a time, the first would wait out its patience alone."""
    import modal

    calls = [lookup("meet").spawn("spawned", str(i), 3) for i in range(3)]
    assert modal.FunctionCall.gather(*calls) == [["0", "1", "2"]] * 3
    assert [r.outcome for r in deployed.function_calls if r.function_name == "meet"] == ["ok"] * 3


def test_fail_auth_raises_auth_error(modal_fake):
    from modal.exception import AuthError

    modal_fake.fail_auth = True
    with pytest.raises(AuthError):
        toy_app.app.deploy()
    modal_fake.fail_auth = False
    toy_app.app.deploy()
    modal_fake.fail_auth = True
    with pytest.raises(AuthError):
        lookup("add").remote(1)


def test_secret_from_name_and_its_env_in_bodies(modal_fake):
    import modal

    modal_fake.set_secret("toy-secret", {"TOY_TOKEN": "t0ken"})
    toy_app.app.deploy()
    assert lookup("read_env").remote("TOY_TOKEN") == "t0ken"
    assert modal.Secret.from_name("toy-secret").hydrate().object_id.startswith("st-")
    assert "SecretGetOrCreate" in modal_fake.calls
    assert "TOY_TOKEN" not in os.environ  # set only while the body ran


def test_a_cancel_reaches_a_body_that_is_starting_threads():
    """The fake stops a body by raising InputCancellation in its thread. A body that starts a thread (as
    an export's ffmpeg stderr reader) must still be the thread that gets it, never the new one (which
    died of it at its first line, while the body ran on: 14 % of tries without the fake's wait)."""
    import threading

    from tests.modal_fake.server import _raise_in_thread

    class Stop(Exception):
        pass

    for attempt in range(100):
        got: list[bool] = []
        running = threading.Event()

        def body() -> None:
            try:
                while True:
                    t = threading.Thread(target=running.set)
                    t.start()
                    t.join()
            except Stop:
                got.append(True)

        b = threading.Thread(target=body, daemon=True)
        b.start()
        assert running.wait(10)
        time.sleep(0.001 * (attempt % 5))  # at some point of its loop
        _raise_in_thread(b.ident, Stop)
        b.join(10)
        assert got and not b.is_alive(), f"try {attempt}: the body was not stopped"
