"""Timing method (docs/timing.md), following pytorch/benchmark: eval mode, no autograd, warm-up of
at least ``warmup_runs`` runs and ``warmup_ms``, then R samples, each the mean of n back-to-back
runs between two CUDA events (GPU) or ``perf_counter_ns`` readings (CPU), with n chosen so one
sample lasts at least ``min_sample_ms``. Every sample is kept."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import torch
from torch import nn

from gas_core.keys import TORCH_DTYPES, TORCH_MEMORY_FORMATS, LatencyKey
from gas_core.ops import PRIMITIVES, InGraphForm, build_timing_case
from gas_core.quality import median_se, quantile, sample_stats
from gas_core.runtimes import IN_GRAPH_EXTRA, prepare, resolve_runtime, timing_form


@dataclass(frozen=True)
class Method:
    warmup_runs: int = 10
    warmup_ms: float = 50.0
    samples: int = 30
    min_sample_ms: float = 1.0
    max_iters_per_sample: int = 10_000
    context: bool = False
    """Time each key after a context sequence (see :func:`time_callable`)."""
    flush_bytes: int | None = None
    """Bytes the context writes to evict caches; None = :func:`default_flush_bytes`."""
    context_min_sample_ms: float = 5.0
    """With context, a sample lasts at least this long: each is a difference of two runs that
    are mostly context, so it needs more iterations than ``min_sample_ms`` to be as precise."""
    direct: bool = False
    """With context: time every run of the op on its own, between two timer readings right after
    its context, instead of as a difference of two n-run totals. No cancellation: a sample is
    never ≤ 0, and a run the OS interrupted is one slow sample, not a garbage difference of two
    (docs/timing.md, "A busy host")."""
    block: int = 1
    """Direct timing: each sample is the fastest of this many single runs (``timeit``'s advice:
    the fastest repeat is the one the rest of the machine disturbed least). 1 = every run."""
    key_budget_s: float | None = None
    """Stop sampling a key after this many seconds (keeping at least 3 samples): a busy host
    otherwise stretched one key to 20–40 s."""


@dataclass
class Timing:
    """Per-run microseconds of every sample and their summary."""

    samples_us: list[float]
    iters_per_sample: int
    timer: str
    timed_ns: int
    """Wall time spent inside timed regions (for the profiling-cost benchmark)."""
    budget_spent: bool = False
    """Sampling stopped at ``Method.key_budget_s`` with fewer samples than asked for."""

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def quantile(self, q: float) -> float:
        return quantile(self.samples_us, q)

    def summary(self) -> dict[str, float | int | str]:
        """:func:`gas_core.quality.sample_stats` (what an import recomputes too) plus the method."""
        return {**sample_stats(self.samples_us), "iters_per_sample": self.iters_per_sample, "timer": self.timer}


# a paired (context) median not clearly above zero gets more samples, up to this many times
CONTEXT_MAX_SAMPLES_FACTOR = 4


def resolved(samples_us: list[float]) -> bool:
    """Is the median of paired differences clearly above zero: more than twice its standard
    error (1.2533 · 1.4826 · MAD / √n)? With context timing an op of tens of µs is a small
    difference of two runs of a millisecond or more; on a noisy host a few samples can put its
    median at or below zero, and the floored table entry would call a real conv free. Ops that
    really cost nothing (identity) stay unresolved and just take the extra samples."""
    if len(samples_us) < 3:
        return False
    return statistics.median(samples_us) > 2 * median_se(samples_us)


ESTIMATE_RUNS = 5
"""Single runs timed to choose n; the fastest one counts (as triton's ``do_bench`` estimates from a
few runs): one run slowed by the shared host would otherwise make every sample too short."""


def iterations_per_sample(body: Callable[[], object], sync: Callable[[], None], min_ms: float, max_iters: int) -> int:
    """n such that n back-to-back runs of ``body`` last at least ``min_ms``, from the fastest of up
    to :data:`ESTIMATE_RUNS` synchronised single runs (two suffice when both already last
    ``min_ms``: n is 1 either way)."""
    fastest_ns = math.inf
    for i in range(ESTIMATE_RUNS):
        t = time.perf_counter_ns()
        body()
        sync()
        fastest_ns = min(fastest_ns, max(time.perf_counter_ns() - t, 1))
        if i >= 1 and fastest_ns >= min_ms * 1e6:
            break
    return int(min(max_iters, max(1, math.ceil(min_ms * 1e6 / fastest_ns))))


def time_callable(
    fn: Callable[[], object], device: torch.device, method: Method, context: Callable[[], object] | None = None
) -> Timing:
    """Time ``fn`` on ``device``. CUDA work is bracketed by events and synchronised.

    With ``context``, every run of ``fn`` is preceded by one run of ``context`` and each sample
    is paired: (n × [context, fn]) − (n × [context]), divided by n. That times ``fn`` the way it
    runs inside a network — after other kernels, with its dispatch path and data no longer hot —
    instead of back-to-back with itself (docs/timing.md: isolated timings under-predict networks).
    A paired median that is not :func:`resolved` after ``method.samples`` samples gets another
    batch of as many, up to ``CONTEXT_MAX_SAMPLES_FACTOR`` batches."""
    sync = _synchroniser(device)

    def body() -> None:
        if context is not None:
            context()
        fn()

    deadline = None if method.key_budget_s is None else time.monotonic() + method.key_budget_s
    _warm_up(body, sync, method)  # cuDNN autotuning, allocator growth, caches
    if method.direct:
        return _direct(fn, context, device, sync, method, deadline)
    min_ms = max(method.min_sample_ms, method.context_min_sample_ms) if context is not None else method.min_sample_ms
    n = iterations_per_sample(body, sync, min_ms, method.max_iters_per_sample)
    run, timer = _timed_runs(device, n, sync)
    samples, timed, cut = _samples(fn, context, body, run, method, deadline)
    return Timing([ns / 1e3 / n for ns in samples], n, timer + ("+context" if context is not None else ""), timed,
                  cut)


def _direct(fn: Callable[[], object], context: Callable[[], object] | None, device: torch.device,
            sync: Callable[[], None], method: Method, deadline: float | None) -> Timing:
    """Direct timing (``Method.direct``): ``method.samples`` samples, each the fastest of
    ``method.block`` single runs of ``fn``, every run right after one run of ``context``."""
    once, timer = _single_run(device, sync)
    samples: list[int] = []
    timed, cut = 0, False
    while len(samples) < method.samples:
        best = None
        for _ in range(method.block):
            if context is not None:
                context()
            ns = once(fn)
            timed += ns
            best = ns if best is None else min(best, ns)
        assert best is not None
        samples.append(best)
        if deadline is not None and len(samples) >= 3 and time.monotonic() > deadline:
            cut = len(samples) < method.samples
            break
    name = timer + ("+context" if context is not None else "") + (f"+min{method.block}" if method.block > 1 else
                                                                  "+direct")
    return Timing([ns / 1e3 for ns in samples], 1, name, timed, cut)


def _single_run(device: torch.device, sync: Callable[[], None]) -> tuple[Callable[[Callable[[], object]], int], str]:
    """A function that runs ``f`` once and returns its nanoseconds (CUDA events around it on a
    GPU, so work queued before, such as a context, is not counted), and the timer's name."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def once_cuda(f: Callable[[], object]) -> int:
            start.record()
            f()
            end.record()
            end.synchronize()
            return max(1, int(start.elapsed_time(end) * 1e6))

        return once_cuda, "cuda_event"

    def once_cpu(f: Callable[[], object]) -> int:
        a = time.perf_counter_ns()
        f()
        return max(1, time.perf_counter_ns() - a)

    return once_cpu, "perf_counter_ns"


