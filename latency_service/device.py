"""Who is timing: the device (hardware) and the environment (software that changes timings).

GPU identity comes from NVML (``nvidia-ml-py``, import name ``pynvml``) plus torch; with no GPU,
no driver or no NVML the identity is the CPU's — never a crash.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gas_core.quality import HostLoad
from gas_core.runtimes import REGISTRY, host_runtimes
from gas_core.table import environment_fingerprint
from latency_service.profiler import cpu_caches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceIdentity:
    slug: str
    kind: str  # cuda | cpu
    name: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvironmentIdentity:
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)


def slugify(text: str) -> str:
    text = re.sub(r"\(r\)|\(tm\)|cpu @ [\d.]+ghz|processor", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _nvml():  # type: ignore[no-untyped-def]
    """The initialised pynvml module, or None when NVML is absent or has no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as err:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded…
        log.debug("NVML unavailable: %s", err)
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_identity() -> DeviceIdentity:
    model = cpu_model()
    threads = host_cpus()
    cores = _physical_cores() or threads
    return DeviceIdentity(
        slug=f"cpu-{slugify(model)}-{threads}t",
        kind="cpu",
        name=model,
        info={"model": model, "cores": cores, "threads": threads, "machine": platform.machine(), **cpu_knobs(),
              "caches": {f"L{level}": size for level, size in cpu_caches().items()}},
    )


def _physical_cores() -> int | None:
    try:
        pairs = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                pairs.add((phys, core))
        return len(pairs) or None
    except OSError:
        return None


def gpu_identity(index: int) -> DeviceIdentity:
    props = torch.cuda.get_device_properties(index)
    info: dict[str, Any] = {
        "torch_name": props.name,
        "memory_bytes": props.total_memory,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "index": index,
    }
    name = props.name
    nv = _nvml()
    if nv is not None:
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            name = _str(nv.nvmlDeviceGetName(h))
            info.update(
                nvml_name=name,
                uuid=_str(nv.nvmlDeviceGetUUID(h)),
                memory_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
                driver=_str(nv.nvmlSystemGetDriverVersion()),
                max_sm_clock_mhz=int(nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
            )
        except Exception as err:
            log.warning("NVML query failed, using torch's identity: %s", err)
    return DeviceIdentity(slug=slugify(name if name.lower().startswith("nvidia") else f"nvidia {name}"),
                          kind="cuda", name=name, info=info)


def gpu_telemetry(index: int) -> dict[str, int | None]:
    """SM clock (MHz) and temperature (°C) now; ``None`` values without NVML."""
    nv = _nvml()
    if nv is None:
        return {"gpu_clock_mhz": None, "gpu_temp_c": None}
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        return {
            "gpu_clock_mhz": int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "gpu_temp_c": int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        }
    except Exception:
        return {"gpu_clock_mhz": None, "gpu_temp_c": None}


def _str(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def identify(device: torch.device) -> DeviceIdentity:
    return gpu_identity(device.index or 0) if device.type == "cuda" else cpu_identity()


def cpu_knobs() -> dict[str, Any]:
    """Host settings that change CPU timings and that the kernel reports: SMT on or off and the
    frequency governor of cpu0 (absent on most VMs). Only what is readable is included."""
    knobs: dict[str, Any] = {}
    for name, path in (("smt", "/sys/devices/system/cpu/smt/active"),
                       ("cpu_governor", "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")):
        try:
            knobs[name] = Path(path).read_text().strip()
        except OSError:
            continue
    return knobs


def environment(
    device: torch.device, threads: int, cudnn_benchmark: bool, timing: str = "context",
    cpu_affinity: str | None = None,
) -> EnvironmentIdentity:
    """The software that changes timings, including the timing method: tables measured with
    another method are another environment, never mixed; so are the versions of the runtimes
    installed apart from torch. On a CPU also the CPU affinity
    (``GAS_CPU_AFFINITY``) when set: pinned and unpinned tables are not mixed.
    (SMT and the governor are in the device's info, :func:`cpu_identity`: they describe the
    machine, and adding them here would orphan every table stored before they were recorded.)"""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": threads,
        "timing": timing,
        "python": platform.python_version(),
    }
    if device.type == "cpu" and cpu_affinity is not None:
        info["cpu_affinity"] = cpu_affinity
    # runtimes installed apart from torch (onnxruntime, tensorrt), by version: a table of one
    # version is never mixed with another's (eager, torch_compile and cuda_graph are torch's own)
    info["runtimes"] = {name: support["version"] for name, support in host_runtimes(device.type).items()
                        if support["available"] and REGISTRY[name].package is not None}
    if device.type == "cuda":
        nv = _nvml()
        info.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=cudnn_benchmark,
            driver=_str(nv.nvmlSystemGetDriverVersion()) if nv is not None else None,
        )
    return EnvironmentIdentity(fingerprint=environment_fingerprint(info), info=info)


def _cpu_jiffies(cpus: set[int], stat: Path) -> tuple[int, int]:
    """(busy, total) jiffies over ``cpus`` from /proc/stat: busy = user + nice + system + irq +
    softirq + steal (steal: time the hypervisor gave another guest), total adds idle + iowait."""
    busy = total = 0
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in fields[:8]] + [0] * max(0, 8 - len(fields))
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        b = user + nice + system + irq + softirq + steal
        busy += b
        total += b + idle + iowait
    return busy, total


def host_load(sample_s: float = 0.5, sleep: Callable[[float], None] = time.sleep,
              stat: Path = Path("/proc/stat")) -> HostLoad:
    """How busy the rest of this host is, sampled over ``sample_s`` while this process sleeps:
    the cores' worth of CPU time every other process used (this process's own CPU time over the
    sample, its threads still spinning down after a timing, taken out), and the load average.
    Where /proc/stat is unreadable (not Linux) only the load average is known and ``others_busy``
    is estimated from it."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    try:
        b0, t0 = _cpu_jiffies(set(cpus), stat)
    except (OSError, ValueError):
        return HostLoad(cpus=len(cpus), others_busy=min(float(len(cpus)), load1), load1=load1, sample_s=0.0)
    own0 = sum(os.times()[:2])
    w0 = time.monotonic()
    sleep(sample_s)
    b1, t1 = _cpu_jiffies(set(cpus), stat)
    own = (sum(os.times()[:2]) - own0) * os.sysconf("SC_CLK_TCK")  # this process's jiffies meanwhile
    wall = time.monotonic() - w0
    others = max(0.0, (b1 - b0 - own) / (t1 - t0) * len(cpus)) if t1 > t0 else 0.0
    return HostLoad(cpus=len(cpus), others_busy=round(others, 3), load1=load1, sample_s=round(wall, 3))
