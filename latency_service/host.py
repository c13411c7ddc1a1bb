"""This host as the service times on it: CPU pinning and torch settings applied the same in
every process that times, and the identity (:class:`HostSpec`) computed once at start-up and
registered in the database, which the device worker (thread or process) runs on."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session, sessionmaker

from gas_core.devices import resolve_device
from latency_service import crud
from latency_service.core.config import Settings
from latency_service.device import DeviceIdentity, EnvironmentIdentity, environment, host_cpus, host_load, identify
from latency_service.jobs import DeviceWorker, Trust
from latency_service.profiler import Method, default_flush_bytes

log = logging.getLogger(__name__)


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
        tdev = resolve_device(settings.device, name="GAS_DEVICE")
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
                      reference_drift_pct=settings.reference_drift_pct,
                      reference_drift_z=settings.reference_drift_z, busy=settings.busy(),
                      on_busy=settings.busy_policy, busy_block=settings.busy_block,
                      busy_recheck_s=settings.busy_recheck_s, busy_wait_s=settings.busy_wait_s,
                      key_budget_s=settings.key_budget_s, job_budget_s=settings.job_budget_s)
        return cls(settings, tdev, ident, env, device_id, env_id, method, trust)

    def device_worker(self, sessions: sessionmaker[Session]) -> DeviceWorker:
        """The worker thread for this host (not started)."""
        return DeviceWorker(sessions, self.torch_device, self.device_id, self.environment_id, self.method,
                            owner=self.settings.worker_id, stale_s=self.settings.job_stale_s, trust=self.trust,
                            load_probe=host_load if self.settings.busy_check else None)

