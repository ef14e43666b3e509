"""A small fake Modal control plane for the real `modal` client (pinned 1.6.4).

`FakeModal` runs, in a background thread with its own asyncio loop, a grpclib server
implementing the ~50 RPCs that deploy/lookup/call/Volume/Dict need, plus a loopback
aiohttp server standing in for S3 (blob upload/download, Volume block URLs).

Function bodies run in-process: the fake imports `Function.module_name` and takes the
undecorated body (`_raw_f`) of the `modal.Function` named `function_name` there, then
runs each attempt in a daemon thread. Arguments and results cross modal's own pickle.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import importlib
import inspect
import itertools
import json
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpclib.const
from aiohttp import web
from google.protobuf.empty_pb2 import Empty
from grpclib import GRPCError, Status
from grpclib.server import Server
from modal._serialization import deserialize, deserialize_data_format, serialize
from modal.exception import InputCancellation, InternalFailure
from modal_proto import api_grpc, api_pb2

BLOCK_SIZE = 8 * 1024 * 1024  # Volume read_file block size (one URL per block)
INLINE_RESULT_LIMIT = 2 * 1024 * 1024  # larger results go through the blob store
R = api_pb2.GenericResult
FAKE_ID_MARKER = "-fake"  # every id the fake issues looks like "fu-fake12"
_ids = itertools.count(1)  # global, so stale ids from an earlier FakeModal never collide


def _new_id(prefix: str) -> str:
    return f"{prefix}{FAKE_ID_MARKER}{next(_ids)}"


@dataclass
class FunctionCallRecord:
    """One attempt at running a function body (injected failures included)."""

    function_name: str
    args: tuple
    kwargs: dict
    function_call_id: str
    attempt: int
    outcome: str = "running"  # ok | error | injected | timeout | cancelled


@dataclass
class _Fn:
    function_id: str
    app_id: str
    definition: api_pb2.Function
    definition_id: str = field(default_factory=lambda: _new_id("de"))

    @property
    def name(self) -> str:
        return self.definition.function_name

    def metadata(self) -> api_pb2.FunctionHandleMetadata:
        d = self.definition
        return api_pb2.FunctionHandleMetadata(
            function_name=d.function_name,
            function_type=d.function_type,
            definition_id=self.definition_id,
            app_id=self.app_id,
            supported_input_formats=d.supported_input_formats,
            supported_output_formats=d.supported_output_formats,
        )

    def data(self) -> api_pb2.FunctionData:
        fd = api_pb2.FunctionData(
            module_name=self.definition.module_name,
            function_name=self.definition.function_name,
            function_type=self.definition.function_type,
            timeout_secs=self.definition.timeout_secs,
        )
        fd.ranked_functions.add(rank=0, function=self.definition)
        return fd


@dataclass
class _App:
    app_id: str
    name: str = ""
    state: int = api_pb2.APP_STATE_INITIALIZING
    functions: dict[str, str] = field(default_factory=dict)  # tag -> function id
    done: asyncio.Event = field(default_factory=asyncio.Event)


class _Call:
    """A function call: its input, its output slot and its generator data-out chunks."""

    def __init__(self, call_id: str, fn: _Fn, args: tuple, kwargs: dict):
        self.id, self.fn, self.args, self.kwargs = call_id, fn, args, kwargs
        self.input_id = _new_id("in")
        self.output: api_pb2.FunctionGetOutputsItem | None = None
        self.chunks: list[api_pb2.DataChunk] = []
        self.sent = 0  # highest chunk index a data-out stream has sent, and when
        self.sent_at = 0.0
        self.cancelled = False
        self.task: asyncio.Task | None = None
        self.attempt: _Attempt | None = None
        self.waiters: list[asyncio.Future] = []

    def wake(self) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_change(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, max(timeout, 0))
        except asyncio.TimeoutError:
            pass
        finally:
            self.waiters.remove(fut)


class _Attempt:
    """One run of a body in a thread; `stop()` tells the body to stop (InputCancellation)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread_id: int | None = None  # set while the thread is inside the body

    def stop(self) -> None:
        with self.lock:
            if self.stopped.is_set():  # once, as Modal cancels an input once: a cancel and the task's CancelledError both stop it,
                return  # and a second InputCancellation would land in the body's own clean-up
            self.stopped.set()
            if self.thread_id is not None:
                _raise_in_thread(self.thread_id, InputCancellation)


def _raise_in_thread(ident: int, exc: type[BaseException], wait_s: float = 1.0) -> None:
    """Raise ``exc`` in the thread ``ident`` at its next bytecode.

    Not while any thread is being started: on CPython 3.11 a new thread's state carries the ident of the
    thread that starts it until it runs, and PyThreadState_SetAsyncExc raises in the newest state with the
    ident. A body starting a thread (ffmpeg's stderr reader) then kept running, and the new thread died of
    the exception at its first line (14 % of 200 tries in a loop; none with this wait). Holding
    ``_active_limbo_lock`` keeps another thread from starting until the exception is set."""
    deadline = time.monotonic() + wait_s
    while True:
        with threading._active_limbo_lock:  # type: ignore[attr-defined]
            if not threading._limbo or time.monotonic() > deadline:  # type: ignore[attr-defined]
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))
                return
        time.sleep(0.0005)


