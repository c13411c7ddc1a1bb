"""Per op, how much a runtime changes each component's time on this host: the tables two (or
more) ``bench.prediction_accuracy --runtime R`` runs profiled (isolated unless ``--table
context``), matched key by key without the runtime part, as ``gas-table compare --runtime-b``
does on a live service. Prints the per-op geometric-mean ratio runtime / eager (< 1: faster than
eager) with its range, beside each runtime's prediction accuracy, and writes JSON.

    python -m bench.runtime_ops bench/results/runtimes/prediction_accuracy_{eager,onnxruntime}.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import write_result
from gas_core.keys import without_runtime
from gas_core.table import compare_tables


def _ops_table(path: Path, which: str) -> tuple[str, dict[str, tuple[str, float]]]:
    """(runtime, {key without runtime: (op, median µs)}) of a run's ``isolated`` or primary
    (context) table."""
    run = json.loads(path.read_text())
    table = run["tables"]["isolated" if which == "isolated" else run["config"]["primary_table"]]
    return run["config"].get("runtime", "eager"), {without_runtime(k): (k.split("|", 1)[0], us)
                                                   for k, us in table.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="prediction_accuracy JSONs; the first is the reference")
    ap.add_argument("--table", choices=["isolated", "context"], default="isolated",
                    help="which of each run's tables: keys timed back to back, or after the context of other "
                    "kernels (eager kernels: it distorts onnxruntime and torch_compile keys, whose own threads "
                    "and caches the eager context disturbs)")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/runtime_ops.json)")
    args = ap.parse_args()
    ref_name, ref = _ops_table(args.runs[0], args.table)
    out: dict[str, dict] = {}
    for path in args.runs[1:]:
        name, table = _ops_table(path, args.table)
        cmp = compare_tables(ref, table)
        acc = json.loads(path.read_text())["results"]
        out[name] = {"common_keys": cmp.common_keys, "geomean_ratio": cmp.geomean_ratio, "kendall": cmp.kendall,
                     "per_op": {op: s.model_dump() for op, s in cmp.per_op.items()}, "accuracy": acc}
        tau = "n/a" if cmp.kendall is None else f"{cmp.kendall:.3f}"
        geo = "n/a" if cmp.geomean_ratio is None else f"{cmp.geomean_ratio:.3f}"
        print(f"{name} / {ref_name}: {cmp.common_keys} keys, geomean {geo}, Kendall τ of the keys' latencies {tau}")
        for op, s in cmp.per_op.items():
            print(f"  {op:<22} {s.keys:3d} keys  geomean {s.geomean_ratio or float('nan'):6.3f}  "
                  f"range {s.min_ratio or float('nan'):.3f}–{s.max_ratio or float('nan'):.3f}")
    write_result("runtime_ops", {"reference": ref_name, "table": args.table, "runs": [str(p) for p in args.runs],
                                 "results": out},
                 args.out)


if __name__ == "__main__":
    main()
