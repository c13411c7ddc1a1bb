"""The device worker: one thread per service that owns the timing device.

Profiling jobs and end-to-end measurements both run here, one at a time, so two timings never
overlap on the same device. A job's progress (``done``) is committed in the same transaction as
each measurement: a killed service resumes the job at start-up and loses at most the key in
flight. Measurement requests jump the queue between two keys of a running job.

In a fleet several hosts of one device model and environment share a database and so a queue:
a host claims a job by compare-and-swap (:func:`latency_service.job_state.claim`; the whole
state machine is in that module) and beats its heartbeat with every key; another host takes a
running job over only when that heartbeat is older than ``job_stale_s``. A worker only runs jobs of its own (device, environment).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import torch
from sqlalchemy.orm import Session, sessionmaker

from gas_core.keys import LatencyKey
from gas_core.quality import HostNoise, QualityPolicy, ReferencePoint, RowQuality, assess
from gas_core.wire import MeasurePublic, MeasureRequest
from latency_service import crud, job_state
from latency_service.device import gpu_telemetry
from latency_service.models import Job, utcnow
from latency_service.profiler import REFERENCE_KEY, Method, Timing, time_key, time_reference

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many measurements wait for the device; the API answers 503 with Retry-After."""


class DeviceRunner(Protocol):
    """What the API needs of whatever owns the timing device: a :class:`DeviceWorker` thread, or
    a :class:`latency_service.worker_process.WorkerProcess` running one in a child process."""

    on_write: Callable[[LatencyKey | None], None] | None
    on_job_end: Callable[[str | None], None] | None  # told the request hash of a job that ended

    @property
    def measuring(self) -> bool: ...  # a /measure is being timed (or about to be, after the key in flight)
    def start(self) -> None: ...
    def stop(self, timeout: float = 30) -> None: ...
    def alive(self) -> bool: ...
    def restarting(self) -> bool: ...  # not alive, but a restart is under way (seconds)
    def wake(self) -> None: ...  # a job was queued
    def queued(self) -> int: ...  # measurements waiting that someone still wants
    def submit_measure(self, req: MeasureRequest, limit: int | None = None) -> Future[MeasurePublic]: ...


KeyTimer = Callable[[LatencyKey, torch.device, Method], Timing]
ReferenceTimer = Callable[[torch.device], list[Timing]]
"""One reference point: its bursts (:func:`latency_service.profiler.time_reference`)."""


@dataclass(frozen=True)
class Trust:
    """How the worker guards the figures it stores (settings ``GAS_QUALITY_*``, ``GAS_RETIME_*``,
    ``GAS_REFERENCE_*``)."""

    policy: QualityPolicy = field(default_factory=QualityPolicy)
    retime_max: int = 2
    retime_pause_s: float = 1.0
    reference_every_s: float = 30.0
    reference_drift_pct: float = 10.0
    reference_drift_z: float = 6.0