class _EnvOverlay:
    """Process-wide env vars set while any body that needs them runs (last writer wins)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.saved: dict[str, str | None] = {}
        self.count: dict[str, int] = {}

    def push(self, env: dict[str, str]) -> None:
        with self.lock:
            for k, v in env.items():
                if not self.count.get(k):
                    self.saved[k] = os.environ.get(k)
                self.count[k] = self.count.get(k, 0) + 1
                os.environ[k] = v

    def pop(self, env: dict[str, str]) -> None:
        with self.lock:
            for k in env:
                self.count[k] -= 1
                if self.count[k] == 0:
                    old = self.saved.pop(k)
                    if old is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = old


def _result_item(call: _Call, result: api_pb2.GenericResult, data_format=api_pb2.DATA_FORMAT_PICKLE):
    return api_pb2.FunctionGetOutputsItem(
        result=result, idx=0, input_id=call.input_id, data_format=data_format, output_created_at=time.time()
    )


def _failure(exc: BaseException) -> api_pb2.GenericResult:
    if isinstance(exc, InternalFailure):  # infrastructure failure: the client raises InternalFailure(str)
        return R(status=R.GENERIC_STATUS_INTERNAL_FAILURE, exception=str(exc))
    status = R.GENERIC_STATUS_FAILURE
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = serialize(exc)
    except Exception:  # unpicklable exception: the client raises RemoteError(repr)
        data = b""
    return R(status=status, exception=repr(exc), traceback=tb, data=data)


class FakeServicer(api_grpc.ModalClientBase):
    """The fake control plane. Handlers take a request and return (or async-yield) replies."""

    def __init__(self, fake: FakeModal):
        self.fake = fake
        self.apps: dict[str, _App] = {}
        self.deployed: dict[str, str] = {}  # app name -> app id
        self.functions: dict[str, _Fn] = {}
        self.calls: dict[str, _Call] = {}
        self.images: dict[bytes, str] = {}
        self.mount_files: dict[str, bytes] = {}  # sha256 hex -> content
        self.volumes: dict[str, tuple[str, Path]] = {}  # id -> (name, dir)
        self.dicts: dict[str, tuple[str, dict[bytes, bytes]]] = {}  # id -> (name, data)
        self.secret_env: dict[str, dict[str, str]] = {}  # id -> env vars bodies see
        self.named: dict[tuple[str, str], str] = {}  # (kind, name) -> id

    # --- plumbing -------------------------------------------------------------------------

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = {}
        for path, h in super().__mapping__().items():
            name = path.rsplit("/", 1)[-1]
            impl = getattr(self, "rpc_" + name, None)
            mapping[path] = grpclib.const.Handler(
                self._wrap(name, impl, h.cardinality), h.cardinality, h.request_type, h.reply_type
            )
        return mapping

    def _wrap(self, name, impl, cardinality):
        fake = self.fake

        async def handler(stream) -> None:
            request = await stream.recv_message()
            fake.calls.append(name)
            if fake.fail_auth:
                raise GRPCError(Status.UNAUTHENTICATED, "fake modal: invalid token")
            if impl is None:
                fake.unimplemented.append(name)
                raise GRPCError(Status.UNIMPLEMENTED, f"fake modal does not implement {name}")
            if cardinality is grpclib.const.Cardinality.UNARY_STREAM:
                async for reply in impl(request):
                    await stream.send_message(reply)
            else:
                await stream.send_message(await impl(request))

        return handler

    def _get_or_create(self, kind: str, name: str, creation_type: int, make) -> str:
        """Shared named-object semantics of *GetOrCreate RPCs; `make(id)` builds a new one."""
        t = api_pb2
        if creation_type in (t.OBJECT_CREATION_TYPE_EPHEMERAL, t.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP):
            obj_id = _new_id(kind)
            make(obj_id)
            return obj_id
        key = (kind, name)
        if key in self.named:
            if creation_type == t.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS:
                raise GRPCError(Status.ALREADY_EXISTS, f"{kind} {name!r} already exists")
            return self.named[key]
        if creation_type == t.OBJECT_CREATION_TYPE_UNSPECIFIED:  # plain lookup
            raise GRPCError(Status.NOT_FOUND, f"{kind} {name!r} not found")
        obj_id = self.named[key] = _new_id(kind)
        make(obj_id)
        return obj_id

    # --- client, environment, apps --------------------------------------------------------

    async def rpc_ClientHello(self, req):
        return api_pb2.ClientHelloResponse()

    async def rpc_EnvironmentGetOrCreate(self, req):
        settings = api_pb2.EnvironmentSettings(image_builder_version="2025.06", webhook_suffix="fake.modal.run")
        return api_pb2.EnvironmentGetOrCreateResponse(
            environment_id="en-fake", metadata=api_pb2.EnvironmentMetadata(name="main", settings=settings)
        )

    async def rpc_AppCreate(self, req):
        app = _App(_new_id("ap"), state=req.app_state or api_pb2.APP_STATE_EPHEMERAL)
        self.apps[app.app_id] = app
        return api_pb2.AppCreateResponse(app_id=app.app_id, app_page_url=f"{self.fake.url}/apps/{app.app_id}")

    async def rpc_AppGetOrCreate(self, req):
        if req.app_name not in self.deployed:
            if req.object_creation_type != api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App {req.app_name!r} not found")
            app = _App(_new_id("ap"), name=req.app_name, state=api_pb2.APP_STATE_DEPLOYED)
            self.apps[app.app_id] = app
            self.deployed[req.app_name] = app.app_id
        return api_pb2.AppGetOrCreateResponse(app_id=self.deployed[req.app_name])

    async def rpc_AppGetByDeploymentName(self, req):
        return api_pb2.AppGetByDeploymentNameResponse(app_id=self.deployed.get(req.name, ""))

    async def rpc_AppGetLayout(self, req):
        app = self._app(req.app_id)
        return api_pb2.AppGetLayoutResponse(app_layout=api_pb2.AppLayout(function_ids=app.functions))

    async def rpc_AppPublish(self, req):
        app = self._app(req.app_id)
        app.functions = dict(req.function_ids)
        app.state = req.app_state
        if req.app_state == api_pb2.APP_STATE_DEPLOYED:
            app.name = req.name
            self.deployed[req.name] = app.app_id
        return api_pb2.AppPublishResponse(url=f"{self.fake.url}/apps/{app.app_id}", deployed_at=time.time())

    async def rpc_AppHeartbeat(self, req):
        return Empty()

    async def rpc_AppClientDisconnect(self, req):
        app = self._app(req.app_id)
        app.done.set()
        if app.state != api_pb2.APP_STATE_DEPLOYED:  # ephemeral apps stop their running inputs
            app.state = api_pb2.APP_STATE_STOPPED
            for call in list(self.calls.values()):
                if call.fn.app_id == app.app_id and call.output is None:
                    self._cancel(call)
        return Empty()

    async def rpc_AppGetLogs(self, req):
        # No logs: hold the stream until the app is done (bounded), then say so.
        app = self.apps.get(req.app_id)
        if app is not None:
            try:
                await asyncio.wait_for(app.done.wait(), timeout=req.timeout or 55)
            except asyncio.TimeoutError:
                return
        yield api_pb2.TaskLogsBatch(app_done=True)

    def _app(self, app_id: str) -> _App:
        if app_id not in self.apps:
            raise GRPCError(Status.NOT_FOUND, f"App {app_id} not found")
        return self.apps[app_id]

    # --- images, mounts, secrets (builds are no-ops) ---------------------------------------

    async def rpc_ImageGetOrCreate(self, req):
        key = req.image.SerializeToString()
        image_id = self.images.setdefault(key, _new_id("im"))
        return api_pb2.ImageGetOrCreateResponse(
            image_id=image_id,
            result=R(status=R.GENERIC_STATUS_SUCCESS),
            metadata=api_pb2.ImageMetadata(image_builder_version="2025.06"),
        )

    async def rpc_ImageJoinStreaming(self, req):
        yield api_pb2.ImageJoinStreamingResponse(
            result=R(status=R.GENERIC_STATUS_SUCCESS),
            metadata=api_pb2.ImageMetadata(image_builder_version="2025.06"),
        )

    async def rpc_MountGetOrCreate(self, req):
        return api_pb2.MountGetOrCreateResponse(mount_id=_new_id("mo"), handle_metadata=api_pb2.MountHandleMetadata())

    async def rpc_MountBatchedCheckExistence(self, req):
        missing = [h for h in req.sha256_hex_hashes if h not in self.mount_files]
        return api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=missing)

    async def rpc_MountPutFile(self, req):
        if req.WhichOneof("data_oneof") == "data":
            self.mount_files[req.sha256_hex] = req.data
        elif req.WhichOneof("data_oneof") == "data_blob_id":
            self.mount_files[req.sha256_hex] = self.fake.blobs[req.data_blob_id]
        return api_pb2.MountPutFileResponse(exists=req.sha256_hex in self.mount_files)

    async def rpc_SecretGetOrCreate(self, req):
        # Unknown named secrets are created empty on lookup: tests need no setup for `Secret.from_name`.
        t = api_pb2
        creation = req.object_creation_type or t.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
        if creation == t.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS:
            creation = t.OBJECT_CREATION_TYPE_CREATE_IF_MISSING
        secret_id = self._get_or_create("st", req.deployment_name, creation, lambda _id: None)
        if req.env_dict or secret_id not in self.secret_env:
            self.secret_env[secret_id] = dict(req.env_dict)
        meta = api_pb2.SecretMetadata(name=req.deployment_name, keys=list(self.secret_env[secret_id]))
        return api_pb2.SecretGetOrCreateResponse(secret_id=secret_id, metadata=meta)

    # --- functions ----------------------------------------------------------------------

    async def rpc_FunctionPrecreate(self, req):
        function_id = req.existing_function_id if req.existing_function_id in self.functions else _new_id("fu")
        meta = api_pb2.FunctionHandleMetadata(
            function_name=req.function_name,
            function_type=req.function_type,
            app_id=req.app_id,
            supported_input_formats=req.supported_input_formats,
            supported_output_formats=req.supported_output_formats,
        )
        return api_pb2.FunctionPrecreateResponse(function_id=function_id, handle_metadata=meta)

    async def rpc_FunctionCreate(self, req):
        if req.HasField("function"):
            definition = req.function
        else:  # a list of GPUs arrives as FunctionData with ranked copies
            definition = req.function_data.ranked_functions[0].function
        function_id = req.existing_function_id or _new_id("fu")
        fn = self.functions[function_id] = _Fn(function_id, req.app_id, definition)
        self._app(req.app_id).functions[fn.name] = function_id
        return api_pb2.FunctionCreateResponse(
            function_id=function_id, function=definition, handle_metadata=fn.metadata(), function_data=fn.data()
        )

    async def rpc_FunctionGet(self, req):
        app_id = self.deployed.get(req.app_name)
        if app_id is None:
            raise GRPCError(Status.NOT_FOUND, f"App {req.app_name!r} not found")
        function_id = self.apps[app_id].functions.get(req.object_tag)
        if function_id is None:
            raise GRPCError(Status.NOT_FOUND, f"Function {req.object_tag!r} not found in app {req.app_name!r}")
        fn = self.functions[function_id]
        return api_pb2.FunctionGetResponse(function_id=function_id, handle_metadata=fn.metadata(), function=fn.data())

    async def rpc_FunctionGetById(self, req):
        fn = self.functions.get(req.function_id)
        if fn is None:
            raise GRPCError(Status.NOT_FOUND, f"Function {req.function_id} not found")
        return api_pb2.FunctionGetByIdResponse(function=fn.data(), handle_metadata=fn.metadata())

    async def rpc_FunctionMap(self, req):
        fn = self.functions.get(req.function_id)
        if fn is None:
            raise GRPCError(Status.NOT_FOUND, f"Function {req.function_id} not found")
        injected = self.fake._take_injected(fn.name, grpc=True)
        if injected is not None:
            raise injected
        (item,) = req.pipelined_inputs
        inp = item.input
        raw = inp.args if inp.WhichOneof("args_oneof") == "args" else self.fake.blobs[inp.args_blob_id]
        args, kwargs = deserialize_data_format(raw, inp.data_format, None)
        call = _Call(_new_id("fc"), fn, tuple(args), dict(kwargs))
        self.calls[call.id] = call
        call.task = asyncio.get_running_loop().create_task(self.fake._run_call(call))
        return api_pb2.FunctionMapResponse(
            function_call_id=call.id,
            function_call_jwt=f"jwt-{call.id}",
            pipelined_inputs=[api_pb2.FunctionPutInputsResponseItem(idx=0, input_id=call.input_id, input_jwt="jwt")],
            sync_client_retries_enabled=False,  # retries happen here, server-side
            max_inputs_outstanding=1000,
        )

    def _call(self, call_id: str) -> _Call:
        if call_id not in self.calls:
            raise GRPCError(Status.NOT_FOUND, f"Function call {call_id} not found")
        return self.calls[call_id]

    async def rpc_FunctionGetOutputs(self, req):
        call = self._call(req.function_call_id)
        deadline = time.monotonic() + min(req.timeout, 55)
        while call.output is None and time.monotonic() < deadline:
            await call.wait_change(deadline - time.monotonic())
        if call.output is None:
            return api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=1)
        # A generator's outcome goes out only after its items have (so an error follows the items
        # it came after, as a caller would expect); bounded in case nobody reads the items.
        flush_deadline = time.monotonic() + 2
        while call.sent < len(call.chunks) and time.monotonic() < flush_deadline:
            await call.wait_change(flush_deadline - time.monotonic())
        if call.chunks:  # sent is not yet received: give the client's data-out reader a head start
            await asyncio.sleep(max(0.0, call.sent_at + 0.1 - time.monotonic()))
        return api_pb2.FunctionGetOutputsResponse(outputs=[call.output], num_unfinished_inputs=0)

    async def rpc_FunctionCallGetDataOut(self, req):
        call = self._call(req.function_call_id)
        last = req.last_index
        while True:
            while last < len(call.chunks):  # chunk n sits at position n - 1
                last += 1
                yield call.chunks[last - 1]
                call.sent, call.sent_at = max(call.sent, last), time.monotonic()
                call.wake()
            if call.output is not None and last >= len(call.chunks):
                await asyncio.sleep(1)  # all sent: end the stream after a while; the client reopens if needed
                return
            await call.wait_change(5)

    async def rpc_FunctionCallCancel(self, req):
        self._cancel(self._call(req.function_call_id))
        return Empty()

    def _cancel(self, call: _Call) -> None:
        call.cancelled = True
        if call.attempt is not None:
            call.attempt.stop()
        if call.task is not None:
            call.task.cancel()

    async def rpc_FunctionCallFromId(self, req):
        call = self._call(req.function_call_id)
        meta = api_pb2.FunctionCallHandleMetadata(app_id=call.fn.app_id, function_id=call.fn.function_id)
        return api_pb2.FunctionCallFromIdResponse(function_call_id=call.id, num_inputs=1, metadata=meta)

    # --- blobs ----------------------------------------------------------------------------

    async def rpc_BlobCreate(self, req):
        blob_id = _new_id("bl")
        url = f"{self.fake.blob_url}/blob/{blob_id}"
        return api_pb2.BlobCreateResponse(blob_ids=[blob_id], upload_urls=api_pb2.UploadUrlList(items=[url]))

    async def rpc_BlobGet(self, req):
        if req.blob_id not in self.fake.blobs:
            raise GRPCError(Status.NOT_FOUND, f"Blob {req.blob_id} not found")
        return api_pb2.BlobGetResponse(download_url=f"{self.fake.blob_url}/blob/{req.blob_id}")

    # --- volumes (v1: files live in a real directory per volume) ---------------------------

    async def rpc_VolumeGetOrCreate(self, req):
        if req.version == api_pb2.VOLUME_FS_VERSION_V2:
            raise GRPCError(Status.INVALID_ARGUMENT, "fake modal only serves v1 Volumes")

        def make(volume_id: str) -> None:
            directory = self.fake.root / "volumes" / (req.deployment_name or volume_id)
            directory.mkdir(parents=True, exist_ok=True)
            self.volumes[volume_id] = (req.deployment_name or volume_id, directory)

        volume_id = self._get_or_create("vo", req.deployment_name, req.object_creation_type, make)
        name = self.volumes[volume_id][0]
        meta = api_pb2.VolumeMetadata(name=name, version=api_pb2.VOLUME_FS_VERSION_V1)
        return api_pb2.VolumeGetOrCreateResponse(volume_id=volume_id, version=meta.version, metadata=meta)

    def _volume_dir(self, volume_id: str) -> Path:
        if volume_id not in self.volumes:
            raise GRPCError(Status.NOT_FOUND, f"Volume {volume_id} not found")
        return self.volumes[volume_id][1]

    @staticmethod
    def _inside(root: Path, path: str) -> Path:
        target = (root / path.lstrip("/")).resolve()
        if target != root.resolve() and root.resolve() not in target.parents:
            raise GRPCError(Status.INVALID_ARGUMENT, f"path {path!r} escapes the volume")
        return target

    async def rpc_VolumePutFiles(self, req):
        root = self._volume_dir(req.volume_id)
        for f in req.files:
            target = self._inside(root, f.filename)
            if req.disallow_overwrite_existing_files and target.exists():
                raise GRPCError(Status.ALREADY_EXISTS, f"{f.filename} already exists")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.mount_files[f.sha256_hex])
        return Empty()

    async def rpc_VolumeGetFile2(self, req):
        target = self._inside(self._volume_dir(req.volume_id), req.path)
        if not target.is_file():
            raise GRPCError(Status.NOT_FOUND, f"No such file: {req.path}")
        size = target.stat().st_size
        start = req.start
        end = size if not req.len else min(size, start + req.len)
        urls, pos = [], start
        while pos < end or not urls:
            block_end = min(end, (pos // BLOCK_SIZE + 1) * BLOCK_SIZE)
            urls.append(f"{self.fake.blob_url}/volume/{req.volume_id}?path={req.path}&start={pos}&end={block_end}")
            pos = block_end
        return api_pb2.VolumeGetFile2Response(get_urls=urls, size=size, start=start, len=end - start)

    async def rpc_VolumeListFiles(self, req):
        root = self._volume_dir(req.volume_id)
        base = self._inside(root, req.path or "/")
        if base.is_file():
            paths = [base]
        elif base.is_dir():
            paths = sorted(base.rglob("*") if req.recursive else base.iterdir())
        else:
            raise GRPCError(Status.NOT_FOUND, f"No such file or directory: {req.path}")
        entries = []
        for p in paths:
            st = p.stat()
            kind = api_pb2.FileEntry.DIRECTORY if p.is_dir() else api_pb2.FileEntry.FILE
            rel = p.relative_to(root.resolve()).as_posix()
            entries.append(api_pb2.FileEntry(path=rel, type=kind, mtime=int(st.st_mtime), size=st.st_size))
        yield api_pb2.VolumeListFilesResponse(entries=entries)

    async def rpc_VolumeRemoveFile(self, req):
        target = self._inside(self._volume_dir(req.volume_id), req.path)
        if not target.exists():
            raise GRPCError(Status.NOT_FOUND, f"No such file: {req.path}")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        return Empty()

    async def rpc_VolumeCommit(self, req):
        return api_pb2.VolumeCommitResponse(skip_reload=True)

    async def rpc_VolumeReload(self, req):
        return Empty()

    async def rpc_VolumeHeartbeat(self, req):
        return Empty()

    # --- dicts ------------------------------------------------------------------------------

    async def rpc_DictGetOrCreate(self, req):
        def make(dict_id: str) -> None:
            self.dicts[dict_id] = (req.deployment_name or dict_id, {})

        dict_id = self._get_or_create("di", req.deployment_name, req.object_creation_type, make)
        return api_pb2.DictGetOrCreateResponse(dict_id=dict_id, metadata=api_pb2.DictMetadata(name=self.dicts[dict_id][0]))

    def _dict(self, dict_id: str) -> dict[bytes, bytes]:
        if dict_id not in self.dicts:
            raise GRPCError(Status.NOT_FOUND, f"Dict {dict_id} not found")
        return self.dicts[dict_id][1]

    async def rpc_DictUpdate(self, req):
        data = self._dict(req.dict_id)
        if req.if_not_exists and any(e.key in data for e in req.updates):
            return api_pb2.DictUpdateResponse(created=False)
        data.update((e.key, e.value) for e in req.updates)
        return api_pb2.DictUpdateResponse(created=True)

    async def rpc_DictGet(self, req):
        data = self._dict(req.dict_id)
        return api_pb2.DictGetResponse(found=req.key in data, value=data.get(req.key, b""))

    async def rpc_DictContains(self, req):
        return api_pb2.DictContainsResponse(found=req.key in self._dict(req.dict_id))

    async def rpc_DictLen(self, req):
        return api_pb2.DictLenResponse(len=len(self._dict(req.dict_id)))

    async def rpc_DictPop(self, req):
        data = self._dict(req.dict_id)
        found = req.key in data
        return api_pb2.DictPopResponse(found=found, value=data.pop(req.key, b""))

    async def rpc_DictClear(self, req):
        self._dict(req.dict_id).clear()
        return Empty()

    async def rpc_DictContents(self, req):
        for key, value in list(self._dict(req.dict_id).items()):
            yield api_pb2.DictEntry(key=key if req.keys else b"", value=value if req.values else b"")

    async def rpc_DictHeartbeat(self, req):
        return Empty()


FakeServicer.__abstractmethods__ = frozenset()  # RPCs without an rpc_ method answer UNIMPLEMENTED


class FakeModal:
    """A running fake control plane: the handle tests use (see `fixtures.modal_fake`).

    Inspect: `calls` (RPC names in arrival order), `function_calls` (`FunctionCallRecord` per
    attempt), `unimplemented` (RPCs the client asked for that the fake lacks), `volume_files`,
    `volume_dir`, `dict_contents`. Script: `fail_auth`, `fail_next_calls`, `set_secret`,
    `retry_delay_scale`. State lives in memory, Volume files under `root/volumes/<name>/`.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.calls: list[str] = []  # RPC names, in arrival order
        self.unimplemented: list[str] = []
        self.function_calls: list[FunctionCallRecord] = []
        self.fail_auth = False
        self.retry_delay_scale = 1.0  # multiply Retries delays (0 makes retry tests instant)
        self.blobs: dict[str, bytes] = {}
        self._injected: dict[str, list[BaseException]] = {}
        self._env = _EnvOverlay()
        self._loop = asyncio.new_event_loop()
        self.servicer: FakeServicer
        self._thread = threading.Thread(target=self._loop.run_forever, name="modal-fake", daemon=True)
        self.port = self.blob_port = 0

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self.blob_port}"

    def start(self) -> FakeModal:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        self.servicer = FakeServicer(self)
        self._grpc = Server([self.servicer])
        # host/port, not a pre-bound sock=: with sock= every unary call took ~44 ms here
        await self._grpc.start("127.0.0.1", 0)
        self.port = self._grpc._server.sockets[0].getsockname()[1]
        http = web.Application(client_max_size=1 << 30)
        http.router.add_put("/blob/{blob_id}", self._http_put_blob)
        http.router.add_get("/blob/{blob_id}", self._http_get_blob)
        http.router.add_get("/volume/{volume_id}", self._http_get_volume)
        self._http = web.AppRunner(http, access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, "127.0.0.1", 0)
        await site.start()
        self.blob_port = site._server.sockets[0].getsockname()[1]

    async def _cancel_running(self) -> None:
        """Cancel every call still running, and give them 2 s to end."""
        tasks = []
        for call in list(self.servicer.calls.values()):
            if call.output is None and call.task is not None:
                self.servicer._cancel(call)
                tasks.append(call.task)
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    def stop(self) -> None:
        async def _stop() -> None:
            await self._cancel_running()
            self._grpc.close()
            await self._http.cleanup()
            try:
                await asyncio.wait_for(self._grpc.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    # --- one fake for many tests -----------------------------------------------------------

    def checkpoint(self) -> None:
        """Remember the objects that exist now (a deployed app, its Volume, its Secrets): what
        `reset` returns to. Taken once an app is deployed, so tests can share the deployment."""

        def run() -> None:
            s = self.servicer
            self._checkpoint = (dict(s.named), {k: dict(v) for k, v in s.secret_env.items()}, set(s.volumes), set(s.dicts), set(self.blobs))

        self._sync(run)

    def reset(self) -> None:
        """Back to the checkpoint for the next test: calls still running are cancelled (as `stop`
        does), the records, injected failures and knobs are cleared, the checkpoint's Volumes are
        emptied and its Dicts cleared, and objects made since (Volumes, Dicts, Secrets, blobs) are gone.
        The deployed apps, their functions, images and mounts stay, with their ids."""
        named, secrets, volumes, dicts, blobs = self._checkpoint

        asyncio.run_coroutine_threadsafe(self._cancel_running(), self._loop).result(timeout=10)

        def run() -> None:
            s = self.servicer
            s.calls.clear()
            s.named.clear()
            s.named.update(named)
            s.secret_env.clear()
            s.secret_env.update({k: dict(v) for k, v in secrets.items()})
            for volume_id in list(s.volumes):
                directory = s.volumes[volume_id][1]
                if volume_id in volumes:
                    for child in list(directory.iterdir()):
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                else:
                    del s.volumes[volume_id]
                    shutil.rmtree(directory, ignore_errors=True)
            for dict_id in list(s.dicts):
                if dict_id in dicts:
                    s.dicts[dict_id][1].clear()
                else:
                    del s.dicts[dict_id]
            for blob_id in set(self.blobs) - blobs:
                del self.blobs[blob_id]
            self.calls.clear()
            self.unimplemented.clear()
            self.function_calls.clear()
            self._injected.clear()
            self.fail_auth = False
            self.retry_delay_scale = 1.0

        self._sync(run)

    # --- knobs and inspection ---------------------------------------------------------------

    def fail_next_calls(self, function_name: str, n: int = 1, exc: BaseException | None = None) -> None:
        """The next `n` invocations of `function_name` fail before running the body.

        `exc` is an exception instance: it becomes the attempt's failure (pickled back to the
        caller unless the function's `retries` re-run it). A `grpclib.GRPCError` instead fails
        the `FunctionMap` RPC itself (e.g. `Status.UNAVAILABLE`, which the client retries).
        Default: `ConnectionError("fake modal: injected transient failure")`.
        """
        exc = exc if exc is not None else ConnectionError("fake modal: injected transient failure")
        self._injected.setdefault(function_name, []).extend([exc] * n)

    def set_secret(self, name: str, env: dict[str, str]) -> None:
        """Create or replace the named Secret; bodies of functions using it see `env`."""
        servicer = self.servicer

        def run() -> None:
            key = ("st", name)
            secret_id = servicer.named.setdefault(key, _new_id("st"))
            servicer.secret_env[secret_id] = dict(env)

        self._sync(run)

    def _take_injected(self, function_name: str, grpc: bool) -> BaseException | None:
        queue = self._injected.get(function_name)
        if queue and isinstance(queue[0], GRPCError) == grpc:
            return queue.pop(0)
        return None

    def _sync(self, fn):
        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def volume_dir(self, name: str) -> Path:
        """The real directory holding the files of the named Volume (what bodies see)."""
        key = ("vo", name)
        if key not in self.servicer.named:
            raise KeyError(f"no Volume named {name!r}")
        return self.servicer.volumes[self.servicer.named[key]][1]

    def volume_files(self, name: str) -> dict[str, bytes]:
        """`{relative posix path: content}` for every file in the named Volume."""
        root = self.volume_dir(name)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def dict_contents(self, name: str) -> dict[Any, Any]:
        """Deserialized contents of the named Dict."""
        key = ("di", name)
        if key not in self.servicer.named:
            raise KeyError(f"no Dict named {name!r}")
        data = self._sync(lambda: dict(self.servicer.dicts[self.servicer.named[key]][1]))
        return {deserialize(k, None): deserialize(v, None) for k, v in data.items()}

    # --- running calls ------------------------------------------------------------------------

    async def _run_call(self, call: _Call) -> None:
        try:
            result, data_format = await self._execute(call)
        except asyncio.CancelledError:
            for rec in self.function_calls:
                if rec.function_call_id == call.id and rec.outcome == "running":
                    rec.outcome = "cancelled"
            result = R(status=R.GENERIC_STATUS_TERMINATED, exception="Function call was cancelled")
            data_format = api_pb2.DATA_FORMAT_PICKLE
        call.output = _result_item(call, result, data_format)
        call.wake()

    async def _execute(self, call: _Call):
        d = call.fn.definition
        policy = d.retry_policy if d.HasField("retry_policy") else None
        retries = policy.retries if policy else 0
        delay = policy.initial_delay_ms / 1000 if policy else 0.0
        attempt = 0
        while True:
            attempt += 1
            result, data_format = await self._attempt(call, attempt)
            if result.status == R.GENERIC_STATUS_SUCCESS or attempt > retries:
                return result, data_format
            await asyncio.sleep(delay * self.retry_delay_scale)
            delay = min(delay * (policy.backoff_coefficient or 1.0), policy.max_delay_ms / 1000 or 60)

    async def _attempt(self, call: _Call, n: int):
        record = FunctionCallRecord(call.fn.name, call.args, call.kwargs, call.id, n)
        self.function_calls.append(record)
        injected = self._take_injected(call.fn.name, grpc=False)
        if injected is not None:
            record.outcome = "injected"
            return _failure(injected), api_pb2.DATA_FORMAT_PICKLE
        attempt = call.attempt = _Attempt()
        done = self._loop.create_future()
        threading.Thread(target=self._body_thread, args=(call, attempt, done), daemon=True).start()
        timeout = call.fn.definition.timeout_secs or None
        try:
            kind, value = await asyncio.wait_for(asyncio.shield(done), timeout)
        except asyncio.TimeoutError:
            attempt.stop()
            record.outcome = "timeout"
            msg = f"Function {call.fn.name} timed out after {timeout} s"
            return R(status=R.GENERIC_STATUS_TIMEOUT, exception=msg), api_pb2.DATA_FORMAT_PICKLE
        except asyncio.CancelledError:
            attempt.stop()
            raise
        if kind == "error":
            record.outcome = "error"
            return _failure(value), api_pb2.DATA_FORMAT_PICKLE
        record.outcome = "ok"
        if kind == "generator":
            data = api_pb2.GeneratorDone(items_total=value).SerializeToString()
            data_format = api_pb2.DATA_FORMAT_GENERATOR_DONE
        else:
            data, data_format = serialize(value), api_pb2.DATA_FORMAT_PICKLE
        if len(data) > INLINE_RESULT_LIMIT:
            blob_id = _new_id("bl")
            self.blobs[blob_id] = data
            return R(status=R.GENERIC_STATUS_SUCCESS, data_blob_id=blob_id), data_format
        return R(status=R.GENERIC_STATUS_SUCCESS, data=data), data_format

    def _body_env(self, fn: _Fn) -> dict[str, str]:
        """Env vars a body sees: its secrets' values, and where its Volume mounts really are."""
        env: dict[str, str] = {}
        for secret_id in fn.definition.secret_ids:
            env.update(self.servicer.secret_env.get(secret_id, {}))
        mounts = {
            m.mount_path: str(self.servicer.volumes[m.volume_id][1])
            for m in fn.definition.volume_mounts
            if m.volume_id in self.servicer.volumes
        }
        if mounts:
            env["SYNAPSE_VOLUME_ROOT"] = next(iter(mounts.values()))
            env["MODAL_FAKE_MOUNTS"] = json.dumps(mounts)
        return env

    def _body_thread(self, call: _Call, attempt: _Attempt, done: asyncio.Future) -> None:
        outcome: tuple[str, Any]
        env = self._body_env(call.fn)
        self._env.push(env)
        try:
            raw = _raw_body(call.fn.definition)
            with attempt.lock:
                if attempt.stopped.is_set():
                    return
                attempt.thread_id = threading.get_ident()
            # as in a container: modal.current_function_call_id() names this call inside the body
            from modal._runtime.execution_context import _set_current_context_ids

            _set_current_context_ids([f"in-{call.id}"], [call.id], ["at-fake"])
            try:
                value = raw(*call.args, **call.kwargs)
                if inspect.isgenerator(value):
                    outcome = ("generator", self._drain(call, attempt, value))
                else:
                    outcome = ("value", value)
            finally:
                with attempt.lock:
                    attempt.thread_id = None
        except BaseException as exc:  # noqa: BLE001 - the body's exception is the result
            outcome = ("error", exc)
        finally:
            self._env.pop(env)
        if not attempt.stopped.is_set():
            self._loop.call_soon_threadsafe(lambda: done.done() or done.set_result(outcome))

    def _drain(self, call: _Call, attempt: _Attempt, gen) -> int:
        """Stream each yielded item to data-out as soon as it is produced."""
        count = 0
        try:
            for item in gen:
                count += 1
                chunk = api_pb2.DataChunk(data_format=api_pb2.DATA_FORMAT_PICKLE, data=serialize(item), index=count)
                self._loop.call_soon_threadsafe(self._push_chunk, call, chunk)
                if attempt.stopped.is_set():
                    break
        finally:
            gen.close()
        return count

    @staticmethod
    def _push_chunk(call: _Call, chunk: api_pb2.DataChunk) -> None:
        call.chunks.append(chunk)
        call.wake()

    # --- HTTP blob store -------------------------------------------------------------------

    async def _http_put_blob(self, request: web.Request) -> web.Response:
        data = await request.read()
        self.blobs[request.match_info["blob_id"]] = data
        return web.Response(headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    async def _http_get_blob(self, request: web.Request) -> web.Response:
        data = self.blobs.get(request.match_info["blob_id"])
        if data is None:
            return web.Response(status=404, text="no such blob")
        return web.Response(body=data)

    async def _http_get_volume(self, request: web.Request) -> web.Response:
        q = request.query
        root = self.servicer.volumes[request.match_info["volume_id"]][1]
        start, end = int(q["start"]), int(q["end"])
        with open(FakeServicer._inside(root, q["path"]), "rb") as f:
            f.seek(start)
            return web.Response(body=f.read(end - start))


def _raw_body(definition: api_pb2.Function):
    """The undecorated body of the `modal.Function` the client deployed."""
    module = importlib.import_module(definition.module_name)
    # a function deployed under another name (@app.function(name=...)) keeps its Python name here
    obj = getattr(module, definition.implementation_name or definition.function_name)
    raw = getattr(obj, "_raw_f_", None)  # modal 1.6.4 exposes the wrapped body under this name
    return raw if callable(raw) else obj
