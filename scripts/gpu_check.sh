#!/usr/bin/env bash
# Run every CUDA path of GAS on this host's GPU(s) and write the figures as JSON under
# bench/results/gpu/ (summary.json, rewritten after every step), with a printed summary. Every
# step took 270 s on one H200 with --accuracy 12 6 3 (the default 20 12 3 takes about a minute more),
# before the runtimes step, which adds at most --runtimes-budget-s (300 s; not yet run on a GPU).
#
#   scripts/gpu_check.sh [--wheels DIR] [--quick] [any flag of python -m bench.gpu_check]
#   scripts/gpu_check.sh --download-wheels DIR     # on a connected machine: fill DIR for --wheels
#
# Uses the Python that already has the host's CUDA build of torch ($PYTHON, default python3);
# it never installs or replaces torch. The project's other dependencies are installed into that
# Python unless they are already importable: from the package index, or with --wheels DIR from a
# local wheel directory and no index at all (GPU clusters without internet). --download-wheels
# DIR fetches every dependency but torch into DIR; run it with the cluster's Python version.
# Without a GPU it says so and exits 0. CI does not call it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
    --wheels=*) WHEELS=${1#--wheels=}; shift ;;
    --download-wheels)
      DEST=${2:?--download-wheels needs a directory}
      "$PY" - "$DEST" <<'PYEOF'
import subprocess, sys, tomllib
deps = [d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not d.startswith("torch")]
subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", sys.argv[1], *deps, "setuptools>=68", "wheel"],
               check=True)
print(f"wheels for {len(deps)} dependencies (and theirs) in {sys.argv[1]}; copy it to the GPU host and run "
      f"scripts/gpu_check.sh --wheels {sys.argv[1]}")
PYEOF
      exit 0 ;;
    -h|--help) sed -n '2,15p' "$0"; exec "$PY" -m bench.gpu_check --help ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if ! "$PY" -c "import torch" 2>/dev/null; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no GPU here (no nvidia-smi, and $PY has no torch); nothing to check. Exiting 0."; exit 0
  fi
  echo "gpu_check: $PY has no torch; install your CUDA build of torch (>=2.3) first, or set PYTHON" >&2; exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA device is visible to $("$PY" -c 'import torch; print("torch", torch.__version__)'); nothing to check. Exiting 0."
  exit 0
fi
if ! "$PY" -c "import fastapi, uvicorn, sqlalchemy, alembic, pydantic_settings, typer, httpx, pynvml, matplotlib, PIL, tqdm, rich" 2>/dev/null; then
  if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || { echo "gpu_check: --wheels $WHEELS is not a directory" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e . \
      || { echo "gpu_check: installing from $WHEELS failed (a wheel is missing?)" >&2; exit 2; }
  else
    "$PY" -m pip install -q -e .
  fi
fi
"$PY" -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0), '×', torch.cuda.device_count())"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bench.gpu_check "${ARGS[@]}"
