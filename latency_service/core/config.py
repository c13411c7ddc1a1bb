"""Service settings: pydantic-settings with the ``GAS_`` prefix, validated once at start-up."""

from __future__ import annotations

import socket
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gas_core.keys import RUNTIMES
from gas_core.quality import BusyPolicy, QualityPolicy


class Settings(BaseSettings):
    """Every knob of the service. Bounds keep a single request from exhausting the host."""

    model_config = SettingsConfigDict(env_prefix="GAS_", env_file=None, extra="ignore")

    database_url: str = "sqlite:///./gas.db"
    db_wait_s: float = Field(default=0.0, ge=0, le=3600,
                             description="at start-up, retry an unreachable database for this long (containers)")
    api_token: str | None = Field(
        default=None, description="when set, mutating routes need 'Authorization: Bearer <token>'"
    )
    read_token: str | None = Field(
        default=None, description="when set, read routes (tables, devices, jobs, compare) need this token or "
        "api_token as 'Authorization: Bearer <token>'; /health and the docs stay open")
    device: str = Field(default="auto", description="'auto' (cuda:0 if present, else cpu), 'cpu' or 'cuda:N'")
    cpu_threads: int = Field(default=0, ge=0, le=512, description="torch threads on CPU; 0 = all of this host's CPUs")
    cudnn_benchmark: bool = True

    # profiler method (docs/timing.md); stored with every row
    warmup_runs: int = Field(default=10, ge=1, le=10_000)
    warmup_ms: float = Field(default=50.0, ge=0, le=60_000)
    samples: int = Field(default=30, ge=3, le=10_000)
    min_sample_ms: float = Field(default=1.0, gt=0, le=10_000)
    max_iters_per_sample: int = Field(default=10_000, ge=1)
    timing_context: bool | None = Field(
        default=None,
        description="time each key after a context of other kernels (paired difference), as it runs inside "
        "a network; False times it back-to-back with itself (isolated). Unset: by device, as measured "
        "(docs/timing.md) — context on a CPU, isolated on a GPU. Part of the environment fingerprint.",
    )
    context_min_sample_ms: float = Field(default=5.0, gt=0, le=10_000,
                                         description="shortest sample with context timing (paired differences)")
    timing_flush_bytes: int | None = Field(
        default=None, ge=0, description="bytes the timing context writes to evict caches; unset = from "
        "timing_flush_level, read from this host"
    )
    timing_flush_level: Literal["l2", "llc"] = Field(
        default="l2", description="cache the default flush is sized from, as this host reports it: twice the "
        "per-core L2 (l2) or twice the last cache level (llc; a GPU's L2 either way). llc made CPU predictions "
        "worse where the network fits in the L3 (docs/timing.md)")
    runtimes: str | None = Field(
        default=None, pattern=r"^[a-z_]+(,[a-z_]+)*$",
        description="runtimes this host offers, comma-separated (e.g. 'eager,onnxruntime'): an operator of a shared "
        "host may not want whole-network compiles on it. Unset = every runtime installed here. A runtime named here "
        "but not installed is still refused, with what to install")
    cpu_affinity: str | None = Field(
        default=None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$",
        description="CPUs the service may run on, e.g. '0-3' or '0,2' (sched_setaffinity; pins timing away from "
        "other work); recorded in the environment fingerprint. Unset = every CPU the process may use")

    # trust in the figures (docs/timing.md, "Trusting the figures")
    quality_max_spread: float = Field(default=1.5, gt=0, description="a row whose (p90 − p10) / median exceeds "
                                      "this is unstable: re-timed, then stored flagged")
    quality_max_nonpositive: float = Field(default=0.1, ge=0, le=1, description="a row with a larger share of "
                                           "samples ≤ 0 (paired differences) is unstable")
    quality_resolution_us: float = Field(default=5.0, ge=0, description="medians below this are at the timer's "
                                         "resolution: their spread is judged in µs against it")
    retime_max: int = Field(default=2, ge=0, le=10, description="re-timings of an unstable key before it is stored "
                            "flagged")
    retime_pause_s: float = Field(default=1.0, ge=0, le=60, description="pause before each re-timing (lets a burst "
                                  "of other work on the host pass)")
    reference_every_s: float = Field(default=30.0, gt=0, description="seconds between two timings of the host's "
                                     "reference workload during a job (also timed at its start and end)")
    reference_drift_pct: float = Field(default=10.0, gt=0, description="drift of the reference workload beyond "
                                       "which the keys timed meanwhile are flagged")
    reference_drift_z: float = Field(default=6.0, ge=0, description="...and beyond this many times the job's "
                                     "point-to-point wander of the reference (from its bursts' spread), so a host's "
                                     "own second-to-second wander does not flag every key (0 = the percentage "
                                     "threshold alone)")

    # a busy host (docs/timing.md, "A busy host")
    busy_check: bool = Field(default=True, description="look at the host before a job and at every reference point "
                             "(the other processes' CPU use, the reference workload against the environment's quiet "
                             "calibration) and apply GAS_BUSY_POLICY when it is busy; false = the reference's drift "
                             "within a job alone, as before")
    busy_policy: Literal["stop", "wait", "robust"] = Field(
        default="stop", description="what a job does when the host is busy (judged before its first key and at "
        "every reference point): stop = fail the job at once with the figures that showed it (no method tested "
        "kept a busy host's op ranking: docs/timing.md); wait = re-check every GAS_BUSY_RECHECK_S until quiet, "
        "stopping after GAS_BUSY_WAIT_S; robust = go on timing each key directly after its context, each sample "
        "the fastest of GAS_BUSY_BLOCK runs, every row flagged")
    busy_slow_pct: float = Field(default=150.0, gt=0, description="busy when the reference workload's median is this "
                                 "far above the environment's quiet calibration, %")
    busy_tail_factor: float = Field(default=6.0, gt=1, description="...or its p90 this many times the quiet median")
    busy_spare_cores: float = Field(default=0.5, ge=0, description="...or other processes leave fewer than "
                                    "(timing threads − this) cores free")
    busy_block: int = Field(default=5, ge=1, le=1000, description="robust method: each sample is the fastest of "
                            "this many single runs")
    busy_recheck_s: float = Field(default=30.0, gt=0, le=3600, description="wait policy: seconds between checks")
    busy_wait_s: float = Field(default=600.0, ge=0, le=86_400, description="wait policy: stop the job when the host "
                               "is still busy after this long")
    key_budget_s: float = Field(default=10.0, gt=0, le=3600, description="seconds one key may take, re-timings "
                                "included (about 3× a key's quiet cost on a 2-core CPU, 0.5–3 s); past it the key "
                                "is stored with the samples it has, flagged")
    job_budget_s: float | None = Field(default=None, gt=0, description="seconds one job may time for before it "
                                       "stops (keys timed so far stay stored); unset = its keys × "
                                       "GAS_KEY_BUDGET_S / 3, with 120 s at least")

    # end-to-end measurement
    e2e_warmup_runs: int = Field(default=5, ge=1)
    e2e_samples: int = Field(default=20, ge=3, le=10_000)

    worker_process: bool = Field(default=True, description="run the device worker in a child process of the HTTP "
                                 "service, so timings never wait for the API's interpreter lock (under 64 clients "
                                 "a worker thread advanced a job ~15× slower); False keeps it a thread")
    measure_queue: int = Field(default=4, ge=1, le=1000, description="measurements that may wait for the device; "
                               "more get 503 with Retry-After")
    shutdown_grace_s: float = Field(default=8.0, ge=0, le=300, description="on SIGTERM, seconds to let requests "
                                    "and the key in flight finish before exiting (Docker allows 10)")

    table_version_ttl_s: float = Field(default=1.0, ge=0, le=3600, description="GET /table answers from its "
                                       "pre-rendered bytes for this long after it last read the table's version "
                                       "(this host's own writes are seen at once; other hosts' within this); a "
                                       "resent POST /profile returns its active job from memory for as long")

    # request bounds
    max_channels: int = Field(default=4096, ge=1)
    max_batch: int = Field(default=64, ge=1)
    max_side: int = Field(default=4096, ge=1, description="largest H or W of a key or a measured input")
    max_elements: int = Field(default=2**28, ge=1, description="largest activation (N·C·H·W) a request may allocate")
    max_keys_per_job: int = Field(default=5_000, ge=1, description="keys one /profile may queue (the default layout "
                                  "is 58 keys per batch × dtype × memory format); more is a 422")
    max_queued_keys: int = Field(default=20_000, ge=1, description="keys not yet timed over every queued or running "
                                 "job of this device and environment; a /profile that would pass it gets 503 with "
                                 "Retry-After (hours of device time are already waiting)")
    max_jobs_per_client: int = Field(default=4, ge=1, description="queued or running jobs one client may hold (a "
                                     "client is its address, with its bearer token when that is a configured one); "
                                     "more gets 429 with Retry-After")
    max_client_keys: int = Field(default=5_000, ge=1, description="keys not yet timed that one client may hold over "
                                 "its queued and running jobs (a quarter of GAS_MAX_QUEUED_KEYS by default, so no "
                                 "client fills the device's queue); more gets 429 with Retry-After")
    forwarded_allow_ips: str | None = Field(
        default=None, description="comma-separated addresses of reverse proxies whose X-Forwarded-For names the "
        "client (uvicorn's --forwarded-allow-ips); unset: no header is trusted, the peer address is the client")
    plan_cache_bytes: int = Field(default=16 * 2**20, ge=0, description="memory for planned /profile bodies "
                                  "(about 1.4 kB a key); the least recently used are dropped beyond it, and a plan "
                                  "is dropped when its job ends or is cancelled")
    table_cache_bytes: int = Field(default=64 * 2**20, ge=0, description="memory for rendered GET /table and "
                                   "/compare responses (plain and gzip bytes); the least recently used are dropped "
                                   "beyond it")
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="a request whose body is not complete "
                                  "this many seconds after its head is closed (a slow or absent body held a "
                                  "connection for ever)")
    header_timeout_s: float = Field(default=10.0, gt=0, le=600, description="a connection that has not sent a "
                                    "complete request head within this many seconds is closed (slow-header "
                                    "clients); also bounds the wait for the next request on a kept-alive connection")
    max_json_body_bytes: int = Field(default=4 * 2**20, ge=1024, description="largest body of /profile and /measure "
                                     "(a 5,000-key profile is about 1 MiB): JSON is decoded holding the interpreter "
                                     "lock, so a 60 MiB body of tiny arrays stalled every request for 10 s; larger "
                                     "ones get 413 (/table/import keeps GAS_MAX_BODY_BYTES)")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024, description="largest request body; larger ones get 413 "
                                "before they are parsed (a full table export with every raw sample is a few MB)")

    # fleet: hosts sharing a database
    worker_id: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=128,
        description="this host's name in job ownership; a restarted service resumes the running jobs of its own id "
        "at once, and those of other hosts only once their heartbeat is older than job_stale_s",
    )
    job_stale_s: float = Field(default=300.0, gt=0, description="seconds without progress before another host of the "
                               "same device and environment may take a running job over")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("api_token", "read_token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return v or None  # GAS_API_TOKEN= (empty, as docker compose passes an unset variable) means no token

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("sqlite") or v.startswith("postgresql")):
            raise ValueError("GAS_DATABASE_URL must be sqlite:///… or postgresql+psycopg://…")
        return v

    def cpu_set(self) -> set[int] | None:
        """``cpu_affinity`` as a set of CPU numbers."""
        if self.cpu_affinity is None:
            return None
        cpus: set[int] = set()
        for part in self.cpu_affinity.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        return cpus

    def offered_runtimes(self) -> frozenset[str]:
        """``runtimes`` as a set (every registered runtime when unset)."""
        return frozenset(RUNTIMES if self.runtimes is None else self.runtimes.split(","))

    @field_validator("runtimes")
    @classmethod
    def _runtimes(cls, v: str | None) -> str | None:
        unknown = [r for r in v.split(",") if r not in RUNTIMES] if v is not None else []
        if unknown:
            raise ValueError(f"GAS_RUNTIMES: unknown runtime {unknown[0]!r}; known: {', '.join(RUNTIMES)}")
        return v

    def read_tokens(self) -> list[str] | None:
        """The bearer tokens a read accepts (the read token or the write token); ``None``: reads
        are open (no ``GAS_READ_TOKEN``)."""
        if self.read_token is None:
            return None
        return [t for t in (self.read_token, self.api_token) if t is not None]

    def context_timing(self, device_type: str) -> bool:
        """The timing method for a device of this type ("cpu", "cuda"): the setting when given,
        else context timing on a CPU and isolated timing on a GPU. On an H200 at 769×1537 the isolated sum predicted 13
        networks within 4.7 % and 3.3 % (median, two runs) and context timing over-predicted by
        12 % and 28 %; on 2-core CPUs context timing was the better one (docs/timing.md)."""
        return self.timing_context if self.timing_context is not None else device_type != "cuda"

    def quality_policy(self) -> QualityPolicy:
        return QualityPolicy(max_spread=self.quality_max_spread, max_nonpositive=self.quality_max_nonpositive,
                             resolution_us=self.quality_resolution_us)

    def busy(self) -> BusyPolicy:
        return BusyPolicy(slow_pct=self.busy_slow_pct, tail_factor=self.busy_tail_factor,
                          spare_cores=self.busy_spare_cores)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("GAS_DEVICE must be auto, cpu or cuda:N")
        return v


@lru_cache
def get_settings() -> Settings:
    return Settings()
