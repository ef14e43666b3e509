"""The terminal renderer: the only module that imports rich."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, Progress as Bar, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from synapse_cli.events import Artifact, Event, Finished, Log, Progress, Started


def render_rich(
    events: Iterable[Event],
    summarize: Callable[[dict[str, Any]], str] | None = None,
    console: Console | None = None,
    out: Console | None = None,
) -> dict[str, Any]:
    """A live bar (phase, %, ETA) on stderr; logs above it; the result line on stdout."""
    console = console or Console(stderr=True)  # rich honours NO_COLOR itself
    out = out or Console(soft_wrap=True)
    result: dict[str, Any] = {}
    bar = Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = None
    job = "job"
    with bar:
        for ev in events:
            if isinstance(ev, Started):
                job = ev.job
                task = bar.add_task(job, total=ev.total, message="")
            elif isinstance(ev, Progress):
                if task is None:
                    task = bar.add_task(job, total=ev.total, message="")
                desc = f"{job} {ev.phase}" if ev.phase else job
                bar.update(task, completed=ev.done, total=ev.total, description=desc, message=ev.message or "")
            elif isinstance(ev, Log):
                style = "yellow" if ev.level == "warning" else "dim"
                bar.console.print(Text(ev.message, style=style))
            elif isinstance(ev, Artifact):
                bar.console.print(Text.assemble("wrote ", (ev.path, "bold"), f" ({ev.bytes:,} bytes)"))
            elif isinstance(ev, Finished):
                result = ev.result
                if task is not None:
                    total = bar.tasks[task].total
                    if total:
                        bar.update(task, completed=total)
    if summarize:
        out.print(summarize(result), markup=False, highlight=False)
    return result
