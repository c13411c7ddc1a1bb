"""Helpers for the tests and the benchmarks: a throwaway PostgreSQL cluster and a real uvicorn
server in a subprocess on a free loopback port."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# fast but real timing for tests: fewer samples, short warm-up
FAST_TIMING = {
    "GAS_SAMPLES": "5",
    "GAS_WARMUP_RUNS": "2",
    "GAS_WARMUP_MS": "2",
    "GAS_MIN_SAMPLE_MS": "0.2",
    "GAS_E2E_SAMPLES": "5",
    "GAS_E2E_WARMUP_RUNS": "1",
    "GAS_CPU_THREADS": "1",
    "GAS_DEVICE": "cpu",
    "GAS_CONTEXT_MIN_SAMPLE_MS": "0.5",
    # 5 samples on a shared 2-core host are often unstable; re-timing (covered by an injected noisy
    # timer in test_trust.py) would make test durations depend on this host's noise
    "GAS_RETIME_MAX": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgCluster:
    """``initdb`` + ``pg_ctl start`` in a temp dir on a free port (as ``postgres`` when root)."""

    bindir: Path
    port: int = field(default_factory=free_port)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gas-pg-")))

    def start(self) -> PgCluster:
        datadir = self.tmp / "data"
        if os.geteuid() == 0:
            shutil.chown(self.tmp, "postgres", "postgres")
        subprocess.run(_as_postgres([str(self.bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U",
                                     "postgres"]), check=True, capture_output=True)
        opts = f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(datadir), "-o", opts, "-l",
                                     str(self.tmp / "log"), "-w", "start"]), check=True, capture_output=True)
        return self

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every open connection is dropped, as in a database failover."""
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.tmp / "data"), "-m", "fast", "-w",
                                     "-l", str(self.tmp / "log"), "restart"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.tmp / "data"), "-m", "immediate",
                                     "-w", "stop"]), capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def create_db(self) -> str:
        import psycopg

        name = "gas_" + uuid.uuid4().hex[:10]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    env: dict[str, str]

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kw})

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def worker_pids(self) -> list[int]:
        """The service's device-worker process (a child running multiprocessing's spawn_main)."""
        return [pid for pid in child_pids(self.proc.pid)
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def child_pids(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux ``/proc``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_server(db: str, tmp: Path, extra_env: dict[str, str] | None = None) -> Server:
    """``gas-service serve`` in a subprocess, polled on /health until ready."""
    port = free_port()
    env = {**os.environ, **FAST_TIMING, "GAS_DATABASE_URL": db, **(extra_env or {})}
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "latency_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Server(url, proc, log, env)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job.get('state')} after {timeout}s")


@dataclass
class WorkerRig:
    """A migrated database holding one queued job of ``keys`` for this CPU, and a device worker
    (thread not started: tests step it) with injected timers."""

    engine: Any
    session: Any
    job: Any
    worker: Any
    device_row: Any
    environment_row: Any


def worker_rig(db_url: str, keys: list, **worker_kwargs: Any) -> WorkerRig:
    import torch

    from latency_service import crud, db, device
    from latency_service.jobs import DeviceWorker
    from latency_service.profiler import Method

    db.migrate(db_url)
    engine = db.make_engine(db_url)
    sessions = db.session_factory(engine)
    s = sessions()
    dev = crud.get_or_create_device(s, ident=device.cpu_identity())
    env = crud.get_or_create_environment(s, device=dev, ident=device.environment(torch.device("cpu"), 1, False))
    job, _ = crud.create_job(s, device_id=dev.id, environment_id=env.id, request_hash="h", keys=keys, force=False)
    worker = DeviceWorker(sessions, torch.device("cpu"), dev.id, env.id, Method(), owner="me", **worker_kwargs)
    return WorkerRig(engine, s, job, worker, dev, env)


def augment_whole_image(aug: Any, img: Any, lbl: Any, gen: Any) -> tuple[Any, Any]:
    """The augmentation done the obvious way — flip, resize the whole image with F.interpolate,
    pad, crop — drawing the same random numbers in the same order: the reference for
    search_client.data.Augment (tests) and what it replaced (bench/loader_cost.py)."""
    import torch
    import torch.nn.functional as F

    from search_client.data import IGNORE

    ch, cw = aug.crop
    img = img.float() / 255 if img.dtype == torch.uint8 else img
    lbl = lbl.long()
    if not aug.train:
        img = F.interpolate(img[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
        if not aug.keep_label:
            lbl = F.interpolate(lbl[None, None].float(), size=(ch, cw), mode="nearest")[0, 0].long()
        return img, lbl
    if torch.rand((), generator=gen) < 0.5:
        img, lbl = img.flip(-1), lbl.flip(-1)
    s = aug.scale[0] + (aug.scale[1] - aug.scale[0]) * float(torch.rand((), generator=gen))
    h, w = img.shape[-2:]
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    lbl = F.interpolate(lbl[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    ph, pw = max(0, ch - nh), max(0, cw - nw)
    img, lbl = F.pad(img, (0, pw, 0, ph)), F.pad(lbl, (0, pw, 0, ph), value=IGNORE)
    y = int(torch.randint(0, img.shape[-2] - ch + 1, (), generator=gen))
    x = int(torch.randint(0, img.shape[-1] - cw + 1, (), generator=gen))
    return img[:, y : y + ch, x : x + cw], lbl[y : y + ch, x : x + cw]
