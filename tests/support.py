"""Test-only helpers on top of :mod:`latency_service.testing` (the harness tests and benchmarks
share): a server with the quick timing, and a device worker on a database without a server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latency_service.testing import QUICK_TIMING, Server
from latency_service.testing import start_server as _start


def start_server(db: str, tmp: Path, extra_env: dict[str, str] | None = None) -> Server:
    """A test's server: the quick timing (:data:`latency_service.testing.QUICK_TIMING`) under ``extra_env``."""
    return _start(db, tmp, {**QUICK_TIMING, **(extra_env or {})})


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

    from latency_service import crud, db, device, job_state
    from latency_service.jobs import DeviceWorker
    from latency_service.profiler import Method

    db.migrate(db_url)
    engine = db.make_engine(db_url)
    sessions = db.session_factory(engine)
    s = sessions()
    dev = crud.get_or_create_device(s, ident=device.cpu_identity())
    env = crud.get_or_create_environment(s, device=dev, ident=device.environment(torch.device("cpu"), 1, False))
    job, _ = job_state.create(s, device_id=dev.id, environment_id=env.id, request_hash="h", keys=keys, force=False)
    worker = DeviceWorker(sessions, torch.device("cpu"), dev.id, env.id, Method(), owner="me", **worker_kwargs)
    return WorkerRig(engine, s, job, worker, dev, env)
