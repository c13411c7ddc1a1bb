#!/usr/bin/env bash
# The CamVid study's GPU stage (--scale gpu: 360×480, longer schedules, ≥ 5 random nets of each
# kind, Figure 5 variants trained): one sitting of at most BUDGET_MIN minutes (default 8) on one
# GPU, resumable — run it again, on this host or on another after carrying the results back.
#
#   python -m bench.camvid_study --make-gpu-data data/camvid_gpu --data-root /path/to/camvid   # once, 25 MiB
#   CAMVID_GPU=data/camvid_gpu scripts/camvid_gpu.sh
#
# The data copy is CamVid train + val with the images re-encoded as JPEG (quality 90) and the
# labels as they are (lossless PNG): small enough to ship with the code. It is research-use data:
# data/ is git-ignored; never commit it. Results go to bench/results/camvid_gpu/ (runs/, nets/,
# report.md); its work/ (checkpoints of unfinished runs, the SQLite table) is what a next sitting
# needs besides. With $OUT set (the device tool), the whole folder is copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
DATA=${CAMVID_GPU:-data/camvid_gpu}
RES=bench/results/camvid_gpu
"$PY" -m bench.camvid_study --scale gpu --data-root "$DATA" --out "$RES" --budget-min "${BUDGET_MIN:-8}" --quiet
if [ -n "${OUT:-}" ]; then
  cp -r "$RES" "$OUT/"
fi
