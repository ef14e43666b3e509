"""`synapse --help` wall time beside `python -c pass` (median of N runs each, interleaved).

Target: synapse --help under 120 ms on these machines.
Usage: python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _common import synapse_exe, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    synapse, python = synapse_exe() + ["--help"], [sys.executable, "-c", "pass"]
    timed(synapse)  # warm the page cache and .pyc files
    s, p = [], []
    for _ in range(args.runs):
        s.append(timed(synapse))
        p.append(timed(python))
    ms, mp = statistics.median(s) * 1000, statistics.median(p) * 1000
    print(f"synapse --help   median {ms:7.1f} ms over {args.runs} runs")
    print(f"python -c pass   median {mp:7.1f} ms over {args.runs} runs")
    print(f"ratio            {ms / mp:7.2f}x   (target: synapse --help < 120 ms: {'ok' if ms < 120 else 'MISSED'})")


if __name__ == "__main__":
    main()