def time_marginal(longer: Callable[[], object], shorter: Callable[[], object], extra: int,
                  device: torch.device, method: Method, label: str = "+chain") -> Timing:
    """What ``extra`` more copies of a component cost inside one graph, per copy: each sample is
    (n runs of ``longer`` − n runs of ``shorter``) / (n · ``extra``), the two halves back to back
    and alternating which runs first, so a host's drift or mode change cancels in the pair (as in
    the context method). Unresolved medians get more samples, as there. The timer's name ends in
    ``label`` (``+chain``, ``+fan_out``)."""
    sync = _synchroniser(device)
    _warm_up(shorter, sync, method)
    _warm_up(longer, sync, method)
    min_ms = max(method.min_sample_ms, method.context_min_sample_ms)
    n = iterations_per_sample(longer, sync, min_ms, method.max_iters_per_sample)
    run, timer = _timed_runs(device, n, sync)
    deadline = None if method.key_budget_s is None else time.monotonic() + method.key_budget_s
    samples, timed, cut = _samples(longer, shorter, longer, run, method, deadline)
    return Timing([ns / 1e3 / n / extra for ns in samples], n, timer + label, timed, cut)


def _synchroniser(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _warm_up(body: Callable[[], object], sync: Callable[[], None], method: Method) -> None:
    """At least ``warmup_runs`` runs and ``warmup_ms`` of them, synchronised every 8."""
    runs, t0 = 0, time.perf_counter()
    while runs < method.warmup_runs or (time.perf_counter() - t0) * 1e3 < method.warmup_ms:
        body()
        runs += 1
        if runs % 8 == 0:
            sync()
    sync()


def _timed_runs(device: torch.device, n: int,
                sync: Callable[[], None]) -> tuple[Callable[[Callable[[], object]], int], str]:
    """A function that runs ``f`` ``n`` times and returns the nanoseconds it took (CUDA events
    on a GPU, ``perf_counter_ns`` on a CPU), and the timer's name."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run_cuda(f: Callable[[], object]) -> int:
            sync()
            start.record()
            for _ in range(n):
                f()
            end.record()
            end.synchronize()
            return int(start.elapsed_time(end) * 1e6)

        return run_cuda, "cuda_event"

    def run_cpu(f: Callable[[], object]) -> int:
        a = time.perf_counter_ns()
        for _ in range(n):
            f()
        return time.perf_counter_ns() - a

    return run_cpu, "perf_counter_ns"


def _samples(fn: Callable[[], object], context: Callable[[], object] | None, body: Callable[[], object],
             run: Callable[[Callable[[], object]], int], method: Method,
             deadline: float | None = None) -> tuple[list[int], int, bool]:
    """The samples (ns per ``n`` runs; paired differences with a context), the time spent
    inside timed regions and whether the key's budget cut them short. A context's pairs
    alternate which half runs first, so drift does not bias the difference; an unresolved
    paired median gets more samples (see time_callable), unless the budget is spent."""
    samples: list[int] = []
    timed = 0
    target = method.samples
    for i in itertools.count():
        if deadline is not None and i >= 3 and time.monotonic() > deadline:
            return samples, timed, i < method.samples
        if i == target:
            # resolved() compares the median with its standard error: the same in ns per n runs as in µs per run
            if context is None or target >= CONTEXT_MAX_SAMPLES_FACTOR * method.samples or resolved(
                    [float(x) for x in samples]):
                break
            target += method.samples
        if context is None:
            ns = run(fn)
            timed += ns
        else:
            if i % 2 == 0:
                with_fn = run(body)
                ctx_only = run(context)
            else:
                ctx_only = run(context)
                with_fn = run(body)
            ns = with_fn - ctx_only
            timed += with_fn + ctx_only
        samples.append(ns)
    return samples, timed, False


FlushLevel = Literal["l2", "llc"]


def cpu_caches(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[int, int]:
    """This host's data (or unified) cache sizes in bytes by level, as the kernel reports them for
    cpu0 (``{1: 32768, 2: 524288, 3: 33554432}`` on a 2-core EPYC VM); empty if unreadable."""
    sizes: dict[int, int] = {}
    for index in sorted(root.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes[level] = int(text.rstrip("KMG")) * mult
        except (OSError, ValueError):
            continue
    return sizes


def default_flush_bytes(device: torch.device, level: FlushLevel = "l2") -> int:
    """Bytes the timing context writes between two runs of an op: twice a cache size read from
    this host (sysfs on CPU, the device properties on a GPU), never assumed. ``l2`` = the per-core
    L2, ``llc`` = the last cache level (a GPU's L2 either way; a CPU's L3 where it has one).
    Flushing the L3 is right only when the rest of the network evicts it: on a 2-core EPYC at
    96×192 the whole network fits in its 32 MiB L3 and an LLC flush over-predicted by +17 %
    against +9 % for 2 × L2 (docs/timing.md). 4 MiB when the host reports nothing."""
    if device.type == "cuda":
        return 2 * int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    caches = cpu_caches()
    if not caches:
        return 4 * 2**20
    size = caches[max(caches)] if level == "llc" else caches.get(2, caches[max(caches)])
    return 2 * size


def context_case(
    device: torch.device, dtype: str, memory_format: str, flush_bytes: int, inputs: tuple = ()
) -> Callable[[], object]:
    """What runs between two calls of an op inside a network, in miniature: a write over
    ``flush_bytes`` (evicts the op's weights and buffers from cache, as the rest of the network
    does) and a fixed sequence of small, different kernels (every candidate op and the glue
    components at 4 channels, 4×4: evicts its dispatch path). Cheap enough to keep the paired
    difference precise. Measured on a 2-core Xeon at 128×256: the plain sum under-predicted 6
    nets by 22–27 %, the kernels alone by 10–16 %, kernels + flush by −1.3…+1.6 %."""
    cases = []
    for name in [*PRIMITIVES[1:], "preprocess_1x1", "node_sum", "concat"]:
        key = LatencyKey(op=name, c_in=4, c_out=8 if name == "concat" else 4, h=4, w=4, stride=1,
                         n_inputs=2 if name in ("node_sum", "concat") else 1, batch=1, dtype=dtype,  # type: ignore[arg-type]
                         memory_format=memory_format)  # type: ignore[arg-type]
        cases.append(build_timing_case(key, device=device, generator=torch.Generator().manual_seed(1)))

    flush = torch.zeros(flush_bytes // 4, device=device) if flush_bytes else None

    hot = [t for t in inputs if isinstance(t, torch.Tensor)]

    def run() -> None:
        if flush is not None:
            flush.add_(1.0)
        for t in hot:  # the op's input was just written by the op before it: hot, unlike its weights
            t.mul_(1.0)
        for module, args in cases:
            module(*args)

    return run


@dataclass(frozen=True)
class KeyCase:
    """A key's component built at its exact shape and prepared under its runtime: what to time.

    For an in-graph key (:func:`gas_core.runtimes.in_graph`) ``run`` holds ``1 + IN_GRAPH_EXTRA``
    copies in the key's :func:`gas_core.ops.in_graph_form` (a chain, or a fan-out from one
    input) and ``shorter`` one copy in the same form, each exported or compiled as one graph:
    their difference is what one more copy costs inside a graph, where a runtime fuses across it
    and keeps its tensors in its own layout, without the entry and the input/output conversions
    every own-graph timing pays (docs/latency-key.md "In-graph keys")."""

    run: Callable[[], object]
    args: tuple
    shorter: Callable[[], object] | None = None
    form: InGraphForm | None = None


def prepare_key(key: LatencyKey, device: torch.device, seed: int = 0) -> KeyCase:
    """The key's component built by gas_core at its exact shape and prepared under its runtime
    (exported or compiled as its own graph, or in its two in-graph forms)."""
    def case(copies: int, shared: bool = False) -> tuple[nn.Module, tuple]:
        return build_timing_case(key, device=device, generator=torch.Generator().manual_seed(seed), copies=copies,
                                 shared=shared)

    with torch.no_grad():  # exporters and compilers trace; inference-mode tensors would refuse them
        form = timing_form(key)
        if form is None:
            module, args = case(1)
            return KeyCase(prepare(key.runtime, module, args, device), args)
        one, args = case(1 + IN_GRAPH_EXTRA, shared=True) if form == "fan_out" else case(1)
        longer, _ = case(1 + IN_GRAPH_EXTRA)
        shorter = prepare(key.runtime, one, args, device)
        return KeyCase(prepare(key.runtime, longer, args, device), args, shorter, form)


def time_case(key: LatencyKey, case: KeyCase, device: torch.device, method: Method) -> Timing:
    """Time a prepared key: inside a graph (in-graph keys), in context (eager keys, when
    ``method`` asks for it) or in isolation."""
    with torch.inference_mode():
        if case.shorter is not None:
            return time_marginal(case.run, case.shorter, IN_GRAPH_EXTRA, device, method, f"+{case.form}")
        flush = method.flush_bytes if method.flush_bytes is not None else default_flush_bytes(device)
        in_context = method.context and resolve_runtime(key.runtime).context_timing
        ctx = context_case(device, key.dtype, key.memory_format, flush, case.args) if in_context else None
        return time_callable(case.run, device, method, ctx)


def time_key(key: LatencyKey, device: torch.device, method: Method, seed: int = 0) -> Timing:
    """Time one latency key: the component built by gas_core at the key's exact shape, run under
    the key's runtime (exported or compiled first: :mod:`gas_core.runtimes`)."""
    return time_case(key, prepare_key(key, device, seed), device, method)


