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
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import torch
from sqlalchemy.orm import Session, sessionmaker

from gas_core.keys import LatencyKey
from gas_core.quality import (
    BusyPolicy,
    HostCheck,
    HostLoad,
    HostNoise,
    QualityPolicy,
    ReferencePoint,
    RowQuality,
    assess,
    interrupted,
    judge_host,
)
from gas_core.wire import MeasurePublic, MeasureRequest
from latency_service import crud, job_state
from latency_service.device import gpu_telemetry
from latency_service.models import Job, utcnow
from latency_service.profiler import REFERENCE_KEY, Method, Timing, time_key, time_reference

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(RuntimeError):
    """Too many measurements wait for the device; the API answers 503 with Retry-After."""


class MeasureQueue(Generic[T]):
    """Measurements waiting for the device, in order, each with the future its caller waits on:
    bounded (a caller gets :class:`QueueFull` instead of queueing work nobody may still want),
    and a cancelled future (a client that went away) is dropped when its turn comes. The one
    queue of both runners: the worker thread's and the worker process's parent."""

    def __init__(self) -> None:
        self._items: deque[tuple[T, Future]] = deque()
        self._lock = threading.Lock()

    def put(self, item: T, limit: int | None = None) -> Future:
        """Queue ``item``; its future. :class:`QueueFull` when ``limit`` wanted ones already wait."""
        with self._lock:
            waiting = sum(not fut.cancelled() for _, fut in self._items)
            if limit is not None and waiting >= limit:
                raise QueueFull(f"{waiting} measurements already queued (limit {limit}); retry later")
            fut: Future = Future()
            self._items.append((item, fut))
            return fut

    def take(self) -> tuple[T, Future] | None:
        """The next item still wanted, its future now running; None when none waits."""
        with self._lock:
            while self._items:
                item, fut = self._items.popleft()
                if fut.set_running_or_notify_cancel():
                    return item, fut
            return None

    def waiting(self) -> int:
        """Items waiting that someone still wants."""
        with self._lock:
            return sum(not fut.cancelled() for _, fut in self._items)

    def drain(self) -> list[Future]:
        """Empty the queue; the futures that were waiting (the caller cancels or fails them)."""
        with self._lock:
            futures = [fut for _, fut in self._items]
            self._items.clear()
            return futures


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
LoadProbe = Callable[[], HostLoad]
"""How busy the rest of the host is (:func:`latency_service.device.host_load`)."""


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
    busy: BusyPolicy = field(default_factory=BusyPolicy)
    on_busy: str = "stop"
    """stop | wait | robust (``GAS_BUSY_POLICY``)"""
    busy_block: int = 5
    busy_recheck_s: float = 30.0
    busy_wait_s: float = 600.0
    key_budget_s: float | None = None
    job_budget_s: float | None = None
    """None: ``max(120, keys × key_budget_s / 3)`` (no budget when ``key_budget_s`` is None too)."""

    def job_budget(self, keys: int) -> float | None:
        if self.job_budget_s is not None:
            return self.job_budget_s
        return None if self.key_budget_s is None else max(120.0, keys * self.key_budget_s / 3)


