#!/usr/bin/env bash
# Every measurement that needs the lent CUDA machine, in one run (see docs/infer.md, docs/scale.md).
# The machine has torch, opencv, numpy, typer, rich, httpx; the rest travels as py3.12 wheels in .whl/
# (bench/device-wheels.txt lists them; `carry: [".whl"]`). Figures and logs go to $OUT.
#   run: bash bench/device.sh [profile]       (CPU dry run here: OUT=/tmp/out DEVICE=cpu bash bench/device.sh)
set -uo pipefail
OUT=${OUT:-/tmp/synapse-device-out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-0}
log="$OUT/log.txt"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }

if [ -d .whl ] && [ "$DEVICE" != cpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$log" 2>&1 || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
  PY=python3
else
  export PYTHONPATH=$PWD/src
  PY=${PY:-.venv/bin/python}
fi
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLO_CONFIG_DIR=/tmp/yolo-config SYNAPSE_CACHE_DIR=/tmp/synapse-cache

say "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; nproc; $PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "torchvision", torchvision.__version__)'; echo "ffmpeg: $(command -v ffmpeg || echo none)"; } 2>&1 | tee -a "$log"

if [ "$DEVICE" = cpu ]; then
  small=(--device cpu --seconds 1 --width 320 --height 180 --imgsz 160 --batch 4 --runs 1)
  prof=(--device cpu --seconds 1 --width 320 --height 180 --imgsz 160)
  checks=(--device cpu --seconds 1 --width 320 --height 180 --imgsz 160 --memory-frames 20 60 --memory-size 160x96)
else
  small=(); checks=(); prof=()
fi

if [ "${1:-}" = profile ]; then  # only the thread-by-thread profile of a batched run
  say "bench/infer_gpu_profile.py"
  timeout 200 $PY bench/infer_gpu_profile.py "${prof[@]}" --out "$OUT/profile.txt" 2>&1 | tail -5 | tee -a "$log"
  exit
fi

say "bench/infer_gpu.py"
timeout 170 $PY bench/infer_gpu.py "${small[@]}" --out "$OUT/infer_gpu.json" 2>&1 | tee -a "$log"

say "bench/infer_gpu_checks.py"
timeout 150 $PY bench/infer_gpu_checks.py "${checks[@]}" --out "$OUT/infer_gpu_checks.json" 2>&1 | tee -a "$log"

if command -v ffmpeg >/dev/null && [ "$DEVICE" != cpu ]; then
  say "bench/shards.py on $(nproc) quiet cores, system $(ffmpeg -version | head -1)"
  timeout 150 $PY bench/shards.py --skip-modal --runs 2 2>&1 | tee -a "$log"
else
  say "no system ffmpeg here (or a CPU dry run): export and shard benches skipped"
fi
say "done"
