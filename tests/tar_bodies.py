"""Malformed tar bodies for directory uploads (issue #27 item 1): named builders for the upload tests,
and a hypothesis strategy that mutates real archives for the fuzz test."""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from typing import Callable

BLOCK = 512


def archive(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"abc", type: bytes = tarfile.REGTYPE, pax: dict[str, str] | None = None, **attrs: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = type
    info.size = len(data) if type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    if pax:
        info.pax_headers = pax
    return info, (data if info.size else None)


def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def with_header_field(raw: bytes, header_at: int, start: int, value: bytes) -> bytes:
    """``raw`` with bytes ``start..`` of the header at ``header_at`` replaced and its checksum redone."""
    out = bytearray(raw)
    header = out[header_at:header_at + BLOCK]
    header[start:start + len(value)] = value
    _fix_checksum(header)
    out[header_at:header_at + BLOCK] = header
    return bytes(out)


def sparse_10(realsize: int, data: bytes) -> bytes:
    """A GNU sparse 1.0 member (PAX headers) whose data block is ``data``: the sparse map lives there."""
    return archive(member("GNUSparseFile.0/a", data, pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                          "GNU.sparse.name": "a", "GNU.sparse.realsize": str(realsize)}))


def gzip_bomb(unpacked: int = 64 * 1024 * 1024) -> bytes:
    """A gzip stream of ``unpacked`` zero bytes (64 MB in ~64 KB), the start of a tar of zeros."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    return b"".join([*(co.compress(zeros) for _ in range(unpacked >> 20)), co.flush()])


def _two() -> bytes:
    return archive(member("a.txt", b"1"), member("b.txt", b"2"), fmt=tarfile.USTAR_FORMAT)


def _bad_checksum(at: int) -> bytes:
    raw = bytearray(_two())
    raw[at + 148:at + 154] = b"000001"
    return bytes(raw)


# name -> builder; a correct server answers each with a 4xx and a one-line message
MALFORMED: dict[str, Callable[[], bytes]] = {
    "sparse 1.0 without a map (issue #27)": lambda: sparse_10(52428800, b""),
    "sparse 1.0 with a garbled map": lambda: sparse_10(52428800, b"zz\nqq\n" + b"\0" * 506),
    "sparse 1.0 map of one number": lambda: sparse_10(52428800, b"1\n" + b"\0" * 510),
    "sparse 0.1 with a garbled map": lambda: archive(member("a", pax={"GNU.sparse.map": "1,2,x", "GNU.sparse.size": "9"})),
    "sparse 0.0 (well formed, refused)": lambda: archive(member("a", pax={"GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0",
                                                                          "GNU.sparse.numbytes": "3", "GNU.sparse.size": "10000000000"})),
    "negative size in PAX": lambda: archive(member("a", pax={"size": "-5"})),
    "negative size in base-256": lambda: with_header_field(archive(member("a", b""), fmt=tarfile.GNU_FORMAT), 0, 124, b"\xff" * 12),
    "huge size in PAX": lambda: archive(member("a", pax={"size": str(10**23)})),
    "huge size in base-256": lambda: with_header_field(archive(member("a", b""), fmt=tarfile.GNU_FORMAT), 0, 124, b"\x80" + b"\x7f" * 11),
    "size that is not a number in PAX": lambda: archive(member("a", pax={"size": "abc"})),
    "octal size that is not a number": lambda: with_header_field(_two(), 0, 124, b"9x9x9x9x9x9\0"),
    "bad checksum in the first header": lambda: _bad_checksum(0),
    "bad checksum in a later header": lambda: _bad_checksum(1024),
    "truncated inside a header": lambda: _two()[:1024 + 300],
    "truncated inside the data": lambda: archive(member("a.bin", b"x" * 4000))[:BLOCK + 1000],
    "garbage after the last member": lambda: archive(member("a.txt", b"1"))[:1024] + b"garbage!" * 64,
    "not a tar at all": lambda: b"hello, world\n" * 100,
    "empty body": lambda: b"",
    "gzip bomb": gzip_bomb,
    "a symlink": lambda: archive(member("l", type=tarfile.SYMTYPE, linkname="/etc/passwd")),
    "a hard link": lambda: archive(member("a.txt", b"1"), member("h", type=tarfile.LNKTYPE, linkname="a.txt")),
    "a character device": lambda: archive(member("tty", type=tarfile.CHRTYPE, devmajor=5, devminor=0)),
    "a block device": lambda: archive(member("sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)),
    "a fifo": lambda: archive(member("p", type=tarfile.FIFOTYPE)),
    "a member given twice": lambda: archive(member("a.txt", b"1"), member("a.txt", b"2")),
    "a path outside the folder": lambda: archive(member("../escape.txt", b"1")),
    "a PAX header larger than 1 MB": lambda: archive(member("a", pax={"comment": "x" * (2 * 1024 * 1024)})),
    "a GNU long name larger than 1 MB": lambda: archive(member("n" * (2 * 1024 * 1024), b"1"), fmt=tarfile.GNU_FORMAT),
}


def tar_bodies():  # -> hypothesis strategy of bytes
    """Real archives (PAX, GNU, ustar; files, folders, links, devices; PAX records drawn from the keys
    tarfile interprets), then damaged: bytes overwritten in a header, truncated, or gzipped."""
    from hypothesis import strategies as st

    pax_keys = st.sampled_from(["GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.realsize", "GNU.sparse.name", "GNU.sparse.map",
                                "GNU.sparse.size", "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes",
                                "size", "path", "linkpath", "mtime", "uid", "hdrcharset", "comment"])
    pax_values = st.one_of(st.sampled_from(["0", "1", "-1", "1,2", "1,2,x", str(10**12), str(2**64), "nan", "", "a/../b", "BINARY"]),
                           st.integers(-(2**70), 2**70).map(str), st.text(max_size=12))
    names = st.sampled_from(["a.txt", "d/", "d/b.bin", "GNUSparseFile.0/a", "../x", "", "x" * 120])
    types = st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                                     tarfile.FIFOTYPE, tarfile.GNUTYPE_SPARSE, tarfile.CONTTYPE])

    @st.composite
    def one(draw):
        members = []
        for _ in range(draw(st.integers(0, 3))):
            type_ = draw(types)
            data = draw(st.binary(max_size=700)) if type_ in (tarfile.REGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE) else b""
            info = tarfile.TarInfo(draw(names))
            info.type = type_
            info.size = len(data)
            info.linkname = "a.txt" if type_ in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            info.pax_headers = draw(st.dictionaries(pax_keys, pax_values, max_size=4))
            if type_ == tarfile.REGTYPE and draw(st.booleans()):  # a GNU sparse 1.0 member: its map is the data's first lines
                info.pax_headers.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": draw(pax_values)})
                lines = draw(st.lists(st.sampled_from(["1", "0", "2", "3", "-1", "x", "99999999999", ""]), max_size=5))
                data = "".join(f"{line}\n" for line in lines).encode().ljust(BLOCK * draw(st.integers(0, 1)), b"\0")[:BLOCK] + data
                info.size = len(data)
            members.append((info, data or None))
        fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
        try:
            raw = archive(*members, fmt=fmt)
        except (ValueError, UnicodeError, OverflowError):  # a member this format cannot hold: a plain archive then
            raw = archive(member("a.txt", b"1"))
        damage = draw(st.sampled_from(["none"] * 4 + ["bytes", "field", "truncate", "gzip", "append"]))
        if damage == "bytes" and raw:
            out = bytearray(raw)
            for _ in range(draw(st.integers(1, 4))):
                out[draw(st.integers(0, min(len(out), 4 * BLOCK) - 1))] = draw(st.integers(0, 255))
            raw = bytes(out)
        elif damage == "field" and len(raw) >= BLOCK:
            start = draw(st.sampled_from([0, 100, 108, 116, 124, 136, 148, 156, 157, 257, 263, 329, 337, 345]))
            raw = with_header_field(raw, 0, start, draw(st.binary(min_size=1, max_size=12)))
        elif damage == "truncate":
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif damage == "gzip":
            raw = gzip.compress(raw)
        elif damage == "append":
            raw += draw(st.binary(min_size=1, max_size=64))
        return raw

    return one()
