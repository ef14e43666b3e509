"""Outputs that appear whole or not at all.

Every job writes into a temporary file beside its destination and renames it
into place only on success, so a failed or interrupted job leaves nothing
behind and an existing file is never clobbered without ``overwrite``.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from synapse_cli.errors import UsageError


def check_output(dest: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists or cannot be written."""
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} already exists (use --overwrite to replace it)")
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory")
    parent = dest.parent
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {parent} is not writable")


# The containers synapse writes H.264 + AAC into (each checked with the bundled ffmpeg and the jobs'
# encode options): a video output's name must end in one, so a name no muxer knows ("noext", "a.xyz")
# or one that cannot carry H.264 + AAC (".webm", ".mpg") is refused before anything runs.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".ts", ".flv", ".3gp", ".nut")


def check_video_name(name: str | Path, field: str = "output") -> None:
    """Refuse (``UsageError``, exit 2 / HTTP 422, naming ``field``) a video output whose extension no
    container synapse writes has: the same rule for the CLI, the Python API and ``synapse serve``."""
    suffix = Path(str(name)).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        what = f"a {suffix} file" if suffix else "a name without an extension"
        raise UsageError(f"{field}: {Path(str(name)).name!r}: no container synapse writes is {what}; "
                         f"a video output must end in one of {', '.join(VIDEO_SUFFIXES)}")


def temp_path_for(dest: Path) -> Path:
    """A hidden sibling that keeps the suffix, so muxers and parsers still recognise it."""
    return dest.with_name(f".{dest.stem}.{uuid.uuid4().hex[:8]}.part{dest.suffix}")


def commit(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename ``tmp`` into place; without ``overwrite`` never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # atomic and fails if dest exists
    except FileExistsError:
        raise UsageError(f"{dest} already exists (use --overwrite to replace it)") from None
    except OSError:  # filesystems without hard links
        if dest.exists():
            raise UsageError(f"{dest} already exists (use --overwrite to replace it)") from None
        os.replace(tmp, dest)
        return
    tmp.unlink()


@contextmanager
def atomic_output(dest: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_output(out) as tmp: write(tmp)`` — ``out`` appears only if the block succeeds."""
    dest = Path(dest)
    tmp = temp_path_for(dest)
    try:
        yield tmp
        commit(tmp, dest, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
