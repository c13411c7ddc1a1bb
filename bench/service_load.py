"""Service load: ``GET /table/{device}`` of a full table from 64 concurrent clients on loopback
for a bounded time, on SQLite and on PostgreSQL (a throwaway cluster). Throughput and p50/p99.

The table is real: the server profiles the default layout at 256×512 for batches 1, 2, 4, 8 and
both memory formats (fast timing settings) before the load starts. Client and server share this
host's cores, so figures are a floor for a dedicated server.
Usage: ``python -m bench.service_load [--clients 64] [--seconds 10] [--backends sqlite postgres]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import write_result
from gas_core.search_space import NetworkLayout
from tests.support import PgCluster, pg_bin, start_server, stop_server, wait_job


async def load(url: str, path: str, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = 0
    nbytes = 0
    stop = time.perf_counter() + seconds

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal errors, nbytes
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await client.get(path)
            lat.append((time.perf_counter() - t0) * 1e3)
            if r.status_code != 200:
                errors += 1
            nbytes = len(r.content)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100)
    return {"requests": len(lat), "errors": errors, "elapsed_s": elapsed, "rps": len(lat) / elapsed,
            "p50_ms": q[49], "p99_ms": q[98], "body_bytes": nbytes}


def run_backend(name: str, url: str, tmp: Path, args: argparse.Namespace) -> dict:
    srv = start_server(url, tmp)
    try:
        with srv.client() as c:
            body = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": [256, 512],
                    "batches": [1, 2, 4, 8], "memory_formats": ["contiguous", "channels_last"]}
            job = wait_job(c, c.post("/profile", json=body).json()["id"], timeout=1800)
            slug = c.get("/device").json()["device"]["slug"]
        res = asyncio.run(load(srv.url, f"/table/{slug}", args.clients, args.seconds))
        res.update(backend=name, entries=job["total"])
        print(f"{name:>9}: {job['total']} entries ({res['body_bytes'] / 1024:.0f} KiB), {res['rps']:.1f} req/s, "
              f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, {res['errors']} errors")
        return res
    finally:
        stop_server(srv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            if backend == "sqlite":
                rows.append(run_backend("sqlite", f"sqlite:///{tmp}/load.db", Path(tmp), args))
            else:
                bindir = pg_bin()
                if bindir is None:
                    print("postgres: server binaries not found, skipped")
                    continue
                cluster = PgCluster(bindir).start()
                try:
                    rows.append(run_backend("postgres", cluster.create_db(), Path(tmp), args))
                finally:
                    cluster.stop()
    write_result("service_load", {"config": vars(args) | {"out": None}, "results": rows}, args.out)


if __name__ == "__main__":
    main()
