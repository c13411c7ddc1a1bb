"""Repeatability: the same keys profiled by two separate jobs on a live service (the second with
``force``), coefficient of variation per key across the two medians, and the within-job spread.

Usage: ``python -m bench.repeatability [--input-size 256 512] [--timing context|isolated]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import write_result
from gas_core.search_space import NetworkLayout
from latency_service.testing import QUICK_TIMING, start_server, stop_server, wait_job

TIMING = {"GAS_SAMPLES": "30", "GAS_WARMUP_RUNS": "10", "GAS_WARMUP_MS": "50", "GAS_MIN_SAMPLE_MS": "1",
          "GAS_CPU_THREADS": "0"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 512))
    ap.add_argument("--timing", choices=["context", "isolated"], default="context")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    body = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": list(args.input_size)}
    env = {**TIMING, "GAS_TIMING_CONTEXT": str(args.timing == "context").lower()}
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(f"sqlite:///{tmp}/rep.db", Path(tmp), {**QUICK_TIMING, **env})
        try:
            tables = []
            with srv.client(timeout=600) as c:
                host = c.get("/device").json()
                for force in (False, True):
                    job = wait_job(c, c.post("/profile", json={**body, "force": force}).json()["id"], timeout=3600)
                    assert job["state"] == "done" and job["skipped"] == 0, job
                    t = c.get(f"/table/{host['device']['slug']}",
                              params={"environment": host["environment"]["fingerprint"]}).json()
                    tables.append({e["key"]: e for e in t["entries"]})
        finally:
            stop_server(srv)
    rows = []
    below = []  # keys whose cost is under the timing resolution (identity skip): no CV to speak of
    for key, a in tables[0].items():
        b = tables[1][key]
        pair = [a["median_us"], b["median_us"]]
        if min(pair + [a["mean_us"], b["mean_us"]]) <= 0.5:
            below.append(key)
            continue
        cv = statistics.stdev(pair) / statistics.fmean(pair) * 100
        rows.append({"key": key, "op": a["op"], "median_us": pair, "cv_pct": cv,
                     "within_job_cv_pct": [a["std_us"] / a["mean_us"] * 100, b["std_us"] / b["mean_us"] * 100]})
    cvs = sorted(r["cv_pct"] for r in rows)
    within = [w for r in rows for w in r["within_job_cv_pct"]]
    worst = max(rows, key=lambda r: r["cv_pct"])
    res = {"keys": len(rows), "median_cv_pct": statistics.median(cvs), "p90_cv_pct": cvs[int(0.9 * (len(cvs) - 1))],
           "worst_cv_pct": worst["cv_pct"], "worst_key": worst["key"],
           "median_within_job_cv_pct": statistics.median(within), "below_resolution_keys": below}
    print(f"{len(rows)} keys on {host['device']['slug']} ({args.timing} timing): across-job CV median "
          f"{res['median_cv_pct']:.2f} %, p90 {res['p90_cv_pct']:.2f} %, worst {res['worst_cv_pct']:.2f} % "
          f"({worst['key']}); within-job sample CV median {res['median_within_job_cv_pct']:.2f} %; "
          f"{len(below)} keys under 0.5 µs left out")
    write_result("repeatability", {"config": {"input_size": args.input_size, "timing": args.timing, **TIMING},
                                   "device": host["device"], "environment": host["environment"], "results": res,
                                   "per_key": rows}, args.out)


if __name__ == "__main__":
    main()
