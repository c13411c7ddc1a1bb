#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: lint (ruff), types (mypy), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -q --durations=30 "$@"
