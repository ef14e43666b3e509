"""The HTTP endpoint's cost: `synapse export --endpoint` on loopback ÷ `synapse export --no-modal`, and events/second.

1. Export: a 1280x720 clip with audio, framing to 810x1440 (libx264 fast, crf 23), run
   through `synapse serve` on 127.0.0.1 and in-process; runs interleaved, medians compared.
   Both are the real CLI in a fresh process (`--no-cache`: every run encodes). The endpoint
   run adds the upload, the stream, the download and the rename.
2. Requests: GET /v1/jobs on one keep-alive connection ÷ the same on a new connection each time
   (medians). A keep-alive response whose body waits for an ACK (Nagle's algorithm left on)
   shows here as a ratio far above 1: it was 44 ms against 3 ms before serve's socket said TCP.
3. Events/second: a synthetic job kind (registered only in this benchmark's server) yields
   N progress events as fast as it can; HttpBackend decodes them on the client. The same
   generator consumed in-process (and NDJSON-encoded) is printed beside it for scale.

Usage: python bench/http_overhead.py [--runs 3] [--seconds 10] [--events 200000] [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

from _common import make_test_clip, synapse_exe, timed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
KEY = "bench-key-0000000000000000"


@dataclass
class ManySpec:
    count: int = 100_000

    INPUTS: ClassVar[tuple[str, ...]] = ()
    OUTPUTS: ClassVar[tuple[str, ...]] = ()


def many_events(spec: ManySpec) -> Iterator[object]:
    from synapse_cli.events import Finished, Progress, Started

    yield Started(job="bench_events", total=spec.count)
    for i in range(1, spec.count + 1):
        yield Progress(done=i, total=spec.count, phase="bench")
    yield Finished(result={"count": spec.count})


def bench_kind():
    from synapse_cli.jobs import JobKind

    return JobKind(name="bench_events", spec="http_overhead:ManySpec", run="http_overhead:many_events")


# `synapse serve` with the synthetic kind registered: the server runs in its own process, as it would for real
SERVER = """
import sys
sys.path.insert(0, {bench!r})
from synapse_cli.jobs import register_kind
from http_overhead import bench_kind
register_kind(bench_kind())
from synapse_cli.cli import app
app(["serve", "--port", "0", "--work-dir", {work!r}])
"""


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    code = SERVER.format(bench=str(Path(__file__).resolve().parent), work=str(work))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env={**os.environ, "SYNAPSE_API_KEY": KEY})
    line = proc.stderr.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stderr.read()}")
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain the access log
    return proc, line.split("listening on ")[1].split()[0]


def bench_export(url: str, work: Path, runs: int, seconds: int) -> None:
    from synapse_cli.jobs._media import find_ffmpeg

    ffmpeg = find_ffmpeg(None)
    clip = make_test_clip(ffmpeg, work / "clip.mp4", seconds)
    common = ["export", str(clip), "--job", "framing", "--overwrite", "--no-cache"]
    local = synapse_exe() + common + ["--no-modal", "-o", str(work / "local.mp4")]
    remote = synapse_exe() + common + ["--endpoint", url, "-o", str(work / "remote.mp4")]
    env = {**os.environ, "SYNAPSE_FFMPEG": ffmpeg, "SYNAPSE_API_KEY": KEY, "SYNAPSE_JOBS_DB": str(work / "jobs.db")}
    timed(remote, env=env)  # warm-up: page cache, .pyc files, the server's first import of the export job
    t_local, t_remote = [], []
    for _ in range(runs):
        t_local.append(timed(local, env=env))
        t_remote.append(timed(remote, env=env))
    ml, mr = statistics.median(t_local), statistics.median(t_remote)
    size = clip.stat().st_size / 1e6
    out = (work / "remote.mp4").stat().st_size / 1e6
    same = (work / "remote.mp4").read_bytes() == (work / "local.mp4").read_bytes()
    print(f"export: {seconds} s 1280x720 + audio ({size:.1f} MB up, {out:.1f} MB down), framing to 810x1440, {runs} runs each, interleaved")
    print(f"  --no-modal          median {ml:6.2f} s   runs {', '.join(f'{t:.2f}' for t in t_local)}")
    print(f"  --endpoint loopback median {mr:6.2f} s   runs {', '.join(f'{t:.2f}' for t in t_remote)}")
    print(f"  ratio               {mr / ml:6.3f}   ({(mr - ml) * 1000:+.0f} ms; outputs byte-identical: {same})")
    bench_transport(url, clip, work, runs)


def bench_transport(url: str, clip: Path, work: Path, runs: int) -> None:
    """Less noisy than wall-clock ratios on a busy machine: per job, wall time minus the job's own
    ``elapsed_s`` (from its ``finished`` event), in this process, HttpBackend beside LocalBackend."""
    from synapse_cli.backends.http import HttpBackend
    from synapse_cli.backends.local import LocalBackend
    from synapse_cli.events import Finished
    from synapse_cli.jobs.export.job import ExportSpec

    extra: dict[str, list[float]] = {"local": [], "http": []}
    for _ in range(runs):
        for name, backend in (("local", LocalBackend()), ("http", HttpBackend(url, KEY))):
            out = work / f"t_{name}.mp4"
            out.unlink(missing_ok=True)
            start = time.perf_counter()
            elapsed = 0.0
            for event in backend.run("export", ExportSpec(input=str(clip), output=str(out))):
                if isinstance(event, Finished):
                    elapsed = event.elapsed_s
            extra[name].append(time.perf_counter() - start - elapsed)
            backend.close()
    ml, mh = statistics.median(extra["local"]) * 1000, statistics.median(extra["http"]) * 1000
    print(f"  time outside the job (wall - finished.elapsed_s), median of {runs}, in-process:")
    print(f"    local {ml:6.0f} ms   http {mh:6.0f} ms   -> the endpoint adds {mh - ml:.0f} ms per job (upload, stream, download, rename)")


def bench_requests(url: str, count: int) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}

    def one(client: httpx.Client) -> float:
        start = time.perf_counter()
        client.get(f"{url}/v1/jobs", headers=headers).raise_for_status()
        return time.perf_counter() - start

    kept, fresh = [], []
    with httpx.Client() as client:
        one(client)
        for _ in range(count):
            kept.append(one(client))
            with httpx.Client() as new:
                fresh.append(one(new))
    mk, mf = statistics.median(kept) * 1000, statistics.median(fresh) * 1000
    print(f"requests: GET /v1/jobs, {count} each, interleaved, medians")
    print(f"  one keep-alive connection {mk:6.2f} ms   a new connection each {mf:6.2f} ms   ratio {mk / mf:5.2f}")


def bench_events(url: str, count: int) -> None:
    from synapse_cli.jobs import register_kind

    register_kind(bench_kind())  # the client too: it reads the kind's record to stage paths
    from synapse_cli.backends.http import HttpBackend
    from synapse_cli.render.ndjson import encode

    backend = HttpBackend(url, KEY, timeout_s=60)
    best_http = 0.0
    for _ in range(2):
        n, first, last = 0, None, 0.0
        start = time.perf_counter()
        for _event in backend.run("bench_events", ManySpec(count=count)):
            n += 1
            last = time.perf_counter()
            first = first or last
        best_http = max(best_http, n / (last - start))
    backend.close()
    start = time.perf_counter()
    for event in many_events(ManySpec(count=count)):
        encode(event)
    local = (count + 2) / (time.perf_counter() - start)
    print(f"events: {count:,} progress events per job, best of 2")
    print(f"  over HTTP (job thread -> NDJSON -> loopback -> httpx -> decoded)  {best_http:10,.0f} events/s")
    print(f"  in-process generator + NDJSON encode, for scale                  {local:10,.0f} events/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        server, url = start_server(work / "srv")
        try:
            bench_requests(url, args.requests)
            bench_export(url, work, args.runs, args.seconds)
            bench_events(url, args.events)
        finally:
            server.terminate()
            server.wait(timeout=15)


if __name__ == "__main__":
    main()