class DeviceWorker:
    def __init__(
        self, sessions: sessionmaker[Session], device: torch.device, device_id: int, environment_id: int,
        method: Method, owner: str, stale_s: float = 300.0, poll_s: float = 0.5, trust: Trust | None = None,
        timer: KeyTimer = time_key, reference: ReferenceTimer = time_reference,
        clock: Callable[[], float] = time.monotonic, load_probe: LoadProbe | None = None,
    ) -> None:
        """``load_probe`` None: the host is judged by its reference workload alone (no look at
        the other processes)."""
        self.sessions = sessions
        self.device = device
        self.device_id = device_id
        self.environment_id = environment_id
        self.method = method
        self.owner = owner
        self.stale_s = stale_s
        self.poll_s = poll_s
        self._tasks: MeasureQueue[Callable[[], Any]] = MeasureQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seen: set[str] = set()  # jobs this process has worked on
        self.trust = trust or Trust()
        self.timer, self.reference, self.clock, self.load_probe = timer, reference, clock, load_probe
        self._check: dict[str, HostCheck] = {}  # job id → its latest host check
        self._busy_since: dict[str, float] = {}  # job id → clock() when a wait for quiet began
        self._recheck_at: dict[str, float] = {}  # job id → clock() of its next check while it waits
        self._started: dict[str, float] = {}  # job id → clock() when this process began timing it
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
        for fut in self._tasks.drain():
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
        fut = self._tasks.put(fn, limit)
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
        return self._tasks.waiting()

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
        task = self._tasks.take()
        if task is None:
            return False
        fn, fut = task
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
        if times_keys:
            recheck = self._recheck_at.get(job.id)
            if recheck is not None and self.clock() < recheck:
                return False  # waiting for a quiet host: idle till the next check (measurements still run)
            if self.trust.job_budget(job.total) is not None:
                self._started.setdefault(job.id, self.clock())
            unjudged = job.id not in self._check  # its first key here, or resumed by this process
            if (unjudged or recheck is not None) and not self._reference_point(s, job):
                return True
            verdict = self._go_on(s, job)
            if verdict != "go":
                return verdict == "stopped"
        budget = self.trust.job_budget(job.total)
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
            if budget is not None and self.clock() - self._started.setdefault(job.id, self.clock()) > budget:
                self._end_stopped(s, job, f"stopped: over its time budget of {budget:.0f} s after {job.done} of "
                                  f"{job.total} keys (GAS_JOB_BUDGET_S); the keys timed so far are stored")
                return True
            if not self._time_and_store(s, job, key):
                return True  # cancelled or taken over while this key was timed: it is rolled back
            due = self.clock() - self._last_ref.get(job.id, float("-inf")) >= self.trust.reference_every_s
            if due:
                if not self._reference_point(s, job):
                    return True
                if self._go_on(s, job) != "go":
                    return True
            if self._tasks.waiting() or self._stop.is_set():
                return True  # let a measurement run, or shut down, between two keys
        s.refresh(job)
        if times_keys and not self._reference_point(s, job, last=True):
            return True
        ended = job_state.finish(s, job=job)
        self._forget(job.id)
        if self.on_job_end is not None:
            self.on_job_end(job.request_hash)  # ended here, or cancelled after the last key: either way no longer active
        if not ended:
            return True
        noise = HostNoise.model_validate(job.host_noise) if job.host_noise else None
        log.info("job %s %s: %d timed, %d skipped, %d errors, %d flagged, %d re-timed; host reference drift %s",
                 job.id, job.state, job.total - job.skipped - len(job.errors), job.skipped, len(job.errors),
                 job.flagged, job.retimed, "n/a" if noise is None else noise.describe())
        return True

    def _time_and_store(self, s: Session, job: Job, key: LatencyKey) -> bool:
        """Time one key with the method the host allows now, store it and count it done in one
        transaction. False when the job was cancelled or taken over meanwhile."""
        error, quality = None, None
        if self.on_key is not None:  # a worker process's parent fails this key should the process die on it
            self.on_key(job.id, job.done, key)
        method, busy = self._method_now(job)
        try:
            timing, quality, method = self._time_checked(key, method, busy)
        except Exception as err:  # a key that cannot run here (OOM, unsupported dtype, an op that raises)
            self._release_device_memory()
            log.warning("job %s: %s failed: %s", job.id, key.canonical, err)
            error = f"{key.canonical}: {type(err).__name__}: {err}"
        else:  # a database error here propagates: the step ends uncommitted and the key is re-timed
            crud.put_measurement(
                s, device_id=job.device_id, environment_id=job.environment_id, key=key, timing=timing,
                method=asdict(method), telemetry=self._telemetry(), quality=quality,
            )
        progressed = self._progress(s, job, error=error, quality=quality)
        if self.on_key is not None:
            self.on_key(None, None, None)
        if progressed and quality is not None:  # timed and stored
            self._stretch.setdefault(job.id, []).append(key.key_hash)
            self._wrote(key)
        return progressed

    def _method_now(self, job: Job) -> tuple[Method, HostCheck | None]:
        """The configured method with the key's time budget; on a busy host under the robust
        policy, direct timing with each sample the fastest of ``busy_block`` runs, and the
        check that asked for it."""
        method = self.method if self.trust.key_budget_s is None else replace(
            self.method, key_budget_s=self.trust.key_budget_s)
        check = self._check.get(job.id)
        if check is not None and check.busy and check.action == "robust":
            return replace(method, direct=True, block=self.trust.busy_block), check
        return method, None

    def _time_checked(self, key: LatencyKey, method: Method,
                      busy: HostCheck | None) -> tuple[Timing, RowQuality, Method]:
        """Time ``key``; while its samples are unstable, pause and time it again, at most
        ``retime_max`` more times and within the key's time budget (not at all on a busy host:
        waiting a second does not make it quiet). A paired (context) key is re-timed directly:
        each run on its own right after its context, so no sample is a difference that
        straddles zero. Returns the steadiest attempt (smallest spread) with its verdict, which
        stays flagged if no attempt was stable, and the method that timed it."""
        best: tuple[Timing, RowQuality, Method] | None = None
        attempt, t0 = 0, (self.clock() if self.trust.key_budget_s is not None else 0.0)
        retimes = 0 if busy is not None else self.trust.retime_max
        for attempt in range(1, retimes + 2):
            if attempt > 1 and method.context and not method.direct:
                # paired differences of a cheap op straddle zero on a quiet host as well (25 of the
                # demo's 58 keys were flagged so): a re-timing times each run directly instead
                method = replace(method, direct=True)
            timing = self.timer(key, self.device, method)
            q = assess(timing.samples_us, self.trust.policy, attempt, self._extra_reasons(timing, method, busy))
            if not q.flagged:
                return timing, q, method
            if best is None or q.spread < best[1].spread:
                best = (timing, q, method)
            spent = self.trust.key_budget_s is not None and self.clock() - t0 >= self.trust.key_budget_s
            if attempt > retimes or self._stop.is_set() or spent:
                break
            log.info("%s unstable (%s): re-timing in %.1f s", key.canonical, "; ".join(q.reasons),
                     self.trust.retime_pause_s)
            self._stop.wait(self.trust.retime_pause_s)
        assert best is not None
        log.log(logging.INFO if busy is not None else logging.WARNING, "%s stored flagged after %d attempt(s): %s",
                key.canonical, attempt, "; ".join(best[1].reasons))
        return best[0], best[1].model_copy(update={"attempts": attempt}), best[2]

    def _extra_reasons(self, timing: Timing, method: Method, busy: HostCheck | None) -> list[str]:
        """Why to flag a row beyond its spread: the busy host it was timed on, most of its direct
        runs interrupted, its time budget spent."""
        out = []
        if busy is not None:
            out.append(f"timed on a busy host ({'; '.join(busy.reasons)}) with the robust method: each sample the "
                       f"fastest of {method.block} runs")
        if method.direct and (why := interrupted(timing.samples_us, resolution_us=self.trust.policy.resolution_us)):
            out.append(why)
        if timing.budget_spent:
            out.append(f"its time budget of {method.key_budget_s:g} s ran out after {len(timing.samples_us)} samples")
        return out

    def _go_on(self, s: Session, job: Job) -> str:
        """Apply ``GAS_BUSY_POLICY`` to the job's latest host check: "go" (quiet, or busy under
        the robust policy), "wait" (busy; checked again in ``busy_recheck_s``) or "stopped"
        (busy under the stop policy, or still busy after ``busy_wait_s``)."""
        check = self._check.get(job.id)
        if check is None or not check.busy:
            since = self._busy_since.pop(job.id, None)
            if since is not None:  # waited, and it is quiet now: the wait does not count against the budget
                self._recheck_at.pop(job.id, None)
                self._started[job.id] = self._started.get(job.id, since) + (self.clock() - since)
                log.info("job %s: host quiet again after %.0f s: timing resumes", job.id, self.clock() - since)
            return "go"
        if check.action == "robust":
            return "go"
        if check.action == "stop":
            self._end_stopped(s, job, f"stopped: {check.describe()} (GAS_BUSY_POLICY=stop); re-run on a quiet host, "
                              "or set GAS_BUSY_POLICY=robust or wait")
            return "stopped"
        since = self._busy_since.setdefault(job.id, self.clock())
        if self.clock() - since >= self.trust.busy_wait_s:
            self._end_stopped(s, job, f"stopped: still busy after waiting {self.clock() - since:.0f} s "
                              f"(GAS_BUSY_WAIT_S): {check.describe()}")
            return "stopped"
        self._recheck_at[job.id] = self.clock() + self.trust.busy_recheck_s
        return "wait"

    def _end_stopped(self, s: Session, job: Job, reason: str) -> None:
        """Fail the job with ``reason`` (what is stored stays), say so in the log."""
        if job_state.stop(s, job=job, owner=self.owner, reason=reason):
            log.warning("job %s %s", job.id, reason)
        self._forget(job.id)
        if self.on_job_end is not None:
            self.on_job_end(job.request_hash)

    def _forget(self, job_id: str) -> None:
        self._check.pop(job_id, None)
        for d in (self._busy_since, self._recheck_at, self._started):
            d.pop(job_id, None)

    def _threads(self) -> int:
        """Threads a timing runs on: torch's intra-op threads on a CPU, one feeding a GPU."""
        return torch.get_num_threads() if self.device.type == "cpu" else 1

    def _reference_point(self, s: Session, job: Job, *, last: bool = False) -> bool:
        """Look at the host (the other processes' load, sampled first while this one idles, and
        the reference workload), judge it busy or quiet against the environment's quiet
        calibration, and record the point with the job and the keys timed since the previous
        one. A point quiet on every count adds to the calibration. At the job's ``last`` point,
        judge every point against the whole job (:meth:`HostNoise.shifts`) and flag the keys
        timed just before each that moved: the host itself ran differently while they were
        timed. False if the job is no longer ours."""
        load = self.load_probe() if self.load_probe is not None else None
        point = ReferencePoint.from_bursts(done=job.done, at=utcnow(),
                                           burst_medians_us=[b.median_us for b in self.reference(self.device)])
        noise = (HostNoise.model_validate(job.host_noise) if job.host_noise else
                 HostNoise(reference=REFERENCE_KEY.canonical, threshold_pct=self.trust.reference_drift_pct,
                           min_z=self.trust.reference_drift_z))
        noise.points.append(point)
        if not last:
            self._judge(s, job, noise, point, load)
        self._stretches.setdefault(job.id, {})[len(noise.points) - 1] = self._stretch.pop(job.id, [])
        self._last_ref[job.id] = self.clock()
        newly = self._flag_drift(s, job, noise, self._stretches.pop(job.id)) if last else 0
        if not job_state.record_reference(s, job=job, owner=self.owner, noise=noise, newly_flagged=newly):
            return False
        if newly:
            self._wrote(None)
        return True

    def _judge(self, s: Session, job: Job, noise: HostNoise, point: ReferencePoint, load: HostLoad | None) -> None:
        """The host check at ``point``: kept with the job when it is the first, busy, or a change;
        logged; a point quiet on every count (the load seen) joins the calibration."""
        quiet = crud.get_calibration(s, environment_id=job.environment_id)
        check = judge_host(point, load, quiet, self._threads(), self.trust.busy, done=job.done,
                           action_if_busy=self.trust.on_busy)
        before = self._check.get(job.id)
        self._check[job.id] = check
        if not noise.checks or check.busy or (before is not None and before.busy):
            noise.checks.append(check)
        if check.busy and (before is None or not before.busy):
            then = {"robust": "timing goes on with the robust method, every row flagged",
                    "wait": f"waiting for quiet (checked every {self.trust.busy_recheck_s:.0f} s, at most "
                            f"{self.trust.busy_wait_s:.0f} s)", "stop": "the job stops"}[check.action]
            log.warning("job %s: %s; GAS_BUSY_POLICY=%s: %s", job.id, check.describe(), check.action, then)
        elif before is None:
            log.info("job %s: %s", job.id, check.describe())
        if not check.busy and load is not None:
            crud.add_calibration_point(s, environment_id=job.environment_id, reference=REFERENCE_KEY.canonical,
                                       median_us=point.median_us, at=point.at)
            s.refresh(job)

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
            log.info("job %s: host reference moved up to %s: no row newly flagged (none timed before a point "
                     "that moved, or already flagged)", job.id, noise.describe())
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
