"""The host service object shared by the HTTP app and the CLI: this host's identity
(:mod:`latency_service.host`), its database, its device worker, and the operations both front
ends need: profiling requests (bounded and planned by :mod:`latency_service.bounds`), the table
cache (:mod:`latency_service.api.table_cache`) and end-to-end measurement
(:mod:`latency_service.e2e`)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gas_core.keys import LatencyKey
from gas_core.wire import MeasurePublic, MeasureRequest, ProfileRequest
from latency_service import bounds, db, e2e, job_state
from latency_service.api.table_cache import TableCache, TableWrite
from latency_service.core.config import Settings
from latency_service.core.lru import LRU
from latency_service.device import DeviceIdentity, EnvironmentIdentity
from latency_service.host import HostSpec
from latency_service.jobs import DeviceRunner, DeviceWorker
from latency_service.models import Job
from latency_service.worker_process import WorkerProcess

log = logging.getLogger(__name__)


@dataclass
class Host:
    """This host's identity (``spec``, fixed at start-up), its device worker, its database, and
    what the service remembers between requests."""

    spec: HostSpec
    worker: DeviceRunner
    engine: Engine
    sessions: sessionmaker[Session]
    table_cache: TableCache
    plans: LRU = field(default_factory=lambda: LRU(64))
    """``/profile`` bodies already expanded → (keys, request hash). Clients of a lab resend the
    same request (gas-search before every search, a fleet script): expanding the default layout
    costs ~3 ms of Python, a lookup ~20 µs. Bounded in bytes (``GAS_PLAN_CACHE_BYTES``); a plan
    is dropped when its job ends or is cancelled."""
    active_jobs: LRU = field(default_factory=lambda: LRU(256))
    """request hash → (job, expires, jobs generation): the queued or running job a resent
    ``/profile`` returns, answered on the event loop for ``GAS_TABLE_VERSION_TTL_S`` (its progress
    counts may be that old, and a job ended by another host of a fleet may show as active that
    long; ``GET /jobs/{id}`` is always current). Forgotten when a job of this host ends or is
    cancelled."""
    jobs_generation: int = 0
    _planning: threading.Lock = field(default_factory=threading.Lock)

    # the identity's parts, as the routes and the CLI read them
    @property
    def settings(self) -> Settings:
        return self.spec.settings

    @property
    def torch_device(self) -> torch.device:
        return self.spec.torch_device

    @property
    def device(self) -> DeviceIdentity:
        return self.spec.device

    @property
    def env(self) -> EnvironmentIdentity:
        return self.spec.env

    @property
    def device_id(self) -> int:
        return self.spec.device_id

    @property
    def environment_id(self) -> int:
        return self.spec.environment_id

    @classmethod
    def start(cls, settings: Settings, *, run_worker: bool = True, worker_process: bool = False) -> Host:
        """Migrate the database, identify this host, register it, and start the worker (which
        resumes any job a previous process left queued or running). With ``worker_process`` the
        worker runs in a child process (the HTTP service: its event loop and the timings then do
        not share an interpreter lock, see :mod:`latency_service.worker_process`); else on a
        thread of this one (the CLI, the tests)."""
        if settings.db_wait_s > 0:
            db.wait_for(settings.database_url, settings.db_wait_s)
        db.migrate(settings.database_url)
        engine = db.make_engine(settings.database_url)
        sessions = db.session_factory(engine)
        spec = HostSpec.prepare(settings, sessions)
        cache = TableCache(settings.table_version_ttl_s, capacity_bytes=settings.table_cache_bytes)
        worker: DeviceRunner = WorkerProcess(spec, sessions) if worker_process else spec.device_worker(sessions)
        worker.on_write = lambda key: cache.invalidate(
            None if key is None else TableWrite(device_id=spec.device_id, environment_id=spec.environment_id, key=key))
        host = cls.of(spec, worker, engine, sessions, cache)
        worker.on_job_end = host.job_ended
        log.info("device %s (%s), environment %s, database %s", spec.device.slug, spec.torch_device,
                 spec.env.fingerprint, db.redact(settings.database_url))
        if run_worker:
            worker.start()
        return host

    @classmethod
    def of(cls, spec: HostSpec, worker: DeviceRunner, engine: Engine, sessions: sessionmaker[Session],
           cache: TableCache | None = None) -> Host:
        """The host object on a prepared identity; a :class:`DeviceWorker` gets its measure function."""
        cache = cache or TableCache(spec.settings.table_version_ttl_s, capacity_bytes=spec.settings.table_cache_bytes)
        host = cls(spec, worker, engine, sessions, cache,
                   plans=LRU(64, capacity=spec.settings.plan_cache_bytes,
                             weigh=lambda plan: bounds.PLAN_BYTES_PER_KEY * len(plan[0])))
        if isinstance(worker, DeviceWorker):
            worker.measure = host.measure
        return host

    def close(self) -> None:
        """Stop the worker (also one between two lives of a worker process: it must not be
        restarted while the service exits) and release the database."""
        self.worker.stop(timeout=self.settings.shutdown_grace_s / 2)
        self.engine.dispose()

    # ------------------------------------------------------------ profiling
    def expand(self, req: ProfileRequest) -> list[LatencyKey]:
        """The request's keys, bounded and deduplicated (:func:`latency_service.bounds.expand`)."""
        return bounds.expand(self.settings, req, self.torch_device.type)

    def plan_profile(self, req: ProfileRequest) -> tuple[list[LatencyKey], str]:
        """The request's keys (bounded, deduplicated) and the hash that identifies an identical
        request; remembered per body, since the bounds and this host's identity never change."""
        body_id = req.model_dump_json()
        planned = self.plans.get(body_id)
        if planned is None:
            keys = self.expand(req)
            body = {"device": self.device.slug, "env": self.env.fingerprint, "force": req.force,
                    "keys": sorted(k.canonical for k in keys)}
            planned = self.plans.put(body_id, (keys, hashlib.sha256(json.dumps(body).encode()).hexdigest()))
        return planned  # type: ignore[no-any-return]

    def submit_profile(self, req: ProfileRequest, client: str | None = None) -> tuple[Job, bool]:
        """Queue the request's keys (or return the identical active job). Bounds before anything
        is stored: keys per job (422, in :meth:`expand`), jobs per ``client`` (429) and keys
        queued on this device (503), each naming its setting."""
        generation = self.jobs_generation
        st = self.settings
        # one body at a time, from planning to the insert: concurrent plans of large bodies each
        # hold the interpreter lock for their whole expansion, and /health waited behind all of
        # them (bench/planning_stall.py); the bound check and the insert must not interleave either
        with self._planning:
            keys, request_hash = self.plan_profile(req)
            with self.sessions() as s:
                found = job_state.find_active(s, request_hash=request_hash)
                if found is not None:
                    job, created = found, False
                else:
                    bounds.check_queue(s, st, device_id=self.device_id, environment_id=self.environment_id, client=client,
                                       n_keys=len(keys))
                    job, created = job_state.create(
                        s, device_id=self.device_id, environment_id=self.environment_id, request_hash=request_hash,
                        keys=keys, force=req.force, client=client)
        if created:
            log.info("job %s queued: %d keys (force=%s)", job.id, job.total, req.force)
            self.worker.wake()
        if job.state in job_state.ACTIVE:
            self.active_jobs.put(request_hash, (job, time.monotonic() + st.table_version_ttl_s, generation))
        return job, created

    def known_active_job(self, req: ProfileRequest) -> Job | None:
        """The active job of a request this host planned and answered moments ago, without a
        database query or a thread (``None``: ask :meth:`submit_profile`)."""
        planned = self.plans.get(req.model_dump_json())
        hit = self.active_jobs.get(planned[1]) if planned is not None else None
        if hit is None:
            return None
        job, expires, generation = hit
        return job if time.monotonic() < expires and generation == self.jobs_generation else None  # type: ignore[no-any-return]

    def job_ended(self, request_hash: str | None = None) -> None:
        """A job of this host ended or was cancelled: a resent request must reach the database,
        and the job's plan (``request_hash``; every plan when unknown) is dropped, so a cancelled
        large body keeps no memory."""
        self.jobs_generation += 1
        dropped = self.plans.discard(lambda _k, plan: request_hash is None or plan[1] == request_hash)
        self.active_jobs.discard(lambda k, _v: request_hash is None or k == request_hash)
        if dropped:
            log.debug("dropped %d planned bodies (%d bytes of plans left)", dropped, self.plans.weight)

    # ------------------------------------------------------------ end-to-end
    def check_measure_bounds(self, req: MeasureRequest) -> None:
        bounds.check_measure_bounds(self.settings, req, self.torch_device.type)

    def measure(self, req: MeasureRequest) -> MeasurePublic:
        """Time the derived network end to end on the calling thread (:func:`latency_service.e2e.measure`)."""
        return e2e.measure(self.spec, self.sessions, req)
