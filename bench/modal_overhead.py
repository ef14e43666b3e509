"""The Modal path's overhead, through the fake control plane in tests/modal_fake (the real modal client, on loopback).

For the same export job: time from call to first progress event, and total wall time, via
`ModalBackend` (upload to the Volume, remote_gen streaming, download) ÷ `LocalBackend`.
Streaming must be incremental: the first event arrives long before the last.
Usage: python bench/modal_overhead.py [--runs 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(backend, spec) -> tuple[float, float, float]:
    from synapse_cli.events import Finished, Progress

    start = time.perf_counter()
    first = last_progress = None
    for event in backend.run("export", spec):
        now = time.perf_counter() - start
        if isinstance(event, Progress):
            first = first if first is not None else now
            last_progress = now
        if isinstance(event, Finished):
            total = now
    backend.close()
    return first, last_progress, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    args = ap.parse_args()
    from tests.conftest import make_clip
    from tests.modal_fake.fixtures import reset_modal_client
    from tests.modal_fake.server import FakeModal

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        fake = FakeModal(work / "fake").start()
        os.environ.update(MODAL_SERVER_URL=fake.url, MODAL_TOKEN_ID="ak-fake", MODAL_TOKEN_SECRET="as-fake")
        reset_modal_client()
        from synapse_cli import modal_app
        from synapse_cli.backends.local import LocalBackend
        from synapse_cli.backends.modal import ModalBackend
        from synapse_cli.config import load_settings
        from synapse_cli.jobs.export.job import ExportSpec

        modal_app.app.deploy(name="synapse")
        clip = make_clip(work / "clip.mp4", size="1280x720", seconds=args.seconds)
        settings = load_settings({})
        rows = {"local": [], "modal (fake)": []}
        for i in range(args.runs):
            for name, backend in (("local", LocalBackend()), ("modal (fake)", ModalBackend.from_settings(settings))):
                spec = ExportSpec(input=str(clip), output=str(work / f"{name[:5]}{i}.mp4"), params={}, preset="veryfast")
                rows[name].append(measure(backend, spec))
        fake.stop()
    med = {name: [statistics.median(r[k] for r in runs) for k in range(3)] for name, runs in rows.items()}
    print(f"export, {args.seconds} s 1280x720 clip, framing veryfast, median of {args.runs} runs")
    print(f"{'':14} {'first progress':>15} {'last progress':>14} {'total':>8}")
    for name, (first, lastp, total) in med.items():
        print(f"{name:14} {first:14.3f}s {lastp:13.3f}s {total:7.3f}s")
    (lf, _, lt), (mf, ml, mt) = med["local"], med["modal (fake)"]
    print(f"ratio modal/local: first event {mf / lf:.2f}x (+{mf - lf:.3f}s), total {mt / lt:.3f}x (+{mt - lt:.3f}s)")
    print(f"incremental: first progress {mf:.2f}s, last progress {ml:.2f}s, end {mt:.2f}s -> {'yes' if ml - mf > 0.5 * (mt - mf) else 'NO'}")


if __name__ == "__main__":
    main()