REFERENCE_KEY = LatencyKey(op="conv_3x3", c_in=32, c_out=32, h=64, w=128, stride=1, n_inputs=1, batch=1,
                           dtype="float32", memory_format="contiguous")
"""The host's reference workload: one fixed conv (≈ 75 MFLOP, a few ms on a 2-core CPU), timed
the same way on every host and at every point of a job, so its drift is the host's own."""
REFERENCE_METHOD = Method(warmup_runs=3, warmup_ms=200.0, samples=3, min_sample_ms=1.0)
"""The first burst of a point. The 200 ms warm-up is there for an idle GPU: on an H200 with
20 ms the first point of a job was timed before the clocks had risen (50.9 µs, against 44.5 µs
at the job's end), and every key of the job was flagged for a drift the host never had."""
REFERENCE_BURST_METHOD = Method(warmup_runs=2, warmup_ms=20.0, samples=3, min_sample_ms=1.0)
"""Every later burst of a point (a short warm-up: the gap before it may let a GPU's clocks dip)."""
REFERENCE_BURSTS: Final = 8
REFERENCE_GAP_S: Final = 0.1
"""A point is :data:`REFERENCE_BURSTS` bursts this far apart, about a second in all. On a 2-core
Xeon VM one contiguous burst's median ranged 0.9–3.4 ms within a minute of an idle host; spread
over a second, the point's median varies about half as much and its bursts say how much it
still does (``ReferencePoint.se_us``; ``bench/reference_drift.py``). The service times a point
at a job's start, every ``GAS_REFERENCE_EVERY_S`` and at its end, and before every ``/measure``."""


