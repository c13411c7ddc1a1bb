"""Does planning large ``/profile`` bodies stall the service? ``/health`` latency while idle,
then while clients keep sending distinct bodies of the largest size a job may have
(``GAS_MAX_KEYS_PER_JOB``). ``GAS_MAX_QUEUED_KEYS=1`` makes the service plan each body in full
and then refuse it (503), so nothing is timed and the load is planning alone.

The probe that found the stall: 6 bodies of 19,836 keys raised /health's p50 from 10 ms to 403 ms.
Now a body is at most 5,000 keys, planned on a worker thread, one at a time.

``python -m bench.planning_stall [--seconds 10] [--clients 6]``
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import write_result
from gas_core.quality import quantile
from gas_core.search_space import NetworkLayout
from latency_service.testing import local_service


def health_latencies(url: str, seconds: float) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            c.get("/health")
            out.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.02)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": quantile(ms, 0.5), "p99_ms": quantile(ms, 0.99), "max_ms": max(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    layout = NetworkLayout().model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp, local_service(
            f"sqlite:///{tmp}/p.db", Path(tmp), {"GAS_MAX_QUEUED_KEYS": "1", "GAS_DEVICE": "cpu"}) as url:
        idle = health_latencies(url, args.seconds)
        stop, sent = threading.Event(), [0]
        codes: dict[int, int] = {}

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                n = 0
                while not stop.is_set():
                    # 58 keys × 43 batches × 2 formats = 4,988 keys, a new input size each time: never cached
                    body = {"layout": layout, "input_size": [64 + 8 * i, 128 + 8 * n], "batches": list(range(1, 44)),
                            "memory_formats": ["contiguous", "channels_last"]}
                    r = c.post("/profile", json=body)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    sent[0] += 1
                    n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        loaded = health_latencies(url, args.seconds)
        stop.set()
        for t in threads:
            t.join()
    res = {"idle": summary(idle), "planning": summary(loaded), "bodies_planned": sent[0], "answers": codes,
           "clients": args.clients, "seconds": args.seconds}
    print(f"/health idle:     p50 {res['idle']['p50_ms']:.1f} ms, p99 {res['idle']['p99_ms']:.1f} ms")
    print(f"/health planning: p50 {res['planning']['p50_ms']:.1f} ms, p99 {res['planning']['p99_ms']:.1f} ms "
          f"({sent[0]} bodies of ~5,000 keys from {args.clients} clients; answers {codes})")
    write_result("planning_stall", res, args.out)


if __name__ == "__main__":
    main()
