#!/usr/bin/env bash
# The GAS demo, end to end on this host:
#   set up → start the latency service on embedded SQLite (free loopback port) → gas-search
#   profiles this host's missing keys through it, searches on the synthetic data, derives the
#   network → the service times it end to end (POST /measure) → predicted vs measured → stop.
# Outputs land in demo_out/ (genotype.json, report.json, search_log.csv, alpha.png, history.png).
# Demo scale: the paper's α learning rate (Adam 1e-3) needs thousands of steps to move α; this
# demo has ~100, so α learns at 0.1 and the GCN's weights at 0.001 (a GCN that fast drowns α and
# makes every edge of a cell pick the same op). Everything else is the paper's.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
OUT=${GAS_DEMO_OUT:-demo_out}
mkdir -p "$OUT"
PORT=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL="http://127.0.0.1:$PORT"
case "$OUT" in  # GAS_DEMO_OUT may be absolute
  /*) DB="$OUT/gas.db" ;;
  *) DB="$PWD/$OUT/gas.db" ;;
esac
export GAS_DATABASE_URL="sqlite:///$DB"
.venv/bin/gas-service serve --host 127.0.0.1 --port "$PORT" >"$OUT/service.log" 2>&1 &
SERVICE=$!
trap 'kill $SERVICE 2>/dev/null; wait $SERVICE 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if .venv/bin/python -c "import httpx,sys; sys.exit(httpx.get('$URL/health').status_code != 200)" 2>/dev/null; then break; fi
  kill -0 $SERVICE 2>/dev/null || { cat "$OUT/service.log"; exit 1; }
  sleep 0.5
done
echo "latency service on $URL (SQLite $OUT/gas.db, log $OUT/service.log)"
.venv/bin/gas-search --latency-url "$URL" --dataset synthetic --synthetic-size 128 16 \
  --input-size 96 192 --warmup-epochs 3 --epochs "${GAS_DEMO_EPOCHS:-6}" --batch 8 --beta 0.005 --seed 0 \
  --lr-a 0.1 --lr-ggm 0.001 --out "$OUT" "$@"
