"""Random architectures to hold a searched one against (the paper's Table 3 and its "random
search under the latency constraint"), drawn so that the comparison is about the cells alone.

A searched network beats a random one for three reasons: better cells, more time, or more
weights. The study removes the last two by giving each searched network a **partner**: a random
genotype whose *measured* latency lies within ±3 % and whose parameter count lies within ±10 % of
the searched one's. Measuring is the costly filter, so candidates are first drawn and screened
cheaply (parameter count exactly; latency through the table, scaled to the host by the sitting's
table/measured ratio, with a wide margin), then measured interleaved with their searched network
(:mod:`search_client.interleaved`); the first candidate in draw order that matches is the
partner — not the closest, so the partner stays a plain random draw from the matching set.

At latencies that uniform draws rarely reach (0.65× the uniform median), candidates come from an
op distribution **tilted toward cheap ops**: p(m) ∝ exp(−t · c_m / c̄), with c_m the op's mean
latency over the network's edges in the table, and t chosen so the draws' median table latency
sits at the target (:func:`tilt_for_latency`). The draws are still random architectures; only
their op frequencies move.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gas_core.genotype import Genotype, random_genotype
from gas_core.latency import LatencyTerm
from gas_core.network import GASNet
from gas_core.search_space import NetworkLayout


def count_params(g: Genotype) -> int:
    """Trainable parameters of the derived network ``g`` (what training and the checkpoint hold)."""
    return sum(p.numel() for p in GASNet(g).parameters())


def tilted_op_probs(term: LatencyTerm, tilt: float) -> torch.Tensor:
    """[ops] p(m) ∝ exp(−tilt · c_m / c̄), c_m = op m's mean table latency over all edges (µs),
    c̄ the mean over ops; tilt 0 is uniform, larger favours cheap ops."""
    cost = term.L.float().mean(dim=(0, 1))
    return torch.softmax(-tilt * cost / cost.mean().clamp(min=1e-9), dim=0)


def tilt_for_latency(term: LatencyTerm, table_ms: Callable[[Genotype], float], layout: NetworkLayout,
                     target_ms: float, seed: int, draws: int = 101, iters: int = 14) -> float:
    """The tilt ≥ 0 whose draws' median table latency is closest to ``target_ms`` (bisection on
    a fixed set of seeds: the median falls as the tilt grows). 0 when uniform is already at or
    below the target."""

    def median_at(tilt: float) -> float:
        gen = torch.Generator().manual_seed(seed)
        probs = tilted_op_probs(term, tilt)
        return statistics.median(table_ms(random_genotype(layout, gen, probs)) for _ in range(draws))

    lo, hi = 0.0, 1.0
    if median_at(0.0) <= target_ms:
        return 0.0
    while median_at(hi) > target_ms and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if median_at(mid) > target_ms else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Candidate:
    """One screened draw: its number in the stream of draws, and what the screen saw."""

    draw: int
    genotype: Genotype
    params: int
    table_ms: float


def screened_draws(layout: NetworkLayout, seed: int, want: int, keep: Callable[[Genotype, int, float], bool],
                   table_ms: Callable[[Genotype], float], params: Callable[[Genotype], int] = count_params,
                   probs: torch.Tensor | None = None, max_draws: int = 200_000, start: int = 0) -> list[Candidate]:
    """The next ``want`` draws (from draw number ``start`` of the stream ``seed``) that
    ``keep(genotype, params, table_ms)`` accepts, in draw order. The stream is the same whatever
    ``want`` is, so a later call with ``start`` = the last draw + 1 continues it."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Candidate] = []
    for i in range(max_draws):
        g = random_genotype(layout, gen, probs)
        if i < start:
            continue
        ms = table_ms(g)
        n = params(g)
        if keep(g, n, ms):
            out.append(Candidate(i, g, n, ms))
            if len(out) == want:
                return out
    raise RuntimeError(f"only {len(out)} of {want} draws passed the screen in {max_draws} draws (seed {seed})")


def within(value: float, reference: float, tolerance: float) -> bool:
    """|value / reference − 1| ≤ tolerance."""
    return abs(value / reference - 1) <= tolerance


def first_match(candidates: list[Candidate], measured_ms: dict[int, float], target_ms: float,
                tolerance: float = 0.03) -> Candidate | None:
    """The first candidate in draw order whose measured latency (``measured_ms`` by draw number)
    lies within ±``tolerance`` of ``target_ms``; None when none does."""
    for c in sorted(candidates, key=lambda c: c.draw):
        if c.draw in measured_ms and within(measured_ms[c.draw], target_ms, tolerance):
            return c
    return None
