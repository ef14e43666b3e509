"""Data where it lives: an export ``--use-modal`` through the fake control plane with ``s3://`` in and out,
against the same export from and to local paths.

The object store is moto's S3 server on loopback; the "container" (a function body run by the fake
control plane, in this process) reads and writes it with credentials from a named Modal Secret, and
the client (a ``synapse export`` subprocess) has none. Every byte between the client and the control
plane (gRPC and its blob/Volume HTTP server) goes through a counting TCP proxy, so "client bytes" is
what the client sent and received, all of it. Prints, for each way and their ratio: client bytes
sent and received (target for URLs: at most 1 MB each way), time to the first progress event, and
wall time. A third way splits the s3:// job into 4 shards, split and merged in a container.

Usage: python bench/object_io.py [--mb 200] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import synapse_exe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
from synapse_cli.jobs._media import find_ffmpeg  # noqa: E402


class CountingProxy:
    """127.0.0.1:port -> target, counting the bytes each way (``up``: client to target).

    Connections from this process are relayed but not counted: the fake control plane runs the
    function bodies here, and what a container fetches from the Volume (export_sharded's pieces) is
    not the client's traffic (psutil, which ultralytics installs, says whose a connection is)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = self.down = 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, peer = self.sock.accept()
            except OSError:
                return
            counted = not self._ours(peer[1])
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, True, counted), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, counted), daemon=True).start()

    @staticmethod
    def _ours(port: int) -> bool:
        import psutil

        return any(c.laddr and c.laddr.port == port for c in psutil.Process().net_connections(kind="tcp"))

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if not counted:
                    continue
                with self.lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> tuple[int, int]:
        with self.lock:
            counts, self.up, self.down = (self.up, self.down), 0, 0
        return counts


def make_input(ffmpeg: str, path: Path, mb: int) -> Path:
    """About ``mb`` MB of H.264 at 640x360 (noise: ~2.5 MB/s), a keyframe a second, moov first."""
    seconds = max(4, round(mb / 2.6))
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", f"nullsrc=size=640x360:rate=25:duration={seconds},geq=random(1)*255:128:128",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path)],
                   check=True)  # fmt: skip
    return path


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first progress event, wall seconds) of one ``--json`` run."""
    start = time.perf_counter()
    first = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if first is None and line.strip() and json.loads(line).get("type") == "progress":
            first = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return (first if first is not None else float("nan")), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200, help="input size in MB (default 200)")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    import logging

    import httpx
    import obstore
    from moto.server import ThreadedMotoServer
    from obstore.store import S3Store

    from tests.modal_fake.fixtures import FAKE_TOKEN_ID, FAKE_TOKEN_SECRET
    from tests.modal_fake.server import FakeModal

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ffmpeg = find_ffmpeg(None)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        clip = make_input(ffmpeg, work / "in.mp4", args.mb)
        size = clip.stat().st_size
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        httpx.put(f"{endpoint}/media").raise_for_status()
        creds = {"AWS_ACCESS_KEY_ID": "AKIABENCH", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1",
                 "SYNAPSE_STORAGE_ENDPOINT": endpoint, "SYNAPSE_STORAGE_PATH_STYLE": "1"}  # fmt: skip
        store = S3Store("media", endpoint=endpoint, region="us-east-1", access_key_id="AKIABENCH", secret_access_key="bench-secret",
                        virtual_hosted_style_request=False, client_options={"allow_http": True})  # fmt: skip
        with open(clip, "rb") as f:
            obstore.put(store, "in.mp4", f)
        fake = FakeModal(work / "modal-fake").start()
        grpc = CountingProxy(fake.port)
        blobs = CountingProxy(fake.blob_port)
        fake.blob_port = blobs.port  # the URLs the control plane hands out now go through the counter too
        # a container's own calls (export_sharded calling export for each shard) are made by the function body,
        # which the fake runs in this process: they reach the fake directly, not through the client's counters
        os.environ.update({"MODAL_SERVER_URL": fake.url, "MODAL_TOKEN_ID": FAKE_TOKEN_ID, "MODAL_TOKEN_SECRET": FAKE_TOKEN_SECRET})
        try:
            fake.set_secret("synapse-s3", creds)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SYNAPSE_STORAGE_"))}
            env.update({"SYNAPSE_JOBS_DB": str(work / "jobs.sqlite3"), "SYNAPSE_MODAL_SECRETS": "synapse-s3",
                        "MODAL_SERVER_URL": f"http://127.0.0.1:{grpc.port}", "MODAL_TOKEN_ID": FAKE_TOKEN_ID, "MODAL_TOKEN_SECRET": FAKE_TOKEN_SECRET,
                        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])})  # fmt: skip
            # deployed from this process, as a container's app is hydrated: export_sharded's body (run here by the
            # fake) calls export through these handles
            os.environ["SYNAPSE_MODAL_SECRETS"] = "synapse-s3"
            from synapse_cli import modal_app

            modal_app.app.deploy(name="synapse")
            small = ["--job", "framing", "--set", "output_width=180", "--set", "output_height=320", "--use-modal", "--json", "--no-cache", "--overwrite"]
            ways = {
                "local paths": synapse_exe() + ["export", str(clip), "-o", str(work / "out.mp4"), *small],
                "s3:// in and out": synapse_exe() + ["export", "s3://media/in.mp4", "-o", "s3://media/out.mp4", *small],
                # split, run and merged in a container (export_sharded): each shard a call of export reading its window
                "s3:// 4 shards": synapse_exe() + ["export", "s3://media/in.mp4", "-o", "s3://media/out4.mp4", *small, "--shards", "4"],
            }
            rows: dict[str, list[tuple[int, int, float, float]]] = {name: [] for name in ways}
            for _ in range(args.runs):
                for name, cmd in ways.items():
                    grpc.reset(), blobs.reset()
                    first, wall = run(cmd, env)
                    (gu, gd), (bu, bd) = grpc.reset(), blobs.reset()
                    rows[name].append((gu + bu, gd + bd, first, wall))
        finally:
            fake.stop()
            moto.stop()
    print(f"input: {size / 1e6:.1f} MB H.264 640x360; export framing to 180x320 --use-modal through the fake control plane, {args.runs} run(s), medians")
    med = {name: tuple(statistics.median(r[i] for r in runs) for i in range(4)) for name, runs in rows.items()}
    for name, (sent, received, first, wall) in med.items():
        print(f"{name:>17}: client sent {sent / 1e6:9.3f} MB, received {received / 1e6:8.3f} MB, first progress {first:6.2f} s, wall {wall:6.2f} s")
    (ls, lr, lf, lw), (us, ur, uf, uw) = med["local paths"], med["s3:// in and out"]
    (ss, sr, sf, sw) = med["s3:// 4 shards"]
    print(f"ratio s3/local: bytes sent {us / ls:.4f}x, received {ur / lr:.4f}x, first progress {uf / lf:.2f}x, wall {uw / lw:.2f}x")
    print(f"ratio s3 4 shards/local: bytes sent {ss / ls:.4f}x, received {sr / lr:.4f}x, first progress {sf / lf:.2f}x, wall {sw / lw:.2f}x"
          " (the shards share this machine's 2 cores in the fake: wall time says nothing of Modal's)")
    met = all(sent <= 1e6 and received <= 1e6 for sent, received in ((us, ur), (ss, sr)))
    print(f"target: s3 client bytes <= 1 MB each way: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
