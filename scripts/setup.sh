#!/usr/bin/env bash
# Create .venv and install GAS with its dev extras. Idempotent: a second run changes nothing.
#
#   scripts/setup.sh [--torch-index URL] [--torch-spec SPEC]
#
# torch goes first, and you choose its build:
#   * default: `torch==2.13.0` from pip's configured index (on the project's CPU machines that
#     index serves the CPU wheel);
#   * --torch-index URL (or GAS_TORCH_INDEX_URL): a torch wheel index, e.g.
#     https://download.pytorch.org/whl/cpu for a CPU-only machine on the public index (plain PyPI
#     would pull several GB of CUDA wheels there), or …/whl/cu126 for a CUDA 12.6 build;
#   * --torch-spec SPEC (or GAS_TORCH_SPEC): the requirement, default torch==2.13.0.
# A .venv that already has torch keeps it. pyproject.toml keeps torch>=2.3 open, so the package
# install never replaces the torch chosen here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
INDEX=${GAS_TORCH_INDEX_URL:-}
SPEC=${GAS_TORCH_SPEC:-torch==2.13.0}
while [ $# -gt 0 ]; do
  case "$1" in
    --torch-index) INDEX=${2:?--torch-index needs a URL}; shift 2 ;;
    --torch-spec) SPEC=${2:?--torch-spec needs a requirement}; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip
  if [ -n "$INDEX" ]; then
    .venv/bin/pip install -q --index-url "$INDEX" "$SPEC"
  else
    .venv/bin/pip install -q "$SPEC"
  fi
fi
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import gas_core, latency_service, search_client, torch; print('GAS ready, torch', torch.__version__, '(CUDA)' if torch.cuda.is_available() else '(CPU)')"
