"""The device worker: one thread per service that owns the timing device.

Profiling jobs and end-to-end measurements both run here, one at a time, so two timings never
overlap on the same device. A job's progress (``done``) is committed in the same transaction as
each measurement: a killed service resumes the job at start-up and loses at most the key in
flight. Measurement requests jump the queue between two keys of a running job.

In a fleet several hosts of one device model and environment share a database and so a queue:
a host claims a job by compare-and-swap (:func:`latency_service.crud.claim_job`) and beats its
heartbeat with every key; another host takes a running job over only when that heartbeat is
older than ``job_stale_s``. A worker only runs jobs of its own (device, environment).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from gas_core.keys import LatencyKey
from latency_service import crud
from latency_service.device import gpu_telemetry
from latency_service.models import Job, utcnow
from latency_service.profiler import Method, time_key

log = logging.getLogger(__name__)


class DeviceWorker:
    def __init__(
        self, sessions: sessionmaker[Session], device: torch.device, device_id: int, environment_id: int,
        method: Method, owner: str, stale_s: float = 300.0, poll_s: float = 0.5,
    ) -> None:
        self.sessions = sessions
        self.device = device
        self.device_id = device_id
        self.environment_id = environment_id
        self.method = method
        self.owner = owner
        self.stale_s = stale_s
        self.poll_s = poll_s
        self._tasks: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seen: set[str] = set()  # jobs this process has worked on
        self._thread = threading.Thread(target=self._run, name="gas-device-worker", daemon=True)

    # ------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread between two keys; returns its future."""
        fut: Future = Future()
        self._tasks.put((fn, fut))
        self._wake.set()
        return fut

    # ------------------------------------------------------------ loop
    def _run(self) -> None:
        log.info("device worker started on %s", self.device)
        while not self._stop.is_set():
            if self._run_tasks():
                continue
            try:
                worked = self._job_step()
            except Exception:
                log.exception("device worker step failed")
                worked = False
            if not worked:
                self._wake.wait(self.poll_s)
                self._wake.clear()
        log.info("device worker stopped")

    def _run_tasks(self) -> bool:
        ran = False
        while True:
            try:
                fn, fut = self._tasks.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as err:  # noqa: BLE001 — the future carries it to the caller
                    fut.set_exception(err)

    def _job_step(self) -> bool:
        """Advance the job :func:`crud.next_job` picks until it ends or a measurement or shutdown
        interrupts it. False when there is nothing to do."""
        with self.sessions() as s:
            stale_before = utcnow() - timedelta(seconds=self.stale_s)
            job = crud.next_job(s, device_id=self.device_id, environment_id=self.environment_id, owner=self.owner,
                                stale_before=stale_before)
            if job is None:
                return False
            was, previous = job.state, job.owner
            if not (was == "running" and previous == self.owner) and not crud.claim_job(s, job=job, owner=self.owner):
                return True  # another host, or a DELETE, got there first
            if was == "queued":
                log.info("job %s started: %d keys", job.id, job.total)
            elif previous != self.owner:
                log.info("job %s taken over from %s (no progress for %.0fs) at %d/%d", job.id, previous,
                         self.stale_s, job.done, job.total)
            elif job.id not in self._seen:  # running before this process began: a crash or kill
                log.info("job %s resumed at %d/%d", job.id, job.done, job.total)
            self._seen.add(job.id)
            return self._advance(s, job)

    def _advance(self, s: Session, job: Job) -> bool:
        keys = [LatencyKey.from_canonical(c) for c in job.keys[job.done :]]
        stored = set() if job.force else crud.stored_hashes(
            s, device_id=job.device_id, environment_id=job.environment_id, hashes=[k.key_hash for k in keys]
        )
        for key in keys:
            s.refresh(job)
            if job.state != "running":  # cancelled from the API
                log.info("job %s %s at %d/%d", job.id, job.state, job.done, job.total)
                return True
            if job.owner != self.owner:  # we stalled past job_stale_s and another host took it
                log.warning("job %s was taken over by %s at %d/%d", job.id, job.owner, job.done, job.total)
                return True
            if key.key_hash in stored:
                if not self._progress(s, job, skipped=True):
                    return True
                continue
            error = None
            try:
                timing = time_key(key, self.device, self.method)
                crud.put_measurement(
                    s, device_id=job.device_id, environment_id=job.environment_id, key=key, timing=timing,
                    method=asdict(self.method), telemetry=self._telemetry(),
                )
            except Exception as err:  # a key that cannot run here (OOM, unsupported dtype…)
                s.rollback()
                s.refresh(job)
                log.warning("job %s: %s failed: %s", job.id, key.canonical, err)
                error = f"{key.canonical}: {type(err).__name__}: {err}"
            if not self._progress(s, job, error=error):
                return True  # cancelled or taken over while this key was timed: it is rolled back
            if not self._tasks.empty() or self._stop.is_set():
                return True  # let a measurement run, or shut down, between two keys
        s.refresh(job)
        if not self._transition(s, job, "running", state="failed" if job.errors else "done", finished_at=utcnow()):
            return True  # cancelled after the last key
        log.info("job %s %s: %d timed, %d skipped, %d errors", job.id, job.state,
                 job.total - job.skipped - len(job.errors), job.skipped, len(job.errors))
        return True

    def _progress(self, s: Session, job: Job, *, skipped: bool = False, error: str | None = None) -> bool:
        """Count one key done (and beat the heartbeat) in the transaction that holds its
        measurement, only while the job is still running under this worker: after a DELETE or a
        take-over both are rolled back, so a stalled host never overwrites the new owner's progress."""
        values: dict[str, Any] = {"done": Job.done + 1, "heartbeat_at": utcnow()}
        if skipped:
            values["skipped"] = Job.skipped + 1
        if error is not None:
            values["errors"] = [*job.errors, error]
        q = update(Job).where(Job.id == job.id, Job.state == "running", Job.owner == self.owner)
        if crud.rows_changed(s.execute(q.values(**values))):
            s.commit()
            return True
        s.rollback()
        return False

    @staticmethod
    def _transition(s: Session, job: Job, expect: str, **values: object) -> bool:
        """Set ``values`` on ``job`` only if its state is still ``expect`` and its owner still this
        worker (a DELETE or a take-over wins); True when they were."""
        q = update(Job).where(Job.id == job.id, Job.state == expect, Job.owner == job.owner)
        done = crud.rows_changed(s.execute(q.values(**values)))
        s.commit()
        s.refresh(job)
        return bool(done)

    def _telemetry(self) -> dict[str, int | None]:
        if self.device.type == "cuda":
            return gpu_telemetry(self.device.index or 0)
        return {"gpu_clock_mhz": None, "gpu_temp_c": None}
