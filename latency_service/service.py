"""The host service object shared by the HTTP app and the CLI: settings, database, this host's
device and environment, the device worker, and the operations both front ends need."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gas_core.genotype import Genotype
from gas_core.keys import MAX_US, LatencyKey, key_pixels
from gas_core.latency import MissingLatencyKeys, predict_latency_us
from gas_core.network import GASNet
from gas_core.ops import check_key
from gas_core.quality import HostNoise, agreement, median_se, predict_with_uncertainty
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.wire import MeasurePublic, MeasureRequest, ProfileRequest
from latency_service import crud, db
from latency_service.core.config import Settings
from latency_service.device import (
    DeviceIdentity,
    EnvironmentIdentity,
    environment,
    host_cpus,
    identify,
    resolve_device,
)
from latency_service.jobs import DeviceRunner, DeviceWorker, Trust
from latency_service.models import Job
from latency_service.profiler import Method, default_flush_bytes, time_network, time_reference
from latency_service.worker_process import WorkerProcess

log = logging.getLogger(__name__)


class LRU:
    """A small thread-safe LRU (rendered table responses, planned profile requests), bounded in
    entries and, with ``weigh``, in the sum of its values' weights (bytes): one large value must
    not pin memory that sixty-four small ones would not."""

    def __init__(self, size: int = 64, *, capacity: int | None = None,
                 weigh: Callable[[Any], int] | None = None) -> None:
        self.size, self.capacity, self.weigh = size, capacity, weigh
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key][0]
            return None

    def put(self, key: Hashable, value: Any) -> Any:
        w = self.weigh(value) if self.weigh is not None else 0
        with self._lock:
            self._drop_locked(key)
            if self.capacity is None or w <= self.capacity:
                self._data[key] = (value, w)
                self.weight += w
            while len(self._data) > self.size or (self.capacity is not None and self.weight > self.capacity):
                self._drop_locked(next(iter(self._data)))
        return value

    def discard(self, predicate: Callable[[Hashable, Any], bool]) -> int:
        """Drop every entry for which ``predicate(key, value)`` holds; returns how many."""
        with self._lock:
            gone = [k for k, (v, _) in self._data.items() if predicate(k, v)]
            for k in gone:
                self._drop_locked(k)
        return len(gone)

    def _drop_locked(self, key: Hashable) -> None:
        if key in self._data:
            self.weight -= self._data.pop(key)[1]

    def __len__(self) -> int:
        return len(self._data)


PLAN_BYTES_PER_KEY = 1400
"""Memory a planned key holds in the plan cache (the parsed key, its canonical string in the
request hash's list): about 28 MB for a 19,836-key body in the probe that found the leak."""


class Overloaded(RuntimeError):
    """A bound on queued work was reached: the API answers ``status`` with ``Retry-After``."""

    def __init__(self, message: str, status: int, retry_after_s: int) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


def pin_cpus(settings: Settings) -> None:
    """Apply ``GAS_CPU_AFFINITY`` to this process (and the threads it starts later)."""
    cpus = settings.cpu_set()
    if cpus is None:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError) as err:
        raise ValueError(f"GAS_CPU_AFFINITY={settings.cpu_affinity}: cannot pin to these CPUs "
                         f"(this host has {sorted(os.sched_getaffinity(0))} available): {err}") from None
    log.info("pinned to CPUs %s", settings.cpu_affinity)


