"""Request bodies: the spec (JSON) and the uploaded input files, streamed straight into the job's dir.

Starlette's ``request.form()`` spools large files to the system temp dir; we
parse the multipart body ourselves (python-multipart's streaming parser) so
that every byte lands under the job's own ``in/`` folder, the size limit is
enforced while the bytes arrive, and a bad filename is refused before
anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from synapse_cli.errors import one_line
from synapse_cli.protocol import DIR_TAR

MAX_SPEC_BYTES = 4 * 1024 * 1024  # the spec part (and a JSON body): specs are small, files travel as files
MAX_FILES = 256
MAX_DIR_MEMBERS = 10_000


class BadUpload(Exception):
    """A request the server refuses; ``status`` is the HTTP status (400, 408, 413, 415, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def installed_upload_refused(kind: str, names: list[str]) -> BadUpload:
    """The refusal of an upload for an ``INSTALLED`` field (a model: a file that is code)."""
    return BadUpload(
        400,
        f"{kind} {', '.join(names)} cannot be uploaded: a model file is code, so the server only loads models its owner "
        "installed; send the model's name instead",
    )


def safe_filename(name: str) -> str:
    """``name`` if it is a plain file name; anything with a path component, ``..`` or control characters is refused."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise BadUpload(400, f"refused upload filename {name!r}: it must be a plain file name without path components")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise BadUpload(400, f"refused upload filename {name!r}: control characters")
    if len(name.encode("utf-8")) > 255:
        raise BadUpload(400, "refused upload filename: longer than 255 bytes")
    return name


@dataclass
class Upload:
    field: str  # the spec field the file is for (an INPUTS name)
    filename: str  # the sanitised name it was saved under
    path: Path  # the saved file, or for a directory input the folder it was unpacked into
    bytes: int = 0
    is_dir: bool = False


@dataclass
class Body:
    spec: dict[str, Any]
    files: list[Upload] = field(default_factory=list)


def _spec_from_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadUpload(400, f"the spec is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 100,000 nested brackets
        raise BadUpload(400, "the spec is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadUpload(400, "the spec must be a JSON object")
    return data


async def _with_idle_timeout(stream: AsyncIterator[bytes], timeout_s: float | None) -> AsyncIterator[bytes]:
    """``stream``, but a client that sends nothing for ``timeout_s`` gets a 408 (uvicorn has no body timeout)."""
    import asyncio

    it = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), timeout_s) if timeout_s else await it.__anext__()
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise BadUpload(408, f"the client sent nothing for {timeout_s:g} s during the upload (serve.body_timeout_s)") from None
        yield chunk


async def read_body(
    content_type: str,
    stream: AsyncIterator[bytes],
    in_dir: Path,
    max_bytes: int,
    inputs: tuple[str, ...] | None = None,
    idle_timeout_s: float | None = None,
    kind: str = "this job",
    installed: tuple[str, ...] = (),
) -> Body:
    """Parse a job request: ``application/json`` (the spec alone) or ``multipart/form-data``
    (a ``spec`` field holding JSON, plus one file part per input, named after its spec field).

    Files go to ``in_dir/<n>/<filename>``. A part that is neither ``spec`` nor one of ``inputs``
    (when given) is refused as soon as its headers arrive. Raises ``BadUpload``; the caller
    removes ``in_dir``.
    """
    stream = _with_idle_timeout(stream, idle_timeout_s)
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "multipart/form-data":
        return await _read_multipart(content_type, stream, in_dir, max_bytes, inputs, kind, installed)
    if mime not in ("application/json", "application/x-www-form-urlencoded"):
        raise BadUpload(415, f"expected multipart/form-data or application/json, got {mime or 'no content type'!r}")
    raw = bytearray()
    async for chunk in stream:
        raw.extend(chunk)
        if len(raw) > min(MAX_SPEC_BYTES, max_bytes):
            raise BadUpload(413, f"the spec is larger than {min(MAX_SPEC_BYTES, max_bytes)} bytes")
    if mime == "application/json":
        return Body(_spec_from_json(bytes(raw)))
    # a form without files (what many clients send when there is nothing to upload)
    from urllib.parse import parse_qs

    form = parse_qs(raw.decode("latin-1"), keep_blank_values=True)
    unknown = sorted(set(form) - {"spec"})
    if unknown or len(form.get("spec", [])) != 1:
        raise BadUpload(400, "expected one 'spec' form field" + (f" (unexpected: {', '.join(unknown)})" if unknown else ""))
    return Body(_spec_from_json(form["spec"][0].encode("latin-1")))


async def _read_multipart(content_type: str, stream: AsyncIterator[bytes], in_dir: Path, max_bytes: int, inputs: tuple[str, ...] | None, kind: str, installed: tuple[str, ...] = ()) -> Body:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadUpload(400, "multipart body without a boundary")

    fields: dict[str, bytearray] = {}
    uploads: list[Upload] = []
    state: dict[str, Any] = {"headers": [], "hname": b"", "hvalue": b"", "name": None, "file": None, "upload": None}

    def on_part_begin() -> None:
        state.update(headers=[], name=None, file=None, upload=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hvalue"] += data[start:end]

    def on_header_end() -> None:
        state["headers"].append((state["hname"].lower(), state["hvalue"]))
        state["hname"], state["hvalue"] = b"", b""

    def on_headers_finished() -> None:
        disposition = next((v for k, v in state["headers"] if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise BadUpload(400, "a multipart part has no name")
        name = options[b"name"].decode("utf-8", "replace")
        state["name"] = name
        if b"filename" in options:
            if name in installed:
                raise installed_upload_refused(kind, [name])
            if inputs is not None and name not in inputs:  # refused now, not after buffering the whole body
                raise BadUpload(400, f"file part(s) {name!r} are not inputs of {kind} (inputs: {', '.join(inputs) or 'none'})")
            filename = safe_filename(options[b"filename"].decode("utf-8", "replace"))
            if len(uploads) >= MAX_FILES:
                raise BadUpload(400, f"more than {MAX_FILES} files")
            folder = in_dir / str(len(uploads))
            folder.mkdir(parents=True)
            ctype = next((v for k, v in state["headers"] if k == b"content-type"), b"").decode("latin-1").strip().lower()
            upload = Upload(field=name, filename=filename, path=folder / filename, is_dir=ctype == DIR_TAR)
            target = folder / f".{filename}.tar" if upload.is_dir else upload.path
            state["file"] = open(target, "xb")  # noqa: SIM115 - closed in on_part_end or on error
            state["upload"] = upload
            uploads.append(upload)
        else:
            if name != "spec":
                raise BadUpload(400, f"unexpected form field {name!r} (expected 'spec' and file parts)")
            if name in fields:
                raise BadUpload(400, f"form field {name!r} given twice")
            fields[name] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["file"] is not None:
            state["file"].write(chunk)
            state["upload"].bytes += len(chunk)
        else:
            buf = fields[state["name"]]
            if len(buf) + len(chunk) > MAX_SPEC_BYTES:
                raise BadUpload(413, f"form field {state['name']!r} is larger than {MAX_SPEC_BYTES} bytes")
            buf.extend(chunk)

    def on_part_end() -> None:
        if state["file"] is not None:
            state["file"].close()
            state["file"] = None

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise BadUpload(413, f"the upload is larger than the server's limit of {max_bytes // (1024 * 1024)} MB")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadUpload(400, f"malformed multipart body: {exc}") from None
    finally:
        if state["file"] is not None:
            state["file"].close()
    if "spec" not in fields:
        raise BadUpload(400, "the multipart body has no 'spec' field")
    spec = _spec_from_json(bytes(fields["spec"]))
    for upload in uploads:
        if upload.is_dir:
            import anyio

            await anyio.to_thread.run_sync(_unpack_dir, upload, max_bytes)
    return Body(spec, uploads)


MAX_TAR_META_BYTES = 1024 * 1024  # a PAX or GNU long-name header's data, which tarfile reads whole into memory
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _tarinfo_class() -> type:
    """A ``TarInfo`` that refuses a PAX or GNU long-name header larger than ``MAX_TAR_META_BYTES``
    before tarfile reads its data into memory (a 2 GB upload could otherwise be one 2 GB header).

    This overrides tarfile's private ``_proc_pax``/``_proc_gnulong`` hooks (CPython 3.8-3.13); if they
    are renamed the caps silently stop applying, which ``test_a_huge_pax_header_is_refused_unread``
    catches.
    """
    import tarfile

    class _CappedTarInfo(tarfile.TarInfo):
        def _capped(self) -> None:
            if self.size > MAX_TAR_META_BYTES:
                raise BadUpload(400, f"a tar extended header of {self.size} bytes (more than {MAX_TAR_META_BYTES} allowed)")

        def _proc_pax(self, tarfile):  # type: ignore[no-untyped-def]
            self._capped()
            return super()._proc_pax(tarfile)  # type: ignore[misc]

        def _proc_gnulong(self, tarfile):  # type: ignore[no-untyped-def]
            self._capped()
            return super()._proc_gnulong(tarfile)  # type: ignore[misc]

    return _CappedTarInfo


def _one_line(exc: BaseException) -> str:
    """The exception's type and message, on one line."""
    text = one_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _unpack_dir(upload: Upload, max_bytes: int) -> None:
    """Unpack a directory input's tar into ``upload.path``: plain files and folders only, every name checked.

    Members are counted as they are read (``getmembers()`` would first hold every header in
    memory), sparse members are refused (a few KB of PAX ``GNU.sparse.*`` headers can declare a
    terabyte of zeros), and the bytes written are capped at ``max_bytes`` in all. Whatever is wrong
    with the archive (a garbled header or sparse map, a negative or huge size, a bad checksum, a
    truncation, a link or device, a compressed body) is a ``BadUpload`` (4xx), never another exception:
    tarfile raises ``ValueError`` and friends for some malformed headers, and ends the archive silently
    at a later header with a bad checksum, so whatever follows the last member must be zeros.
    """
    import tarfile

    archive = upload.path.with_name(f".{upload.filename}.tar")
    dest = upload.path
    written = 0
    name = upload.filename
    try:
        with open(archive, "rb") as f:
            magic = f.read(6)
        for prefix, method in _COMPRESSED.items():
            if magic.startswith(prefix):
                raise BadUpload(400, f"directory upload {name!r} is {method}-compressed: send an uncompressed tar ({DIR_TAR})")
        with tarfile.open(archive, mode="r:", tarinfo=_tarinfo_class()) as tar:
            dest.mkdir()
            for count, member in enumerate(tar, 1):
                if count > MAX_DIR_MEMBERS:
                    raise BadUpload(400, f"directory upload {name!r} has more than {MAX_DIR_MEMBERS} entries")
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                for part in parts:
                    safe_filename(part)
                if member.issparse():
                    raise BadUpload(400, f"directory upload {name!r}: {member.name!r} is a sparse file (refused)")
                if not (member.isfile() or member.isdir()):
                    raise BadUpload(400, f"directory upload {name!r}: {member.name!r} is not a plain file or folder")
                if member.size < 0:
                    raise BadUpload(400, f"directory upload {name!r}: {member.name!r} has a negative size ({member.size})")
                target = dest.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if written + member.size > max_bytes:
                    raise BadUpload(413, f"directory upload {name!r} unpacks to more than the server's limit of {max_bytes // (1024 * 1024)} MB")
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                with source, open(target, "xb") as out:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:  # a header that lied about its size
                            raise BadUpload(413, f"directory upload {name!r} unpacks to more than the server's limit of {max_bytes // (1024 * 1024)} MB")
                        out.write(chunk)
            end = tar.offset  # where tarfile stopped: the end-of-archive blocks, or a header it could not read
        with open(archive, "rb") as f:
            f.seek(end)
            while chunk := f.read(1 << 20):
                if chunk.strip(b"\0"):
                    raise BadUpload(400, f"directory upload {name!r} is not a valid tar: an unreadable header at byte {end} (a bad checksum or garbage after the last member)")
    except BadUpload:
        raise
    except FileExistsError:
        raise BadUpload(400, f"directory upload {name!r} is not a valid tar: a member is given twice") from None
    except OSError as exc:  # a name the file system refuses, a full disk: the upload's fault or not, never a 500
        raise BadUpload(400, f"directory upload {name!r} could not be unpacked: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - tarfile.TarError, and the ValueError/OverflowError/EOFError/UnicodeError of malformed headers
        raise BadUpload(400, f"directory upload {name!r} is not a valid tar: {_one_line(exc)}") from None
    finally:
        archive.unlink(missing_ok=True)


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def is_within(path: Path, root: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
    except ValueError:
        return False
    return True
