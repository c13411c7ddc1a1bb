"""Helpers shared by the benchmarks: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from gas_core.latency import LatencyTerm, work_table
from gas_core.search_space import NetworkLayout, cell_shapes

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, payload: dict, out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2))
    print(f"wrote {path}")
    return path


def stand_in_term(layout: NetworkLayout, hw: tuple[int, int]) -> LatencyTerm:
    """A latency term from :func:`gas_core.latency.work_table` (µs ∝ work): a search step's cost
    does not depend on the table's values, and every rank builds the same one."""
    shapes = cell_shapes(layout, hw)
    return LatencyTerm.from_table(shapes, work_table(shapes))