@dataclass(frozen=True)
class Rendered:
    """One table response, rendered once: its bytes, gzip-compressed bytes and ETag."""

    body: bytes
    gzip_body: bytes
    media: str
    etag: str
    environment: str

    @classmethod
    def of(cls, body: bytes, media: str, environment: str) -> Rendered:
        media = f"{media}; charset=utf-8" if media.startswith("text/") else media
        return cls(body, gzip.compress(body, 6), media, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', environment)

    def answer(self, if_none_match: str | None, accept_encoding: str | None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for a request with these headers: 304 when its ETag matches,
        gzip bytes when the client accepts them. One place for both ways a table is served (the
        route and the cached-read fast path)."""
        headers = {"ETag": self.etag, "X-GAS-Environment": self.environment, "Cache-Control": "no-cache",
                   "Vary": "Accept-Encoding"}
        if if_none_match is not None and etag_matches(if_none_match, self.etag):
            return 304, headers, b""
        if accept_encoding is not None and "gzip" in accept_encoding.lower():
            return 200, {**headers, "Content-Type": self.media, "Content-Encoding": "gzip"}, self.gzip_body
        return 200, {**headers, "Content-Type": self.media}, self.body


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*`` matches any current representation, and If-None-Match uses the
    weak comparison, so ``W/"x"`` matches ``"x"``."""
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in [t.removeprefix("W/") for t in tags]


@dataclass(frozen=True)
class TableScope:
    """Which rows a table request reads: one device and environment, each filter ``None`` for
    any. A write outside it (another batch, dtype, op) leaves that request's answer valid."""

    device_id: int
    environment_id: int
    dtype: str | None = None
    batch: int | None = None
    memory_format: str | None = None
    op: str | None = None

    def touched_by(self, write: TableWrite | None) -> bool:
        if write is None:  # rows unknown (an import, flags set on a stretch of keys)
            return True
        k = write.key
        return (write.device_id == self.device_id and write.environment_id == self.environment_id
                and all(f is None or f == v for f, v in ((self.dtype, k.dtype), (self.batch, k.batch),
                                                         (self.memory_format, k.memory_format), (self.op, k.op))))


@dataclass(frozen=True)
class TableWrite:
    """One row this host stored."""

    device_id: int
    environment_id: int
    key: LatencyKey


class TableCache:
    """Rendered tables by version, and which version each request saw last. A request seen less
    than ``ttl_s`` ago with no write by this host *to the rows it reads* since is answered without
    touching the database: under load the device/environment/version queries, not the bytes, were
    what cost (64 clients: p50 0.26–0.56 s, p99 1.8–4.0 s on a 44 KB table), and while a job runs
    a write lands every ~0.1 s. Rows written by other hosts of a fleet show within ``ttl_s``."""

    WRITE_LOG = 4096
    """Writes remembered to decide whether a remembered answer is still valid; an answer older
    than the log is treated as stale."""

    def __init__(self, ttl_s: float, size: int = 256) -> None:
        self.ttl_s = ttl_s
        self._rendered = LRU(size)
        self._recent = LRU(size)
        self._generation = 0
        self._writes: deque[tuple[int, TableWrite | None]] = deque(maxlen=self.WRITE_LOG)
        self._lock = threading.Lock()  # the worker thread writes, the event loop reads
        self._inflight: dict[Hashable, tuple[int, asyncio.Future[Rendered]]] = {}

    @property
    def generation(self) -> int:
        """Bumped by every write of this host; read it *before* a lookup that ``remember`` records."""
        return self._generation

    async def current(self, request: Hashable, lookup: Callable[[int], Awaitable[Rendered]]) -> Rendered:
        """The rendered table for ``request``: remembered, else from one ``lookup(generation)``
        shared by every request that misses meanwhile. While a job writes rows, each write makes
        the next reads miss at once; 64 clients each querying the database for the same answer
        was most of the service's cost under load. Event-loop only (no lock needed); a client
        that disconnects does not cancel the lookup the others wait on."""
        hit = self.recent(request)
        if hit is not None:
            return hit
        gen = self._generation
        flight = self._inflight.get(request)
        if flight is None or flight[0] != gen:  # none, or started before a write: its answer may be stale
            fut = asyncio.ensure_future(lookup(gen))
            self._inflight[request] = (gen, fut)
            fut.add_done_callback(lambda done: self._forget(request, done))
            flight = (gen, fut)
        return await asyncio.shield(flight[1])

    def _forget(self, request: Hashable, done: asyncio.Future[Rendered]) -> None:
        if self._inflight.get(request, (0, None))[1] is done:
            del self._inflight[request]

    def rendered(self, version: Hashable) -> Rendered | None:
        return self._rendered.get(version)  # type: ignore[no-any-return]

    def put(self, version: Hashable, rendered: Rendered) -> Rendered:
        return self._rendered.put(version, rendered)  # type: ignore[no-any-return]

    def recent(self, request: Hashable) -> Rendered | None:
        """The remembered answer to ``request`` if its TTL holds and no write since touched its rows."""
        hit = self._recent.get(request)
        if hit is None:
            return None
        rendered, generation, expires, scope = hit
        if time.monotonic() >= expires:
            return None
        with self._lock:
            now = self._generation
            if generation != now:
                if not self._writes or self._writes[0][0] > generation + 1:
                    return None  # writes since then have left the log
                if any(gen > generation and scope.touched_by(w) for gen, w in self._writes):
                    return None
        if generation != now:  # still valid: the writes since were elsewhere; skip them next time
            self._recent.put(request, (rendered, now, expires, scope))
        return rendered  # type: ignore[no-any-return]

    def remember(self, request: Hashable, rendered: Rendered, generation: int, scope: TableScope) -> None:
        """``rendered`` answers ``request`` until the TTL passes or this host writes into ``scope``
        after ``generation`` (the generation read before the lookup: a write during it is not missed)."""
        self._recent.put(request, (rendered, generation, time.monotonic() + self.ttl_s, scope))

    def invalidate(self, write: TableWrite | None = None) -> None:
        """This host wrote ``write`` (``None``: rows it cannot name): answers that read it are stale."""
        with self._lock:
            self._generation += 1
            self._writes.append((self._generation, write))


class RequestError(ValueError):
    """Bad input; the message names the field. The API maps it to 422, the CLI to exit 2."""


def configure_torch(settings: Settings, tdev: torch.device) -> None:
    """CPU pinning, torch threads and cuDNN autotuning, the same in every process that times
    (they are part of the environment fingerprint)."""
    pin_cpus(settings)
    if tdev.type == "cpu":
        torch.set_num_threads(settings.cpu_threads or host_cpus())
    else:
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark


@dataclass(frozen=True)
class HostSpec:
    """Everything a device worker needs, computed once at start-up; picklable, so a worker
    process gets the identity the API registered instead of identifying the host again."""

    settings: Settings
    torch_device: torch.device
    device: DeviceIdentity
    env: EnvironmentIdentity
    device_id: int
    environment_id: int
    method: Method
    trust: Trust

    @classmethod
    def prepare(cls, settings: Settings, sessions: sessionmaker[Session]) -> HostSpec:
        """Configure torch, identify this host and register it in the (migrated) database."""
        tdev = resolve_device(settings.device)
        configure_torch(settings, tdev)
        ident = identify(tdev)
        flush = settings.timing_flush_bytes
        if flush is None:
            flush = default_flush_bytes(tdev, settings.timing_flush_level)
        context = settings.context_timing(tdev.type)
        timing = f"context+flush{flush}" if context else "isolated"
        env = environment(tdev, torch.get_num_threads(), settings.cudnn_benchmark, timing, settings.cpu_affinity)
        with sessions() as s:
            dev_row = crud.get_or_create_device(s, ident=ident)
            env_row = crud.get_or_create_environment(s, device=dev_row, ident=env)
            device_id, env_id = dev_row.id, env_row.id
        method = Method(
            warmup_runs=settings.warmup_runs, warmup_ms=settings.warmup_ms, samples=settings.samples,
            min_sample_ms=settings.min_sample_ms, max_iters_per_sample=settings.max_iters_per_sample,
            context=context, flush_bytes=flush, context_min_sample_ms=settings.context_min_sample_ms,
        )
        trust = Trust(policy=settings.quality_policy(), retime_max=settings.retime_max,
                      retime_pause_s=settings.retime_pause_s, reference_every_s=settings.reference_every_s,
                      reference_drift_pct=settings.reference_drift_pct)
        return cls(settings, tdev, ident, env, device_id, env_id, method, trust)

    def device_worker(self, sessions: sessionmaker[Session]) -> DeviceWorker:
        """The worker thread for this host (not started)."""
        return DeviceWorker(sessions, self.torch_device, self.device_id, self.environment_id, self.method,
                            owner=self.settings.worker_id, stale_s=self.settings.job_stale_s, trust=self.trust)


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
        cache = TableCache(settings.table_version_ttl_s)
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
        host = cls(spec, worker, engine, sessions, cache or TableCache(spec.settings.table_version_ttl_s),
                   plans=LRU(64, capacity=spec.settings.plan_cache_bytes,
                             weigh=lambda plan: PLAN_BYTES_PER_KEY * len(plan[0])))
        if isinstance(worker, DeviceWorker):
            worker.measure = host.measure
        return host

    def close(self) -> None:
        """Stop the worker (also one between two lives of a worker process: it must not be
        restarted while the service exits) and release the database."""
        self.worker.stop(timeout=self.settings.shutdown_grace_s / 2)
        self.engine.dispose()

    # ------------------------------------------------------------ profiling
    def check_key_bounds(self, key: LatencyKey, where: str) -> None:
        s = self.settings
        try:
            check_key(key)
        except ValueError as err:
            raise RequestError(f"{where}: {err}") from None
        for name in ("c_in", "c_out"):
            if getattr(key, name) > s.max_channels:
                raise RequestError(f"{where}.{name}: {getattr(key, name)} exceeds the bound {s.max_channels}")
        if key.batch > s.max_batch:
            raise RequestError(f"{where}.batch: {key.batch} exceeds the bound {s.max_batch}")
        if max(key.h, key.w) > s.max_side:
            raise RequestError(f"{where}.h/w: {key.h}×{key.w} exceeds the bound {s.max_side} per side")
        if key_pixels(key) > s.max_elements:
            raise RequestError(f"{where}: activation of {key_pixels(key)} elements exceeds {s.max_elements}")

    def expand(self, req: ProfileRequest) -> list[LatencyKey]:
        """The request's keys, deduplicated, in order, each checked against the bounds. A layout
        request is deduplicated and bounded *before* it is expanded: its size is known from one
        configuration's keys times the distinct batches, dtypes and memory formats, so a small
        body that asks for millions of keys costs nothing."""
        if req.keys is not None:
            if len(req.keys) > self.settings.max_keys_per_job:
                raise RequestError(f"keys: {len(req.keys)} exceed the bound "
                                   f"GAS_MAX_KEYS_PER_JOB={self.settings.max_keys_per_job}")
            keys = list(dict.fromkeys(req.keys))
            for i, k in enumerate(keys):
                self.check_key_bounds(k, f"keys[{i}]")
        else:
            assert req.layout is not None and req.input_size is not None
            keys = self._expand_layout(req.layout, req.input_size, req)
        if len(keys) > self.settings.max_keys_per_job:
            raise RequestError(f"keys: {len(keys)} exceed the bound GAS_MAX_KEYS_PER_JOB={self.settings.max_keys_per_job}")
        return keys

    def _expand_layout(self, layout: NetworkLayout, size: tuple[int, int], req: ProfileRequest) -> list[LatencyKey]:
        st = self.settings
        h, w = size
        if max(h, w) > st.max_side:
            raise RequestError(f"input_size: {h}×{w} exceeds the bound {st.max_side} per side")
        batches = list(dict.fromkeys(req.batches))
        dtypes = list(dict.fromkeys(req.dtypes))
        formats = list(dict.fromkeys(req.memory_formats))
        for b in batches:
            if b > st.max_batch:
                raise RequestError(f"batches: {b} exceeds the bound {st.max_batch}")
        try:
            one = cell_shapes(layout, (h, w), max(batches), dtypes[0], formats[0]).all_keys()
        except ValueError as err:  # a key the layout implies fails its own bounds (pydantic's error is one)
            raise RequestError(f"layout: implies a latency key out of bounds ({str(err).splitlines()[0]})") from None
        for k in one:  # channels and the largest activation do not depend on dtype or memory format
            self.check_key_bounds(k, "layout")
        if len(one) * len(batches) * len(dtypes) * len(formats) > st.max_keys_per_job:
            raise RequestError(f"layout: {len(one)} keys × {len(batches)} batches × {len(dtypes)} dtypes × "
                               f"{len(formats)} memory formats exceed the bound GAS_MAX_KEYS_PER_JOB={st.max_keys_per_job}")
        seen: dict[str, LatencyKey] = {}
        for b in batches:
            for dt in dtypes:
                for mf in formats:
                    for k in cell_shapes(layout, (h, w), b, dt, mf).all_keys():
                        seen.setdefault(k.canonical, k)
                    time.sleep(0)  # hand the interpreter lock to the event loop between configurations
        return list(seen.values())

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
                found = crud.find_active_job(s, request_hash=request_hash)
                if found is not None:
                    job, created = found, False
                else:
                    self._check_queue(s, client, len(keys))
                    job, created = crud.create_job(
                        s, device_id=self.device_id, environment_id=self.environment_id, request_hash=request_hash,
                        keys=keys, force=req.force, client=client)
        if created:
            log.info("job %s queued: %d keys (force=%s)", job.id, job.total, req.force)
            self.worker.wake()
        if job.state in crud.ACTIVE:
            self.active_jobs.put(request_hash, (job, time.monotonic() + st.table_version_ttl_s, generation))
        return job, created

    def _check_queue(self, session: Session, client: str | None, n_keys: int) -> None:
        st = self.settings
        if client is not None:
            held = crud.active_jobs_of(session, client=client)
            if held >= st.max_jobs_per_client:
                raise Overloaded(f"jobs: this client already has {held} queued or running jobs, the bound "
                                 f"GAS_MAX_JOBS_PER_CLIENT={st.max_jobs_per_client}; wait for one to end or cancel "
                                 "one (DELETE /jobs/{id})", 429, 30)
        queued = crud.queued_keys(session, device_id=self.device_id, environment_id=self.environment_id)
        if queued + n_keys > st.max_queued_keys:
            raise Overloaded(f"keys: {queued} keys already wait for this device and this request adds {n_keys}, "
                             f"beyond the bound GAS_MAX_QUEUED_KEYS={st.max_queued_keys}; retry when the queue has "
                             "drained", 503, 60)

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
        """Every width and the largest activation of the network, before anything is built: the
        keys of ``cell_shapes`` at this input are exactly the components the network runs, so
        each is checked against the channel, side and element bounds (a stem of 8192 channels at
        3584² would otherwise try to allocate tens of GB)."""
        s = self.settings
        h, w = req.input_size
        if max(h, w) > s.max_side:
            raise RequestError(f"input_size: {h}×{w} exceeds the bound {s.max_side} per side")
        if req.batch > s.max_batch:
            raise RequestError(f"batch: {req.batch} exceeds the bound {s.max_batch}")
        layout = req.genotype.layout
        if req.num_classes is not None:
            layout = layout.model_copy(update={"num_classes": req.num_classes})
        widths = {"stem_channels": max(layout.stem_channels), "head_channels": layout.head_channels,
                  "num_classes": layout.num_classes,
                  "init_channels": layout.cell_channels(layout.num_cells - 1) * layout.nodes}
        for name, c in widths.items():
            if c > s.max_channels:
                raise RequestError(f"genotype.layout.{name}: a width of {c} channels exceeds the bound {s.max_channels}")
        for k in cell_shapes(layout, (h, w), req.batch, req.dtype, req.memory_format).all_keys():
            self.check_key_bounds(k, "genotype.layout")

    def measure(self, req: MeasureRequest) -> MeasurePublic:
        """Time the derived network end to end and predict it from this host's table.
        Runs on the calling thread: the API calls it through the worker."""
        genotype: Genotype = req.genotype
        if req.num_classes is not None:
            genotype = genotype.model_copy(
                update={"layout": genotype.layout.model_copy(update={"num_classes": req.num_classes})}
            )
        net = GASNet(genotype)
        st = self.settings
        method = Method(warmup_runs=st.e2e_warmup_runs, warmup_ms=st.warmup_ms, samples=st.e2e_samples,
                        min_sample_ms=st.min_sample_ms, max_iters_per_sample=st.max_iters_per_sample)
        shapes = cell_shapes(genotype.layout, req.input_size, req.batch, req.dtype, req.memory_format)
        with self.sessions() as s:
            rows = crud.row_stats(s, device_id=self.device_id, environment_id=self.environment_id)
            noise = crud.latest_host_noise(s, device_id=self.device_id, environment_id=self.environment_id)
        # a row beyond the bound (stored before imports were bounded) counts as missing: a sum of
        # 1e308s overflows, and no prediction rests on such a row
        rows = {k: r for k, r in rows.items() if 0 <= r.median_us <= MAX_US}
        predicted: float | None
        missing: list[str] = []
        try:
            predicted = predict_latency_us(genotype, shapes, {k: r.median_us for k, r in rows.items()})
        except MissingLatencyKeys as err:
            predicted, missing = None, [k.canonical for k in err.missing]
        # the reference right before the network: how the host runs now against while the table was timed
        reference_us = time_reference(self.torch_device).median_us if predicted is not None and noise else None
        timing = time_network(net, req.input_size, req.batch, req.dtype, req.memory_format, self.torch_device, method)
        summ = timing.summary()
        median = float(summ["median_us"])
        agree = None
        if predicted is not None:
            agree = agreement(
                predict_with_uncertainty(genotype, shapes, rows), median, median_se(timing.samples_us),
                measured_spread=(float(summ["p90_us"]) - float(summ["p10_us"])) / median if median > 0 else None,
                host_drift_pct=_drift_pct(noise, reference_us), drift_threshold_pct=st.reference_drift_pct,
            )
        with self.sessions() as s:
            crud.add_e2e(
                s, device_id=self.device_id, environment_id=self.environment_id,
                genotype=json.loads(genotype.model_dump_json()),
                genotype_hash=hashlib.sha256(genotype.model_dump_json().encode()).hexdigest(),
                input_h=req.input_size[0], input_w=req.input_size[1], batch=req.batch, dtype=req.dtype,
                memory_format=req.memory_format, median_us=median, p90_us=summ["p90_us"], mean_us=summ["mean_us"],
                std_us=summ["std_us"], n_samples=summ["n_samples"], iters_per_sample=summ["iters_per_sample"],
                fps=req.batch * 1e6 / median, predicted_us=predicted, samples=timing.samples_blob(),
            )
        return MeasurePublic(
            device=self.device.slug, environment=self.env.fingerprint, input_size=req.input_size, batch=req.batch,
            dtype=req.dtype, memory_format=req.memory_format, median_ms=median / 1e3,
            p10_ms=float(summ["p10_us"]) / 1e3, p90_ms=float(summ["p90_us"]) / 1e3, mean_ms=float(summ["mean_us"]) / 1e3,
            std_ms=float(summ["std_us"]) / 1e3, n_samples=int(summ["n_samples"]), fps=req.batch * 1e6 / median,
            predicted_ms=None if predicted is None else predicted / 1e3, missing_keys=missing,
            error_pct=None if predicted is None else (predicted - median) / median * 100, agreement=agree,
        )


def _drift_pct(noise: HostNoise | None, reference_now_us: float | None) -> float | None:
    """The reference workload now against its median over the job that timed the table, %."""
    if noise is None or not noise.points or reference_now_us is None:
        return None
    then = statistics.median(p.median_us for p in noise.points)
    return (reference_now_us / then - 1) * 100 if then > 0 else None
