"""Two tables of this host compared end to end through the fleet tooling: the default layout's
keys profiled with 1 and with 2 torch threads (two environments of one device, each by its own
service process, one after the other so they never time at the same time), then ``gas-table
compare`` against a third process serving the shared database — the printed summary, its JSON
and its PNG (per-op ratio bars, log–log scatter). On GPUs the same command compares devices.

Usage: ``python -m bench.compare_envs [--input-size 256 512]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from bench.common import RESULTS, write_result
from gas_core.search_space import NetworkLayout
from latency_service.testing import QUICK_TIMING, start_server, stop_server, wait_job
from search_client.table_cli import app

TIMING = {"GAS_SAMPLES": "30", "GAS_WARMUP_RUNS": "10", "GAS_WARMUP_MS": "50", "GAS_MIN_SAMPLE_MS": "1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 512))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=RESULTS / "compare_envs.png")
    args = ap.parse_args()
    body = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": list(args.input_size)}
    refs = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/fleet.db"
        for threads in (1, 2):
            srv = start_server(url, Path(tmp), {**QUICK_TIMING, **TIMING, "GAS_CPU_THREADS": str(threads)})
            try:
                with srv.client(timeout=600) as c:
                    host = c.get("/device").json()
                    job = wait_job(c, c.post("/profile", json=body).json()["id"], timeout=3600)
                    assert job["state"] == "done", job
                refs.append(f"{host['device']['slug']}@{host['environment']['fingerprint']}")
                print(f"profiled {job['total']} keys with {threads} thread(s): {refs[-1]}")
            finally:
                stop_server(srv)
        srv = start_server(url, Path(tmp), QUICK_TIMING)
        try:
            js = Path(tmp) / "compare.json"
            r = CliRunner().invoke(app, ["compare", *refs, "--latency-url", srv.url, "--plot", str(args.plot),
                                         "--json", str(js)])
            print(r.output)
            if r.exit_code != 0:
                raise SystemExit(r.exit_code)
            result = json.loads(js.read_text())
        finally:
            stop_server(srv)
    pair = result["pairs"][0]
    write_result("compare_envs", {
        "config": {"input_size": args.input_size, **TIMING}, "a": refs[0] + " (1 thread)",
        "b": refs[1] + " (2 threads)",
        "results": {k: pair[k] for k in ("common_keys", "only_a", "only_b", "geomean_ratio", "spearman", "kendall",
                                         "per_op")},
        "keys": pair["keys"],
    }, args.out)


if __name__ == "__main__":
    main()
