"""Profiling cost: wall time of a full table for a layout against the time the timed ops
themselves ran (the rest is warm-up, n-estimation, the timing context when enabled, module
construction and the database).

Runs the service's own path (``Host`` + device worker) on a fresh SQLite file, no HTTP.
Usage: ``python -m bench.profile_cost [--input-size 256 512] [--batch 1]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from bench.common import write_result
from gas_core.search_space import NetworkLayout
from gas_core.wire import ProfileRequest
from latency_service import job_state
from latency_service.core.config import Settings
from latency_service.models import Measurement
from latency_service.service import Host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 512))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(database_url=f"sqlite:///{tmp}/cost.db", device=args.device)
        host = Host.start(settings, run_worker=False)
        req = ProfileRequest(layout=NetworkLayout(), input_size=tuple(args.input_size), batches=[args.batch])
        t0 = time.perf_counter()
        job, _ = host.submit_profile(req)
        host.worker.start()
        while True:
            with host.sessions() as s:
                cur = job_state.get(s, job_id=job.id)
            if cur is not None and cur.state not in ("queued", "running"):
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        with host.sessions() as s:
            rows = s.scalars(select(Measurement)).all()
            # time the timed ops themselves ran (with context timing, the context's share of the
            # timed regions is not in the rows and counts as overhead here)
            timed = sum(r.mean_us * r.n_samples * r.iters_per_sample for r in rows) / 1e6
            per_op: dict[str, float] = {}
            for r in rows:
                per_op[r.op] = per_op.get(r.op, 0.0) + r.mean_us * r.n_samples * r.iters_per_sample / 1e6
        host.close()
    print(f"{len(rows)} keys at {args.input_size[0]}×{args.input_size[1]} batch {args.batch} on {host.device.slug}")
    print(f"wall {wall:.2f} s, of which the timed ops themselves ran {timed:.2f} s ({timed / wall:.1%}), "
          f"{wall / len(rows) * 1e3:.0f} ms per key")
    write_result("profile_cost", {
        "config": {"input_size": args.input_size, "batch": args.batch, "device": host.device.slug,
                   "method": {"samples": settings.samples, "warmup_runs": settings.warmup_runs,
                              "warmup_ms": settings.warmup_ms, "min_sample_ms": settings.min_sample_ms}},
        "keys": len(rows), "job_state": cur.state, "wall_s": wall, "op_time_s": timed, "op_time_fraction": timed / wall,
        "timing": "context" if settings.context_timing(host.torch_device.type) else "isolated",
        "ms_per_key": wall / len(rows) * 1e3, "timed_s_per_op": per_op,
    }, args.out)


if __name__ == "__main__":
    main()