class DeviceWorker:
    def __init__(
        self, sessions: sessionmaker[Session], device: torch.device, device_id: int, environment_id: int,
        method: Method, owner: str, stale_s: float = 300.0, poll_s: float = 0.5, trust: Trust | None = None,
        timer: KeyTimer = time_key, reference: ReferenceTimer = time_reference,
        clock: Callable[[], float] = time.monotonic,
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
        self.trust = trust or Trust()
        self.timer, self.reference, self.clock = timer, reference, clock
        self._stretch: dict[str, list[str]] = {}  # job id → hashes timed since its last reference point
        self._stretches: dict[str, dict[int, list[str]]] = {}  # job id → point index → hashes timed before it
        self._last_ref: dict[str, float] = {}  # job id → clock() of its last reference point
        # told after rows are committed (table caches): the key stored, or None when rows it cannot
        # name changed (flags set on a stretch of keys)
        self.on_write: Callable[[LatencyKey | None], None] | None = None
        self.on_job_end: Callable[[str | None], None] | None = None  # told when a job this worker ran ends
        # told (job id, index, key) before a key is timed and (None, None, None) once its progress is committed
        self.on_key: Callable[[str | None, int | None, LatencyKey | None], None] | None = None
        self.measuring = False  # a submitted task (a /measure) runs now
        self.measure: Callable[[MeasureRequest], MeasurePublic] | None = None  # Host.measure, set by the host
        self._thread = threading.Thread(target=self._run, name="gas-device-worker", daemon=True)

    # ------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Stop after the key or measurement in flight, waiting at most ``timeout`` s; queued
        measurements are cancelled. A key still being timed when the wait ends is abandoned
        uncommitted (the process exits; its transaction rolls back) and re-timed on resume."""
        self._stop.set()
        self._wake.set()
        while True:
            try:
                _, fut = self._tasks.get_nowait()
            except queue.Empty:
                break
            fut.cancel()
        if self._thread.ident is None:  # never started (the CLI's measure)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("device worker still timing after %.0f s; the key in flight is rolled back and re-timed "
                        "on resume", timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def restarting(self) -> bool:
        return False  # a worker thread is never restarted: down is down until the service restarts

    def wake(self) -> None:
        self._wake.set()

    def submit(self, fn: Callable[[], Any], limit: int | None = None) -> Future:
        """Run ``fn`` on the worker thread between two keys; returns its future. With ``limit``,
        raises :class:`QueueFull` when that many tasks already wait (the caller sheds load
        instead of queueing work nobody may still want). Cancelling the future before it runs
        (a client that went away) drops the task."""
        if limit is not None and (waiting := self.queued()) >= limit:
            raise QueueFull(f"{waiting} measurements already queued (limit {limit}); retry later")
        fut: Future = Future()
        self._tasks.put((fn, fut))
        self._wake.set()
        return fut

    def submit_measure(self, req: MeasureRequest, limit: int | None = None) -> Future[MeasurePublic]:
        """Time ``req`` end to end on the worker (see :meth:`submit`)."""
        measure = self.measure
        if measure is None:
            raise RuntimeError("this worker was given no measure function (Host.start sets it)")
        return self.submit(lambda: measure(req), limit)

    def queued(self) -> int:
        """Tasks waiting that someone still wants (a cancelled one leaves at the next dequeue)."""
        with self._tasks.mutex:
            return sum(not fut.cancelled() for _, fut in self._tasks.queue)

    # ------------------------------------------------------------ loop
    def _run(self) -> None:
        log.info("device worker started on %s", self.device)
        failures = 0
        while not self._stop.is_set():
            measured = self._run_tasks()
            if self._stop.is_set():
                break
            try:  # then at least one key of a running job, however many measurements wait
                worked = self._job_step() or measured
                failures = 0
            except Exception as err:  # the database went away (restart, network): retry with backoff
                failures += 1
                log.warning("device worker step failed (%s: %s); the key in flight was not stored and is "
                            "retried in %.1f s", type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                            min(30.0, self.poll_s * 2 ** failures))
                log.debug("device worker step failed", exc_info=True)
                self._stop.wait(min(30.0, self.poll_s * 2 ** failures))
                continue
            if not worked:
                self._wake.wait(self.poll_s)
                self._wake.clear()
        log.info("device worker stopped")

    def _run_tasks(self) -> bool:
        """Run the next task that is still wanted (cancelled ones are dropped); at most one, so a
        stream of measurements alternates with a running job's keys and never starves it."""
        while True:
            try:
                fn, fut = self._tasks.get_nowait()
            except queue.Empty:
                return False
            if fut.set_running_or_notify_cancel():
                self.measuring = True
                try:
                    fut.set_result(fn())
                except BaseException as err:  # noqa: BLE001 — the future carries it to the caller
                    fut.set_exception(err)
                finally:
                    self.measuring = False
                return True

    def _job_step(self) -> bool:
        """Advance the job :func:`job_state.next_job` picks until it ends or a measurement or shutdown
        interrupts it. False when there is nothing to do."""
        with self.sessions() as s:
            stale_before = utcnow() - timedelta(seconds=self.stale_s)
            job = job_state.next_job(s, device_id=self.device_id, environment_id=self.environment_id, owner=self.owner,
                                stale_before=stale_before)
            if job is None:
                return False
            was, previous = job.state, job.owner
            if not (was == "running" and previous == self.owner) and not job_state.claim(s, job=job, owner=self.owner):
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
            s, device_id=job.device_id, environment_id=job.environment_id, keys=keys
        )
        times_keys = any(k.key_hash not in stored for k in keys)  # a job of stored keys times nothing: no reference
        if times_keys and not (job.host_noise or {}).get("points") and not self._reference_point(s, job):
            return True
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
            error, quality = None, None
            if self.on_key is not None:  # a worker process's parent fails this key should the process die on it
                self.on_key(job.id, job.done, key)
            try:
                timing, quality = self._time_checked(key)
            except Exception as err:  # a key that cannot run here (OOM, unsupported dtype, an op that raises)
                self._release_device_memory()
                log.warning("job %s: %s failed: %s", job.id, key.canonical, err)
                error = f"{key.canonical}: {type(err).__name__}: {err}"
            else:  # a database error here propagates: the step ends uncommitted and the key is re-timed
                crud.put_measurement(
                    s, device_id=job.device_id, environment_id=job.environment_id, key=key, timing=timing,
                    method=asdict(self.method), telemetry=self._telemetry(), quality=quality,
                )
            progressed = self._progress(s, job, error=error, quality=quality)
            if self.on_key is not None:
                self.on_key(None, None, None)
            if not progressed:
                return True  # cancelled or taken over while this key was timed: it is rolled back
            if quality is not None:  # timed and stored
                self._stretch.setdefault(job.id, []).append(key.key_hash)
                self._wrote(key)
            due = self.clock() - self._last_ref.get(job.id, float("-inf")) >= self.trust.reference_every_s
            if due and not self._reference_point(s, job):
                return True
            if not self._tasks.empty() or self._stop.is_set():
                return True  # let a measurement run, or shut down, between two keys
        s.refresh(job)
        if times_keys and not self._reference_point(s, job, last=True):
            return True
        ended = job_state.finish(s, job=job)
        if self.on_job_end is not None:
            self.on_job_end(job.request_hash)  # ended here, or cancelled after the last key: either way no longer active
        if not ended:
            return True
        noise = HostNoise.model_validate(job.host_noise) if job.host_noise else None
        log.info("job %s %s: %d timed, %d skipped, %d errors, %d flagged, %d re-timed; host reference drift %s",
                 job.id, job.state, job.total - job.skipped - len(job.errors), job.skipped, len(job.errors),
                 job.flagged, job.retimed, "n/a" if noise is None else noise.describe())
        return True

    def _time_checked(self, key: LatencyKey) -> tuple[Timing, RowQuality]:
        """Time ``key``; while its samples are unstable, pause and time it again, at most
        ``retime_max`` more times. Returns the steadiest attempt (smallest spread) with its
        verdict, which stays flagged if no attempt was stable."""
        best: tuple[Timing, RowQuality] | None = None
        attempt = 0
        for attempt in range(1, self.trust.retime_max + 2):
            timing = self.timer(key, self.device, self.method)
            q = assess(timing.samples_us, self.trust.policy, attempt)
            if not q.flagged:
                return timing, q
            if best is None or q.spread < best[1].spread:
                best = (timing, q)
            if attempt > self.trust.retime_max or self._stop.is_set():
                break
            log.info("%s unstable (%s): re-timing in %.1f s", key.canonical, "; ".join(q.reasons),
                     self.trust.retime_pause_s)
            self._stop.wait(self.trust.retime_pause_s)
        assert best is not None
        log.warning("%s stored flagged after %d attempts: %s", key.canonical, attempt, "; ".join(best[1].reasons))
        return best[0], best[1].model_copy(update={"attempts": attempt})

    def _reference_point(self, s: Session, job: Job, *, last: bool = False) -> bool:
        """Time the reference workload and record it with the job, with the keys timed since the
        previous point. At the job's ``last`` point, judge every point against the whole job
        (:meth:`HostNoise.shifts`) and flag the keys timed just before each that moved: the host
        itself ran differently while they were timed. False if the job is no longer ours."""
        point = ReferencePoint.from_bursts(done=job.done, at=utcnow(),
                                           burst_medians_us=[b.median_us for b in self.reference(self.device)])
        noise = (HostNoise.model_validate(job.host_noise) if job.host_noise else
                 HostNoise(reference=REFERENCE_KEY.canonical, threshold_pct=self.trust.reference_drift_pct,
                           min_z=self.trust.reference_drift_z))
        noise.points.append(point)
        self._stretches.setdefault(job.id, {})[len(noise.points) - 1] = self._stretch.pop(job.id, [])
        self._last_ref[job.id] = self.clock()
        newly = self._flag_drift(s, job, noise, self._stretches.pop(job.id)) if last else 0
        if not job_state.record_reference(s, job=job, owner=self.owner, noise=noise, newly_flagged=newly):
            return False
        if newly:
            self._wrote(None)
        return True

    def _flag_drift(self, s: Session, job: Job, noise: HostNoise, stretches: dict[int, list[str]]) -> int:
        """Flag the keys timed before each point that moved from the job's median; how many rows
        were newly flagged. Points whose keys this process did not see (a job resumed from
        another process) are judged without keys to flag."""
        newly = 0
        for i, shift in enumerate(noise.shifts(), start=1):
            hashes = stretches.get(i, [])
            if not noise.beyond(shift):
                continue
            z = "" if shift.z is None else f", {abs(shift.z):.1f}× the job's wander"
            reason = (f"timed while the host's reference workload was {shift.pct:+.0f} % off the job's median "
                      f"(threshold {noise.threshold_pct:.0f} %{z})")
            if hashes:
                newly += crud.flag_rows(s, device_id=job.device_id, environment_id=job.environment_id,
                                        hashes=hashes, reason=reason)
            log.warning("job %s: host reference %+.1f %% off the job's median at point %d (after %d keys); "
                        "flagged %d key(s) timed before it", job.id, shift.pct, i, noise.points[i].done, len(hashes))
        if not newly and noise.drift_pct is not None and noise.drift_pct > noise.threshold_pct:
            log.info("job %s: host reference moved up to %s: nothing flagged", job.id, noise.describe())
        return newly

    def _progress(self, s: Session, job: Job, *, skipped: bool = False, error: str | None = None,
                  quality: RowQuality | None = None) -> bool:
        """Count one key done with what happened to it (:func:`job_state.progress`)."""
        values: dict[str, Any] = {}
        if skipped:
            values["skipped"] = Job.skipped + 1
        if error is not None:
            values["errors"] = [*job.errors, error]
        if quality is not None and quality.flagged:
            values["flagged"] = Job.flagged + 1
        if quality is not None and quality.attempts > 1:
            values["retimed"] = Job.retimed + 1
        return job_state.progress(s, job=job, owner=self.owner, values=values)

    def _wrote(self, key: LatencyKey | None) -> None:
        if self.on_write is not None:
            self.on_write(key)

    def _release_device_memory(self) -> None:
        """After a key failed (an out-of-memory above all), hand its cached blocks back so the
        next key does not fail for want of memory the failed one still holds."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _telemetry(self) -> dict[str, int | None]:
        if self.device.type == "cuda":
            return gpu_telemetry(self.device.index or 0)
        return {"gpu_clock_mhz": None, "gpu_temp_c": None}
