"""The third hardening round's probe, as figures: what an anonymous huge body, pending bodies, a
big table's query variants and many cancelled jobs cost the service (docs/security.md).

    python -m bench.service_probe3 --out bench/results/service_probe3.json            # this checkout
    python -m bench.service_probe3 --repo /tmp/before --label before --out …           # another checkout

Each step starts a fresh ``gas-service serve`` on SQLite (with ``GAS_API_TOKEN``) from ``--repo``,
so the same script measures the code before and after a change:

* row 1: a 60 MiB anonymous body (``[`` + ``[],`` × 20 M + ``[]]``) to ``POST /profile``: seconds
  to its answer, the HTTP process's peak RSS, and the slowest ``/health`` meanwhile; the same
  body *with* the token (parsed, then refused as not an object);
* row 2: 20 unauthenticated heads (``Content-Length: 1000``, no body) and 20 authorised ones:
  how many connections are still open 5 s and ``--body-wait`` s later;
* row 9: a 10,000-row table with 30 samples a row, read in 64 query variants that each select
  all of it (JSON and CSV, with samples): RSS before and after;
* row 10: ``--jobs`` rounds of queueing a 4,988-key job and cancelling it: the database's size and
  ``GET /jobs?limit=10`` / ``limit=1000`` times (median of 5).

Memory and sizes are what the question is about; the times are a shared VM's (host in the JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine

TOKEN = "probe-token"
PROBE_INFO = {"probe": 3}
PROBE_ENV = __import__("gas_core.table", fromlist=["environment_fingerprint"]).environment_fingerprint(PROBE_INFO)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """``gas-service serve`` of ``repo`` on a fresh SQLite database."""

    def __init__(self, repo: Path, work: Path, env: dict[str, str]) -> None:
        self.port, self.db = free_port(), work / "probe.db"
        self.db.unlink(missing_ok=True)
        full = {**os.environ, "PYTHONPATH": str(repo), "GAS_API_TOKEN": TOKEN, "GAS_DEVICE": "cpu",
                "GAS_DATABASE_URL": f"sqlite:///{self.db}", "GAS_CPU_THREADS": "1", "GAS_SAMPLES": "5",
                "GAS_WARMUP_RUNS": "1", "GAS_LOG_LEVEL": "WARNING", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "latency_service.cli", "serve", "--port", str(self.port)],
                                     cwd=repo, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the service did not start")

    def rss_mb(self, peak: bool = False) -> float:
        field = "VmHWM" if peak else "VmRSS"
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def health_watch(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.get("/health")
            out.append(time.perf_counter() - t)
            time.sleep(0.05)


def row1(svc: Service) -> dict[str, Any]:
    body = b"[" + b"[]," * 20_971_519 + b"[]]"
    out: dict[str, Any] = {"body_mib": len(body) / 2**20}
    for label, headers in (("anonymous", {}), ("authorised", AUTH)):
        lat: list[float] = []
        stop = threading.Event()
        watch = threading.Thread(target=health_watch, args=(svc.url, stop, lat))
        watch.start()
        t0 = time.perf_counter()
        try:
            r = httpx.post(svc.url + "/profile", content=body, timeout=300,
                           headers={"Content-Type": "application/json", **headers})
            status = r.status_code
        except httpx.HTTPError as err:
            status = type(err).__name__  # type: ignore[assignment]
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        stop.set()
        watch.join()
        out[label] = {"status": status, "answer_s": round(wall, 3), "peak_rss_mb": round(svc.rss_mb(peak=True), 1),
                      "health_max_s": round(max(lat), 3), "health_calls": len(lat)}
    return out


def row1_import(svc: Service) -> dict[str, Any]:
    """An authorised, valid 40,000-row table (about 20 MiB with its samples) to /table/import: the
    slowest /health while it is decoded and stored."""
    with httpx.Client(base_url=svc.url, timeout=600, headers=AUTH) as c:
        body = json.dumps(big_table(c, 40_000)).encode()
    lat: list[float] = []
    stop = threading.Event()
    watch = threading.Thread(target=health_watch, args=(svc.url, stop, lat))
    watch.start()
    t0 = time.perf_counter()
    r = httpx.post(svc.url + "/table/import", content=body, timeout=600, params={"force": True},
                   headers={"Content-Type": "application/json", **AUTH})
    wall = time.perf_counter() - t0
    time.sleep(0.5)
    stop.set()
    watch.join()
    return {"body_mib": round(len(body) / 2**20, 1), "status": r.status_code, "answer_s": round(wall, 2),
            "health_max_s": round(max(lat), 3), "health_p50_s": round(statistics.median(lat), 4),
            "health_calls": len(lat)}


def row2(svc: Service, wait_s: float) -> dict[str, Any]:
    host, port = "127.0.0.1", svc.port
    socks = {"anonymous": [], "authorised": []}  # type: dict[str, list[socket.socket]]
    for label, auth in (("anonymous", b""), ("authorised", f"Authorization: Bearer {TOKEN}\r\n".encode())):
        for _ in range(20):
            s = socket.create_connection((host, port))
            s.sendall(b"POST /measure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n" + auth + b"\r\n")
            s.setblocking(False)
            socks[label].append(s)

    def still_open(ss: list[socket.socket]) -> int:
        n = 0
        for s in ss:
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
            except BlockingIOError:
                n += 1  # nothing more to read and not closed
            except OSError:
                pass
        return n

    time.sleep(5)
    first = {k: still_open(v) for k, v in socks.items()}
    time.sleep(max(0.0, wait_s - 5))
    later = {k: still_open(v) for k, v in socks.items()}
    for s in itertools.chain(*socks.values()):
        s.close()
    return {"open_after_5s": first, f"open_after_{wait_s:.0f}s": later}


def big_table(c: httpx.Client, rows: int = 10_000) -> dict[str, Any]:
    me = c.get("/device").json()
    from gas_core.keys import LatencyKey
    from gas_core.quality import sample_stats

    now = datetime.now(UTC).isoformat()
    entries = []
    for i in range(rows):
        key = LatencyKey(op="conv_3x3", c_in=8 + i % 100, c_out=8 + i // 40_000, h=16 + i // 100 % 400, w=32,
                         stride=1, batch=1)
        samples = [10.0 + (j % 7) for j in range(30)]
        entries.append({"key": key.canonical, "key_hash": key.key_hash, **key.model_dump(), **sample_stats(samples),
                        "iters_per_sample": 1, "timer": "probe", "created_at": now, "samples_us": samples})
    return {"schema_version": 1, "kind": "gas-latency-table",
            "device": {**{k: me["device"][k] for k in ("kind", "name", "info")}, "slug": "probe-device"},
            "environment": {"fingerprint": PROBE_ENV, "info": PROBE_INFO}, "entries": entries}


def row9(svc: Service) -> dict[str, Any]:
    with httpx.Client(base_url=svc.url, timeout=600, headers=AUTH) as c:
        table = big_table(c)
        r = c.post("/table/import", json=table, params={"force": True})
        if r.status_code != 200:  # the "before" code may want another fingerprint; the figure needs the rows
            return {"import": r.status_code, "message": r.text[:300]}
        before = svc.rss_mb()
        filters = {"dtype": "float32", "batch": 1, "memory_format": "contiguous", "op": "conv_3x3",
                   "runtime": "eager"}
        n = 0
        for fmt in ("json", "csv"):
            for mask in range(32):
                params: dict[str, Any] = {"environment": PROBE_ENV, "samples": True, "format": fmt}
                params.update({k: v for j, (k, v) in enumerate(filters.items()) if mask >> j & 1})
                assert c.get("/table/probe-device", params=params).status_code == 200
                n += 1
        return {"rows": len(table["entries"]), "variants": n, "rss_before_mb": round(before, 1),
                "rss_after_mb": round(svc.rss_mb(), 1)}


def row10(svc: Service, rounds: int) -> dict[str, Any]:
    with httpx.Client(base_url=svc.url, timeout=600, headers=AUTH) as c:
        size0 = svc.db.stat().st_size
        for i in range(rounds):
            body = {"layout": {}, "input_size": [256, 800 + i], "batches": list(range(1, 44)),
                    "memory_formats": ["contiguous", "channels_last"]}
            r = c.post("/profile", json=body)
            if r.status_code not in (200, 202):
                return {"round": i, "status": r.status_code, "message": r.text[:300]}
            c.delete(f"/jobs/{r.json()['id']}")
        times = {}
        for limit in (10, 1000):
            xs = []
            for _ in range(5):
                t = time.perf_counter()
                c.get("/jobs", params={"limit": limit})
                xs.append(time.perf_counter() - t)
            times[f"jobs_limit_{limit}_s"] = round(statistics.median(xs), 4)
        return {"rounds": rounds, "db_mb_before": round(size0 / 2**20, 1),
                "db_mb_after": round(svc.db.stat().st_size / 2**20, 1), **times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path.cwd(), help="checkout whose service is probed")
    ap.add_argument("--label", default="after", help="name of this run in the JSON")
    ap.add_argument("--jobs", type=int, default=160, help="row 10's rounds of queue-and-cancel")
    ap.add_argument("--body-wait", type=float, default=15.0, help="row 2's second look, s (GAS_BODY_TIMEOUT_S is "
                    "set 5 s below it)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/service_probe3.json"))
    ap.add_argument("--steps", nargs="+", default=["row1", "row1_import", "row2", "row9", "row10"],
                    help="which probes to run (a run adds its steps to an existing label)")
    args = ap.parse_args(argv)
    work = Path("/tmp") / f"probe3-{args.label}"
    work.mkdir(parents=True, exist_ok=True)
    env = {"GAS_BODY_TIMEOUT_S": str(args.body_wait - 5)}
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result: dict[str, Any] = {**stored.get(args.label, {}), "label": args.label, "repo": str(args.repo),
                              "machine": machine()}
    steps = {"row1": row1, "row1_import": row1_import, "row2": lambda s: row2(s, args.body_wait), "row9": row9,
             "row10": lambda s: row10(s, args.jobs)}
    for name, step in ((n, steps[n]) for n in args.steps):
        svc = Service(args.repo.resolve(), work, env)
        try:
            result[name] = step(svc)
        finally:
            svc.stop()
        print(name, json.dumps(result[name]), flush=True)
    stored[args.label] = result
    args.out.write_text(json.dumps(stored, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
