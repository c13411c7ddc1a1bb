"""A latency service run locally, for tests and benchmarks: ``gas-service serve`` as a real
uvicorn in a subprocess on a free loopback port, a throwaway PostgreSQL cluster, and waiting on a
job. Shipped with the package (as ``fastapi.testclient`` is) so that ``tests/`` and ``bench/``
share one harness and neither imports the other."""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gas_core.progress import wait_until

QUICK_TIMING = {
    # fast but real timing for tests and quick benchmark passes: fewer samples, short warm-up
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
    # whether a CI runner looks busy is its own affair: the busy check is covered with an injected
    # load probe and clock in test_busy_host.py
    "GAS_BUSY_CHECK": "false",
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
    """A ``gas-service serve`` subprocess on loopback."""

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


def start_server(db: str, tmp: Path, extra_env: dict[str, str] | None = None, ready_s: float = 60,
                 log: Path | None = None) -> Server:
    """``gas-service serve`` on database ``db`` in a subprocess (working directory ``tmp``),
    polled on /health until ready. ``extra_env`` adds ``GAS_`` settings (timing, device) to this
    process's environment; nothing else is implied."""
    port = free_port()
    env = {**os.environ, "GAS_DATABASE_URL": db, **(extra_env or {})}
    log = log or tmp / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "latency_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Server(url, proc, log, env)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {ready_s:.0f} s:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120, poll_s: float = 0.1,
             on_poll: Callable[[dict], None] | None = None) -> dict:
    """Poll ``GET /jobs/{id}`` every ``poll_s`` until the job ends; its final record. ``on_poll``
    sees every record read (a progress bar)."""
    try:
        return wait_until(lambda: client.get(f"/jobs/{job_id}").json(),
                          lambda job: job["state"] not in ("queued", "running"), timeout_s=timeout, poll_s=poll_s,
                          on_read=on_poll)
    except TimeoutError:
        raise TimeoutError(f"job {job_id} still running after {timeout}s") from None


@contextlib.contextmanager
def local_service(db: str, workdir: Path, env: dict[str, str] | None = None, ready_s: float = 120,
                  log: Path | None = None) -> Iterator[str]:
    """:func:`start_server` as a context manager that yields the base URL and stops it on exit."""
    server = start_server(db, workdir, env, ready_s=ready_s, log=log)
    try:
        yield server.url
    finally:
        stop_server(server)
