"""Timing method (DESIGN §3), following pytorch/benchmark: eval mode, no autograd, warm-up of
at least ``warmup_runs`` runs and ``warmup_ms``, then R samples, each the mean of n back-to-back
runs between two CUDA events (GPU) or ``perf_counter_ns`` readings (CPU), with n chosen so one
sample lasts at least ``min_sample_ms``. Every sample is kept."""

from __future__ import annotations

import math
import statistics
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gas_core.keys import TORCH_DTYPES, TORCH_MEMORY_FORMATS, LatencyKey
from gas_core.ops import build_timing_case


@dataclass(frozen=True)
class Method:
    warmup_runs: int = 10
    warmup_ms: float = 50.0
    samples: int = 30
    min_sample_ms: float = 1.0
    max_iters_per_sample: int = 10_000


@dataclass
class Timing:
    """Per-run microseconds of every sample and their summary."""

    samples_us: list[float]
    iters_per_sample: int
    timer: str
    timed_ns: int
    """Wall time spent inside timed regions (for the profiling-cost benchmark)."""

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def quantile(self, q: float) -> float:
        xs = sorted(self.samples_us)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    def summary(self) -> dict[str, float | int | str]:
        xs = self.samples_us
        return {
            "median_us": self.median_us,
            "p10_us": self.quantile(0.1),
            "p90_us": self.quantile(0.9),
            "mean_us": statistics.fmean(xs),
            "std_us": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n_samples": len(xs),
            "iters_per_sample": self.iters_per_sample,
            "timer": self.timer,
        }

    def samples_blob(self) -> bytes:
        return array("f", self.samples_us).tobytes()


def samples_from_blob(blob: bytes) -> list[float]:
    a = array("f")
    a.frombytes(blob)
    return a.tolist()


def time_callable(fn: Callable[[], object], device: torch.device, method: Method) -> Timing:
    """Time ``fn`` on ``device``. CUDA work is bracketed by events and synchronised."""
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # warm-up: cuDNN autotuning, allocator growth, caches
    runs, t0 = 0, time.perf_counter()
    while runs < method.warmup_runs or (time.perf_counter() - t0) * 1e3 < method.warmup_ms:
        fn()
        runs += 1
        if runs % 8 == 0:
            sync()
    sync()
    # estimate one run, then choose n so a sample lasts ≥ min_sample_ms
    t1 = time.perf_counter_ns()
    fn()
    sync()
    one_ns = max(time.perf_counter_ns() - t1, 1)
    n = int(min(method.max_iters_per_sample, max(1, math.ceil(method.min_sample_ms * 1e6 / one_ns))))

    samples: list[float] = []
    timed = 0
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(method.samples):
            sync()
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            timed += int(ms * 1e6)
            samples.append(ms * 1e3 / n)
        timer = "cuda_event"
    else:
        for _ in range(method.samples):
            a = time.perf_counter_ns()
            for _ in range(n):
                fn()
            b = time.perf_counter_ns()
            timed += b - a
            samples.append((b - a) / 1e3 / n)
        timer = "perf_counter_ns"
    return Timing(samples, n, timer, timed)


def time_key(key: LatencyKey, device: torch.device, method: Method, seed: int = 0) -> Timing:
    """Time one latency key: the component built by gas_core at the key's exact shape."""
    gen = torch.Generator().manual_seed(seed)
    module, args = build_timing_case(key, device=device, generator=gen)
    with torch.inference_mode():
        return time_callable(lambda: module(*args), device, method)


def time_network(
    net: nn.Module, input_hw: tuple[int, int], batch: int, dtype: str, memory_format: str,
    device: torch.device, method: Method,
) -> Timing:
    """Time a whole network end to end on a ``(batch, 3, H, W)`` input."""
    dt, fmt = TORCH_DTYPES[dtype], TORCH_MEMORY_FORMATS[memory_format]
    net = net.eval().to(device=device, dtype=dt, memory_format=fmt)
    x = torch.randn(batch, 3, *input_hw, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dt, memory_format=fmt)
    with torch.inference_mode():
        return time_callable(lambda: net(x), device, method)


def method_dict(method: Method) -> dict:
    return asdict(method)
