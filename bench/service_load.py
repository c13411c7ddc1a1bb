"""Service load: 64 concurrent clients on loopback for a bounded time, mixing full table reads,
ETag revalidations and profile requests while a profiling job runs, on SQLite and on PostgreSQL
(a throwaway cluster). Throughput, p50/p99, errors, and rows after the job (none lost).

The baseline is the same server software (uvicorn, as ``gas-service serve`` runs it) answering
the same path with the same bytes as a static response (``bench/static_server.py``), loaded the
same way in the same run: the ratio of the two throughputs is the service's overhead.
Targets (issue 13): throughput within 2× of static, p99 ≤ 5 × p50. Client, server and the
profiling job share this host's cores, so absolute figures are a floor for a dedicated server.
Usage: ``python -m bench.service_load [--clients 64] [--seconds 10] [--backends sqlite postgres]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import write_result
from gas_core.search_space import NetworkLayout, cell_shapes
from tests.support import PgCluster, free_port, pg_bin, start_server, stop_server, wait_job

TABLE = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": [256, 512]}
"""The served table: every key of the default layout at 256×512 (58 rows, ~40 KB of JSON)."""
JOB = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": [128, 256], "batches": [1, 2]}
"""The job that runs during the load (other keys, so the served table stays the same size)."""
MIX = (("read", 0.6), ("revalidate", 0.3), ("profile", 0.1))


async def load(url: str, path: str, clients: int, seconds: float, mix: tuple, etag: str | None,
               profile_body: dict | None, seed: int = 0) -> dict:
    """``clients`` loops, each drawing its next request from ``mix``, until ``seconds`` pass."""
    lat: dict[str, list[float]] = {kind: [] for kind, _ in mix}
    errors: list[str] = []
    rng = random.Random(seed)
    kinds, weights = zip(*mix, strict=True)
    stop = time.perf_counter() + seconds

    async def one(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.perf_counter()
            try:
                if kind == "profile":
                    r = await client.post("/profile", json=profile_body)
                    ok = r.status_code in (200, 202)
                elif kind == "revalidate":
                    r = await client.get(path, headers={"If-None-Match": etag or "*"})
                    ok = r.status_code in (200, 304)
                else:
                    r = await client.get(path)
                    ok = r.status_code == 200 and len(r.content) > 0
                problem = f"{kind}: {r.status_code} {r.text[:200]}"
            except httpx.HTTPError as err:  # a dropped connection is an error response too
                ok, problem = False, f"{kind}: {type(err).__name__}: {err}"
            lat[kind].append((time.perf_counter() - t0) * 1e3)
            if not ok:
                errors.append(problem)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    every = [x for xs in lat.values() for x in xs]
    q = statistics.quantiles(every, n=100)
    return {"requests": len(every), "errors": len(errors), "error_samples": errors[:5], "elapsed_s": elapsed,
            "rps": len(every) / elapsed, "p50_ms": q[49], "p99_ms": q[98],
            "by_kind": {k: {"requests": len(v), "p50_ms": statistics.median(v) if v else None} for k, v in lat.items()}}


def capture(srv_url: str, path: str, out: Path) -> str:
    """The service's table response, plain and gzip, for the static baseline; returns its ETag."""
    out.mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=srv_url) as c:
        plain = c.get(path, headers={"Accept-Encoding": "identity"})
        gz = c.get(path, headers={"Accept-Encoding": "gzip"})
        raw = c.stream("GET", path, headers={"Accept-Encoding": "gzip"})
        with raw as r:
            gz_bytes = b"".join(r.iter_raw())
    assert gz.content == plain.content, "gzip and plain responses differ"
    (out / "body").write_bytes(plain.content)
    (out / "body.gz").write_bytes(gz_bytes)
    (out / "media").write_text(plain.headers["content-type"])
    (out / "etag").write_text(plain.headers["etag"])
    return plain.headers["etag"]


def static_baseline(capture_dir: Path, path: str, args: argparse.Namespace, etag: str) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.static_server", "--port", str(port), "--capture",
                             str(capture_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        mix = (("read", 0.6), ("revalidate", 0.3), ("read", 0.1))  # static has no /profile: reads instead
        return asyncio.run(load(url, path, args.clients, args.seconds, mix, etag, None))
    finally:
        proc.terminate()
        proc.wait(10)


def run_backend(name: str, db_url: str, tmp: Path, args: argparse.Namespace) -> dict:
    srv = start_server(db_url, tmp)
    try:
        with srv.client() as c:
            wait_job(c, c.post("/profile", json=TABLE).json()["id"], timeout=1800)
            host = c.get("/device").json()
            slug, env = host["device"]["slug"], host["environment"]["fingerprint"]
            path = f"/table/{slug}?environment={env}&batch=1&memory_format=contiguous&dtype=float32"
            rows_before = len(c.get(f"/table/{slug}", params={"environment": env}).json()["entries"])
            job_keys = {k.canonical for b in JOB["batches"] for k in cell_shapes(
                NetworkLayout(), tuple(JOB["input_size"]), b).all_keys()}  # type: ignore[arg-type]
            job = c.post("/profile", json=JOB).json()
        etag = capture(srv.url, path, tmp / f"capture-{name}")
        static = static_baseline(tmp / f"capture-{name}", path, args, etag)
        mixed = asyncio.run(load(srv.url, path, args.clients, args.seconds, MIX, etag, JOB))
        with srv.client() as c:
            running_during = c.get(f"/jobs/{job['id']}").json()
            finished = wait_job(c, job["id"], timeout=3600)
            rows_after = len(c.get(f"/table/{slug}", params={"environment": env}).json()["entries"])
        expected = rows_before + len(job_keys)  # the job's keys are new (another input size)
        res = {"backend": name, "table_bytes": len((tmp / f"capture-{name}" / "body").read_bytes()),
               "static": static, "service": mixed, "throughput_ratio_static_over_service": static["rps"] / mixed["rps"],
               "p99_over_p50": mixed["p99_ms"] / mixed["p50_ms"], "job_done_at_end_of_load": running_during["done"],
               "job_total": finished["total"], "job_state": finished["state"], "rows_before": rows_before,
               "rows_after": rows_after, "rows_expected": expected, "rows_lost": expected - rows_after}
        print(f"{name:>9}: static {static['rps']:.0f} req/s (p50 {static['p50_ms']:.0f}, p99 {static['p99_ms']:.0f} ms) | "
              f"service {mixed['rps']:.0f} req/s (p50 {mixed['p50_ms']:.0f}, p99 {mixed['p99_ms']:.0f} ms), "
              f"{mixed['errors']} errors | ratio {res['throughput_ratio_static_over_service']:.2f}×, "
              f"p99/p50 {res['p99_over_p50']:.1f} | job {running_during['done']}/{finished['total']} keys during "
              f"the load, rows {rows_after}/{expected}")
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
    write_result("service_load", {"config": vars(args) | {"out": None, "mix": MIX}, "results": rows}, args.out)


if __name__ == "__main__":
    main()
