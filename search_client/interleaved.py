"""Measured latency you can match networks on: every network timed round-robin in one sitting.

On a shared VM the host's speed wanders by tens of per cent over minutes (docs/timing.md), so two
networks timed a few minutes apart differ by the host as much as by themselves. Timing them
**interleaved** — round r visits every network once, each round starting one network later, so
each network takes every position equally often — puts the host's wander into every network's
rounds alike: it widens each network's interval instead of shifting one network against another.

Each network's figure is the median of its per-round medians (each round is one ``POST /measure``
or one call of the same timer, itself a median of many passes) with a distribution-free 95 %
interval from the order statistics of the rounds (the binomial interval of a median; no normality
assumed: round medians on a VM are skewed by slow spells). ≥ 10 rounds give an interval between
the 2nd and 9th of 10.

**The floor, for matching.** On the CamVid study's 2-core EPYC the host ran in two speeds, phases
of +40 % lasting 20–50 s (`bench/results/camvid/runs/measure-r2.json`): a network's median then
depends on how many of its rounds fell in slow phases, and the medians did not reproduce between
the odd and the even rounds (split-half Kendall τ 0.11 over 34 networks, median difference 6.1 %).
The fastest round (``floor_ms``) did (τ 0.64, 1.1 %): interference only adds time, so the floor is
the host's own speed for that network, as the prediction benchmark's "lowest pass" is. Both are
kept; partners are matched on the floor, and ``split_half`` says how repeatable each statistic was
in the sitting.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gas_core.genotype import Genotype
from gas_core.table import kendall_tau

MIN_ROUNDS = 10


def round_robin(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of every round: round r starts at network r (mod n) and visits all n once."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)]


def median_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: the widest-needed pair of order statistics
    x(j), x(n+1−j) with P(j ≤ Binomial(n, ½) ≤ n − j) ≥ ``level`` (for n = 10: x(2)…x(9), 97.9 %).
    With too few values for ``level`` (n < 6 at 95 %) the full range."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("median_ci of no values")
    best = 1
    for j in range(1, n // 2 + 1):
        coverage = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n
        if coverage >= level:
            best = j
        else:
            break
    return s[best - 1], s[n - best]


class NetworkTiming(BaseModel):
    """One network over the sitting's rounds."""

    model_config = ConfigDict(extra="forbid")

    name: str
    rounds_ms: list[float] = Field(description="the network's median of each round, in round order")
    median_ms: float = Field(description="median of rounds_ms")
    ci95_ms: tuple[float, float] = Field(description="distribution-free 95 % interval of that median")
    floor_ms: float = Field(default=0.0, description="the fastest round: the figure to match on (module docstring)")
    predicted_ms: float | None = Field(default=None, description="the table's whole-network sum, when given")

    @property
    def ci_half_pct(self) -> float:
        """Half the interval's width, % of the median."""
        return 50 * (self.ci95_ms[1] - self.ci95_ms[0]) / self.median_ms


class InterleavedRun(BaseModel):
    """What one interleaved sitting measured."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    rounds: int
    order: list[list[str]] = Field(description="the networks in the order each round timed them")
    networks: list[NetworkTiming]
    tau_table_vs_measured: float | None = Field(default=None, description="Kendall τ of predicted and measured "
                                                "medians over the networks that have a prediction")
    median_ratio_table_over_measured: float | None = None
    split_half: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description="per statistic (median, floor): Kendall τ between the figures of the "
        "even and the odd rounds over the networks, and their median relative difference, %")

    def by_name(self) -> dict[str, NetworkTiming]:
        return {t.name: t for t in self.networks}


def measure_interleaved(
    nets: Mapping[str, Genotype], measure: Callable[[Genotype], float], rounds: int = MIN_ROUNDS,
    predicted_ms: Mapping[str, float] | None = None, on_call: Callable[[int, str], None] | None = None,
) -> InterleavedRun:
    """Time ``nets`` round-robin: ``measure(genotype)`` returns one round's figure (ms), e.g.
    ``POST /measure``'s median. ``on_call(round, name)`` is called before each call (progress)."""
    if rounds < 1 or not nets:
        raise ValueError("measure_interleaved needs at least one network and one round")
    names = list(nets)
    order = round_robin(names, rounds)
    got: dict[str, list[float]] = {n: [] for n in names}
    for r, visit in enumerate(order):
        for name in visit:
            if on_call is not None:
                on_call(r, name)
            got[name].append(float(measure(nets[name])))
    return summarise(got, order, predicted_ms or {})


def summarise(got: Mapping[str, Sequence[float]], order: list[list[str]],
              predicted_ms: Mapping[str, float]) -> InterleavedRun:
    """Per network median and interval; over the networks with a prediction, Kendall τ of table
    against measured and the median ratio table / measured."""
    timings = [NetworkTiming(name=n, rounds_ms=list(xs), median_ms=statistics.median(xs), ci95_ms=median_ci(xs),
                             floor_ms=min(xs), predicted_ms=predicted_ms.get(n)) for n, xs in got.items()]
    paired = [(t.predicted_ms, t.median_ms) for t in timings if t.predicted_ms is not None]
    tau = kendall_tau([p for p, _ in paired], [m for _, m in paired]) if len(paired) >= 3 else None
    ratio = statistics.median(p / m for p, m in paired) if paired else None
    return InterleavedRun(rounds=len(order), order=order, networks=timings, tau_table_vs_measured=tau,
                          median_ratio_table_over_measured=ratio, split_half=split_half(got))


def split_half(got: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float | None]]:
    """How well each statistic reproduces itself within the sitting: computed on the even rounds
    and on the odd rounds separately, Kendall τ over the networks and the median |a/b − 1| in %."""
    out: dict[str, dict[str, float | None]] = {}
    for name, stat in (("median", statistics.median), ("floor", min)):
        pairs = [(stat(xs[0::2]), stat(xs[1::2])) for xs in got.values() if len(xs) >= 2]
        if len(pairs) < 2:
            continue
        out[name] = {"tau": kendall_tau([a for a, _ in pairs], [b for _, b in pairs]),
                     "median_diff_pct": 100 * statistics.median(abs(a / b - 1) for a, b in pairs)}
    return out
