from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable, Iterable

from synapse_cli.events import Artifact, Event, Finished, Log, Progress, Started


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(job: str, ev: Progress, eta_s: float | None = None) -> str:
    parts = [f"{job}:"]
    if ev.total:
        parts.append(f"{100.0 * ev.done / ev.total:5.1f}% ({ev.done:g}/{ev.total:g})")
    else:
        parts.append(f"{ev.done:g}")
    if ev.phase:
        parts.append(ev.phase)
    if ev.message:
        parts.append(ev.message)
    if eta_s is not None:
        parts.append(f"eta {_fmt_eta(eta_s)}")
    return " ".join(parts)


def render_plain(
    events: Iterable[Event],
    summarize: Callable[[dict[str, Any]], str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    interval_s: float = 1.0,
) -> dict[str, Any]:
    """Progress at most once per ``interval_s`` on stderr, no colour, no cursor tricks."""
    out, err = out or sys.stdout, err or sys.stderr
    job, start, last_print = "job", clock(), float("-inf")
    result: dict[str, Any] = {}
    for ev in events:
        if isinstance(ev, Started):
            job, start = ev.job, clock()
            print(f"{job}: started", file=err, flush=True)
        elif isinstance(ev, Progress):
            now = clock()
            final = bool(ev.total) and ev.done >= ev.total
            if now - last_print >= interval_s or final:
                eta = None
                if ev.total and 0 < ev.done < ev.total:
                    eta = (now - start) * (ev.total - ev.done) / ev.done
                print(progress_line(job, ev, eta), file=err, flush=True)
                last_print = now
        elif isinstance(ev, Log):
            prefix = "warning: " if ev.level == "warning" else ""
            print(f"{job}: {prefix}{ev.message}", file=err, flush=True)
        elif isinstance(ev, Artifact):
            print(f"{job}: wrote {ev.path} ({ev.bytes} bytes)", file=err, flush=True)
        elif isinstance(ev, Finished):
            result = ev.result
            print(f"{job}: finished in {ev.elapsed_s:.1f}s", file=err, flush=True)
            if summarize:
                print(summarize(result), file=out, flush=True)
    return result