def time_reference(device: torch.device, sleep: Callable[[float], None] = time.sleep) -> list[Timing]:
    """Time :data:`REFERENCE_KEY` in isolation: one point, as its bursts in time order."""
    case = prepare_key(REFERENCE_KEY, device)
    bursts = []
    for i in range(REFERENCE_BURSTS):
        if i:
            sleep(REFERENCE_GAP_S)
        bursts.append(time_case(REFERENCE_KEY, case, device, REFERENCE_BURST_METHOD if i else REFERENCE_METHOD))
    return bursts


def time_network(
    net: nn.Module, input_hw: tuple[int, int], batch: int, dtype: str, memory_format: str,
    device: torch.device, method: Method, runtime: str = "eager",
) -> Timing:
    """Time a whole network end to end on a ``(batch, 3, H, W)`` input under ``runtime`` (the
    whole network exported or compiled as one graph, as it would ship)."""
    dt, fmt = TORCH_DTYPES[dtype], TORCH_MEMORY_FORMATS[memory_format]
    net = net.eval().to(device=device, dtype=dt, memory_format=fmt)  # type: ignore[call-overload]
    x = torch.randn(batch, 3, *input_hw, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dt, memory_format=fmt)
    with torch.no_grad():
        run = prepare(runtime, net, (x,), device)
    with torch.inference_mode():
        return time_callable(run, device, method)
