"""Service load: 64 concurrent clients on loopback for a bounded time, mixing full table reads,
ETag revalidations and profile requests while a profiling job runs, on SQLite and on PostgreSQL
(a throwaway cluster). Throughput, p50/p99, errors, and rows after the job (none lost).

The baseline is the same server software (uvicorn, as ``gas-service serve`` runs it) answering
the same path with the same bytes as a static response (``bench/static_server.py``), loaded the
same way in the same run: the ratio of the two throughputs is the service's overhead.
Targets (issue 13): throughput within 2× of static, p99 ≤ 5 × p50. Client, server and the
profiling job share this host's cores, so absolute figures are a floor for a dedicated server.
The client is a lean keep-alive HTTP/1.1 generator (``RawHTTP``); ``--client httpx`` shows what
httpx's AsyncClient measures instead.
Usage: ``python -m bench.service_load [--clients 64] [--seconds 10] [--backends sqlite postgres] [--client raw]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from bench.common import write_result
from gas_core.quality import quantile
from gas_core.search_space import NetworkLayout, cell_shapes
from latency_service.testing import QUICK_TIMING, PgCluster, free_port, pg_bin, start_server, stop_server, wait_job

TABLE = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": [256, 512]}
"""The served table: every key of the default layout at 256×512 (58 rows, ~40 KB of JSON)."""
JOB = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": [128, 256],
       "batches": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]}
"""The job that runs during the load: other keys (its batch-1 rows join the served table as they
are timed, so reads see a table that changes), long enough to outlast both load phases."""
MIX = (("read", 0.6), ("revalidate", 0.3), ("profile", 0.1))


class RawHTTP:
    """One keep-alive HTTP/1.1 connection over asyncio streams: what a lean load generator (wrk,
    hey) does, so the client is not the bottleneck. httpx's AsyncClient was: on a 2-core host it
    topped out near 200 requests/s against a static server that serves ~2500, and its own
    scheduling put p99 at 11–14 × p50 whatever the server (docs/performance.md)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes | None = None,
                      ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}", *(f"{k}: {v}" for k, v in headers.items())]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        try:
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
            await self.writer.drain()
            status, head = await self._head()
            payload = await self._body(status, head)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()  # a dropped connection: the next request opens a new one
            raise
        if head.get("connection") == "close":
            await self.close()
        return status, payload

    async def _head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        first, *rest = raw.decode("latin-1").split("\r\n")
        head = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in rest if line)}
        return int(first.split(" ", 2)[1]), head

    async def _body(self, status: int, head: dict[str, str]) -> bytes:
        assert self.reader is not None
        if status in (204, 304) or status < 200:
            return b""
        if "content-length" in head:
            return await self.reader.readexactly(int(head["content-length"]))
        if head.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                out += await self.reader.readexactly(size)
                await self.reader.readuntil(b"\r\n")
            await self.reader.readuntil(b"\r\n")
            return out
        return await self.reader.read()  # no length: the body ends with the connection

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(url: str, path: str, clients: int, seconds: float, mix: tuple, etag: str | None,
               profile_body: dict | None, seed: int = 0, client: str = "raw") -> dict:
    """``clients`` loops, each on its own keep-alive connection, drawing its next request from
    ``mix`` until ``seconds`` pass. ``client="httpx"`` uses httpx's AsyncClient instead (for
    comparison: it measures the client more than the server)."""
    lat: dict[str, list[float]] = {kind: [] for kind, _ in mix}
    errors: list[str] = []
    rng = random.Random(seed)
    kinds, weights = zip(*mix, strict=True)
    stop = time.perf_counter() + seconds
    body = json.dumps(profile_body).encode() if profile_body is not None else None
    gzip_ok = {"Accept-Encoding": "gzip"}

    async def one(send: Callable[[str, dict[str, str], bytes | None], Awaitable[tuple[int, bytes]]]) -> None:
        while time.perf_counter() < stop:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.perf_counter()
            try:
                if kind == "profile":
                    code, payload = await send("/profile", {}, body)
                    ok = code in (200, 202)
                elif kind == "revalidate":
                    code, payload = await send(path, {**gzip_ok, "If-None-Match": etag or "*"}, None)
                    ok = code in (200, 304)
                else:
                    code, payload = await send(path, gzip_ok, None)
                    ok = code == 200 and len(payload) > 0
                problem = f"{kind}: {code} {payload[:200]!r}"
            except (OSError, asyncio.IncompleteReadError, ValueError, httpx.HTTPError) as err:
                ok, problem = False, f"{kind}: {type(err).__name__}: {err}"  # a dropped connection is an error too
            lat[kind].append((time.perf_counter() - t0) * 1e3)
            if not ok:
                errors.append(problem)

    t0 = time.perf_counter()
    if client == "raw":
        conns = [RawHTTP(url) for _ in range(clients)]

        def raw_send(conn: RawHTTP) -> Callable[[str, dict[str, str], bytes | None], Awaitable[tuple[int, bytes]]]:
            return lambda target, headers, data: conn.request("POST" if data is not None else "GET", target, headers, data)

        await asyncio.gather(*(one(raw_send(c)) for c in conns))
        for c in conns:
            await c.close()
    else:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as hc:
            async def httpx_send(target: str, headers: dict[str, str], data: bytes | None) -> tuple[int, bytes]:
                r = await (hc.post(target, content=data, headers={"Content-Type": "application/json"})
                           if data is not None else hc.get(target, headers=headers))
                return r.status_code, r.content

            await asyncio.gather(*(one(httpx_send) for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    every = [x for xs in lat.values() for x in xs]
    return {"requests": len(every), "errors": len(errors), "error_samples": errors[:5], "elapsed_s": elapsed,
            "rps": len(every) / elapsed, "p50_ms": quantile(every, 0.5), "p99_ms": quantile(every, 0.99),
            "by_kind": {k: {"requests": len(v), "p50_ms": quantile(v, 0.5) if v else None,
                            "p99_ms": quantile(v, 0.99) if len(v) > 1 else None}
                        for k, v in lat.items()}}


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
        return asyncio.run(load(url, path, args.clients, args.seconds, mix, etag, None, client=args.client))
    finally:
        proc.terminate()
        proc.wait(10)


def run_backend(name: str, db_url: str, tmp: Path, args: argparse.Namespace) -> dict:
    srv = start_server(db_url, tmp, QUICK_TIMING)
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
        with srv.client() as c:
            done_before = c.get(f"/jobs/{job['id']}").json()["done"]
        mixed = asyncio.run(load(srv.url, path, args.clients, args.seconds, MIX, etag, JOB, client=args.client))
        with srv.client() as c:
            running_during = c.get(f"/jobs/{job['id']}").json()
            finished = wait_job(c, job["id"], timeout=3600)
            rows_after = len(c.get(f"/table/{slug}", params={"environment": env}).json()["entries"])
        expected = rows_before + len(job_keys)  # the job's keys are new (another input size)
        res = {"backend": name, "table_bytes": len((tmp / f"capture-{name}" / "body").read_bytes()),
               "static": static, "service": mixed, "throughput_ratio_static_over_service": static["rps"] / mixed["rps"],
               "p99_over_p50": mixed["p99_ms"] / mixed["p50_ms"], "job_done_at_start_of_load": done_before,
               "job_done_at_end_of_load": running_during["done"],
               "job_ran_throughout": running_during["state"] == "running",
               "job_total": finished["total"], "job_state": finished["state"], "rows_before": rows_before,
               "rows_after": rows_after, "rows_expected": expected, "rows_lost": expected - rows_after}
        print(f"{name:>9}: static {static['rps']:.0f} req/s (p50 {static['p50_ms']:.0f}, p99 {static['p99_ms']:.0f} ms) | "
              f"service {mixed['rps']:.0f} req/s (p50 {mixed['p50_ms']:.0f}, p99 {mixed['p99_ms']:.0f} ms), "
              f"{mixed['errors']} errors | ratio {res['throughput_ratio_static_over_service']:.2f}×, "
              f"p99/p50 {res['p99_over_p50']:.1f} | job at {done_before}→{running_during['done']}/{finished['total']} "
              f"keys during the load ({'still running' if res['job_ran_throughout'] else 'ENDED during it'}), "
              f"rows {rows_after}/{expected}")
        return res
    finally:
        stop_server(srv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="load generator: raw keep-alive HTTP/1.1 connections (default), or httpx's AsyncClient "
                         "(slower than the server on a small host: it measures itself)")
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
