#!/usr/bin/env bash
# The short-clip benches on two pinned, quiet cores of the lent machine (this project's own machine is
# shared: its load average moves every wall-clock ratio). Figures go to $OUT.
# It carries: .whl/ (typer, pydantic, ffmpeg-python and the other pure-Python needs of `synapse export`,
# as py3.12 wheels; not av: a framing export of an MP4 no longer imports it), build/ffmpeg.xz (the
# imageio-ffmpeg static binary, xz; used when the machine has no ffmpeg) and build/base-src (the main
# branch's src/, for `synapse --help` before/after; its export needs av, so it is not timed here).
#   run: bash bench/short_clip_device.sh        carry: [".whl", "build"]
#   CPU dry run here: DRY=1 bash bench/short_clip_device.sh
set -uo pipefail
OUT=${OUT:-/tmp/synapse-device-out}; mkdir -p "$OUT"
log="$OUT/log.txt"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }

if [ -z "${DRY:-}" ]; then
  PY=python3
  $PY -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl >>"$log" 2>&1 || { say "wheel install failed"; tail -5 "$log"; exit 1; }
  SITE=/tmp/site
  pin=(taskset -c 0,1)
  seconds=(--short); runs=7
else
  PY=${PY:-/work/main/.venv/bin/python}
  SITE=""
  pin=()
  seconds=(--seconds 1); runs=1
fi
mkdir -p /tmp/ffbin
if command -v ffmpeg >/dev/null; then
  say "system ffmpeg: $(command -v ffmpeg)"
else
  $PY -c "import lzma, shutil; shutil.copyfileobj(lzma.open('build/ffmpeg.xz'), open('/tmp/ffbin/ffmpeg', 'wb'))" && chmod +x /tmp/ffbin/ffmpeg
  export PATH=/tmp/ffbin:$PATH
  say "carried ffmpeg: $(ffmpeg -version | head -1)"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${SITE:+$SITE:}$PWD/src
$PY -m compileall -q src build/base-src >/dev/null 2>&1  # .pyc files, as an installed package has them
{ nproc; $PY --version; cat /proc/loadavg; } 2>&1 | tee -a "$log"

say "bench/startup.py (this branch), 2 pinned cores"
timeout 60 "${pin[@]}" $PY bench/startup.py --runs 15 2>&1 | tee -a "$log"
if [ -d build/base-src ]; then
  say "bench/startup.py (main: build/base-src), 2 pinned cores"
  PYTHONPATH=${SITE:+$SITE:}$PWD/build/base-src timeout 60 "${pin[@]}" $PY bench/startup.py --runs 15 2>&1 | tee -a "$log"
fi

say "bench/export.py ${seconds[*]} --runs $runs, 2 pinned cores"
timeout 240 "${pin[@]}" $PY bench/export.py "${seconds[@]}" --runs "$runs" 2>&1 | tee -a "$log"
cat /proc/loadavg | tee -a "$log"
say "done"
