"""Plain lines on stderr for CI logs and pipes; in GitHub Actions, also its workflow commands.

With ``GITHUB_ACTIONS=true`` a job's lines are folded in ``::group::``/``::endgroup::`` and a
failure becomes an ``::error`` annotation (see ``error_annotation``, printed by the CLI's
``exit_on_error`` and by ``python -m synapse_cli.ci``). Other CI systems (GitLab CI) and pipes
get the same lines without them.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping

from synapse_cli.errors import one_line
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


def in_github_actions(env: Mapping[str, str] | None = None) -> bool:
    return (os.environ if env is None else env).get("GITHUB_ACTIONS") == "true"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def workflow_command(name: str, message: str = "", **properties: str | None) -> str:
    """``::name key=value,...::message`` with GitHub's escaping (properties also escape ``:`` and ``,``)."""
    props = ",".join(f"{k}={_escape_property(str(v))}" for k, v in properties.items() if v is not None)
    return f"::{name}{' ' + props if props else ''}::{_escape_data(message)}"


_PATHISH = re.compile(r"[^\s'\"`()\[\],;]+")


def named_file(message: str, cwd: Path | None = None) -> str | None:
    """The first existing file the message names, relative to ``cwd`` when it lies inside it (for ``file=``)."""
    cwd = cwd or Path.cwd()
    for token in _PATHISH.findall(message):
        token = token.rstrip(":.")
        if "/" not in token and "." not in token:
            continue
        path = Path(token)
        try:
            if not path.is_file():
                continue
            resolved = path.resolve()
        except OSError:
            continue
        try:
            return resolved.relative_to(cwd.resolve()).as_posix()
        except ValueError:
            return str(path)
    return None


def error_annotation(title: str, message: str, cwd: Path | None = None) -> str:
    """The ``::error`` line for a failure; ``file=`` when the message names an input file."""
    return workflow_command("error", one_line(message), title=title, file=named_file(message, cwd))


def render_plain(
    events: Iterable[Event],
    summarize: Callable[[dict[str, Any]], str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    interval_s: float = 1.0,
    github: bool | None = None,
) -> dict[str, Any]:
    """Progress at most once per ``interval_s`` on stderr, no colour, no cursor tricks.

    ``github`` (default: ``GITHUB_ACTIONS=true``): the job's lines between ``started`` and
    ``finished`` fold into one log group, closed on failure too.
    """
    out, err = out or sys.stdout, err or sys.stderr
    github = in_github_actions() if github is None else github
    job, start, last_print = "job", clock(), float("-inf")
    result: dict[str, Any] = {}
    grouped = False

    def end_group() -> None:
        nonlocal grouped
        if grouped:
            print("::endgroup::", file=err, flush=True)
            grouped = False

    try:
        for ev in events:
            if isinstance(ev, Started):
                job, start = ev.job, clock()
                print(f"{job}: started", file=err, flush=True)
                if github and not grouped:
                    print(f"::group::{job} log", file=err, flush=True)
                    grouped = True
            elif isinstance(ev, Progress):
                now = clock()
                final = ev.total is not None and ev.total > 0 and ev.done >= ev.total
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
                end_group()
                result = ev.result
                print(f"{job}: finished in {ev.elapsed_s:.1f}s", file=err, flush=True)
                if summarize:
                    print(summarize(result), file=out, flush=True)
    finally:
        end_group()  # a failure ends the group too, so its annotation stands outside it
    return result
