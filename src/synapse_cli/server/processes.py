"""The processes a server job starts (ffmpeg runs in a session of its own), found and killed: those of a
running job (``kill_children``, by its thread's native id) and those a dead server left behind in a
job's folder (``kill_orphans``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

def _children(pid: int, tid: int | None = None) -> list[int]:
    """Direct children of one thread (``tid``) or of every thread of ``pid``."""
    tasks = [str(tid)] if tid is not None else None
    base = Path(f"/proc/{pid}/task")
    try:
        names = tasks or [t.name for t in base.iterdir()]
    except OSError:
        return []
    out: list[int] = []
    for name in names:
        try:
            out.extend(int(c) for c in (base / name / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


def kill_children(tid: int | None) -> list[int]:
    """SIGKILL every process the thread ``tid`` of this process started, with their descendants
    and process groups (ffmpeg runs in its own session). Returns the pids signalled."""
    if tid is None:
        return []
    found: list[int] = []
    todo = _children(os.getpid(), tid)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(_children(pid))
    for pid in reversed(found):
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def kill_orphans(job_dir: Path) -> list[int]:
    """SIGKILL the processes whose command line names a path inside ``job_dir``: what a server that died
    (SIGKILL, a crash) left of its job, ffmpeg first (it runs in a session of its own, so it outlives the
    server and would go on writing into the folder). Linux only (``/proc``); elsewhere nothing is found."""
    needle = (str(job_dir).rstrip("/") + "/").encode()
    killed: list[int] = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return killed
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        except (OSError, ProcessLookupError, PermissionError):
            continue
    _wait_gone(killed)
    return killed


def _alive(pid: int) -> bool:
    """Still running: its /proc entry is there and it is not a zombie (a zombie writes nothing more)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], timeout_s: float = 5.0) -> None:
    """SIGKILL is delivered at once but a loaded machine may take a moment to end the process: wait
    (``timeout_s`` at most) so that nothing of the dead server still writes when the new one starts."""
    until = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < until:
        time.sleep(0.02)
