"""A latency service on this host for the benchmarks: ``gas-service serve`` in a subprocess on a
free loopback port with its own database, polled on ``/health`` until ready, stopped on exit."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_service(db_url: str, log_path: Path, env: dict[str, str] | None = None,
                  ready_s: float = 120) -> Iterator[str]:
    """Yields the service's base URL; ``env`` adds ``GAS_`` settings (timing, device)."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "latency_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "GAS_DATABASE_URL": db_url, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the latency service exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the latency service did not become healthy in {ready_s:.0f} s; see {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
