#!/usr/bin/env bash
# Every measurement that needs the lent CUDA machine, in one run, under 8 minutes (see docs/infer.md).
# The machine has torch, opencv, numpy, typer, rich, httpx; the rest travels as py3.12 wheels in .whl/
# (bench/device-wheels.txt lists them). Issue 24's steps travel as source trees in build/steps/ (made here,
# before the run, by `bash bench/device.sh prepare`: the committed code before the issue, then each step).
# Figures and logs go to $OUT, named with the date and the card, ready for docs/measurements/.
#   here:  bash bench/device.sh prepare                       (git archive of each step into build/steps/)
#   there: bash bench/device.sh        carry: [".whl", "build/steps"]
#   CPU dry run here: OUT=/tmp/out DEVICE=cpu bash bench/device.sh
#   SHARDS=1 adds the export/shard bench (docs/scale.md); `profile` runs only the thread profile.
set -uo pipefail

# issue 24, measured in this order: the code before it, then each step (name=commit)
STEPS=(0-committed=784453c 1-decode=ac68dc8 2-postprocess=5ec5368 3-fixed-costs=5bc633c)

if [ "${1:-}" = prepare ]; then
  rm -rf build/steps && mkdir -p build/steps
  for step in "${STEPS[@]}"; do
    name=${step%%=*}; commit=${step#*=}
    mkdir -p "build/steps/$name" && git archive "$commit" src | tar -x -C "build/steps/$name" || exit 1
  done
  if [ ! -d .whl ] && [ -z "${SKIP_WHEELS:-}" ]; then  # FACTS.md, "The CUDA machine": py3.12 manylinux wheels, no deps
    sed 's/-\([0-9]\)/==\1/' bench/device-wheels.txt | ${PY:-python3} -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl -r /dev/stdin || exit 1
  fi
  du -shc build/steps .whl 2>/dev/null | tail -1  # carry limit: 64 MiB together
  exit 0
fi
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

steps=""
for d in build/steps/*/; do [ -d "$d/src" ] && steps+="${steps:+,}$(basename "$d")=${d}src"; done
steps+="${steps:+,}9-this-tree=src"  # the tree being run, measured the same way (a fresh process each)
card=$($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>/dev/null | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
stamp="$(date -u +%Y-%m-%d)-${card:-unknown}"

if [ "$DEVICE" = cpu ]; then
  small=(--device cpu --seconds 1 --width 320 --height 180 --imgsz 160 --batch 4 --runs 2 --predict-runs 1)
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

say "bench/infer_gpu.py, steps: ${steps:-none}"
timeout 280 $PY bench/infer_gpu.py "${small[@]}" --steps "$steps" --out "$OUT/$stamp-infer_gpu.json" 2>&1 | tee -a "$log"

say "bench/infer_decode.py"
timeout 40 $PY bench/infer_decode.py --runs 3 --out "$OUT/$stamp-infer_decode.json" 2>&1 | tail -12 | tee -a "$log"

say "bench/infer_gpu_checks.py"
timeout 120 $PY bench/infer_gpu_checks.py "${checks[@]}" --out "$OUT/$stamp-infer_gpu_checks.json" 2>&1 | tee -a "$log"

if [ -n "${SHARDS:-}" ] && command -v ffmpeg >/dev/null && [ "$DEVICE" != cpu ]; then
  say "bench/shards.py on $(nproc) quiet cores, system $(ffmpeg -version | head -1)"
  timeout 150 $PY bench/shards.py --skip-modal --runs 2 2>&1 | tee -a "$log"
else
  say "no system ffmpeg here (or a CPU dry run): export and shard benches skipped"
fi
say "done"
