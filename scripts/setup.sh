#!/usr/bin/env bash
# Create .venv and install GAS with its dev extras. Idempotent: a second run changes nothing.
# torch==2.13.0 goes first: it is the local CPU wheel; any other torch requirement on a CPU host
# would pull several GB of CUDA wheels. GPU users install their own CUDA torch (>=2.3) first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import gas_core, latency_service, search_client, torch; print('GAS ready, torch', torch.__version__)"
