"""Searching for a latency target T instead of trading latency off (beyond the paper).

The paper's loss, CE + β·log LAT (eq. 10), pulls every network towards "faster" with a strength
set by β, so which latency a search lands at depends on β, the table and the seed, and on CamVid
the β sweep did not even order the derived nets' latencies. A deployment engineer has a budget
instead: "the most accurate network within T ms on this device". Two pieces give that:

* **The loss**, from TF-NAS (Hu et al., "TF-NAS: Rethinking Three Search Freedoms of
  Latency-Constrained Differentiable NAS", ECCV 2020, eq. 8): CE + λ·|LAT/T − 1|, with LAT the
  whole network's latency from the table (``fixed`` + Σ Z·L) under the sampled Z. Unlike β·log LAT
  it pulls from both sides: a mixture slower than T is pushed down, one faster than T is let
  grow back towards T (where the accuracy is), and the pull does not depend on LAT's scale.
  TF-NAS's default λ = 0.1 is ours.
* **The derivation**, TF-NAS's "elasticity" step carried from widths to ops: the argmax of α′
  rarely lands exactly at T, so :func:`fit_to_target` then swaps single edges' ops — the swap
  that costs the least log-probability under softmax(α′) per µs it moves, without jumping past
  the band — until the derived network's exact table latency lies within ±``tolerance`` of T.
  Every swap is checked with the exact predictor (the same sum as ``POST /measure``'s
  prediction), not the linear term, so "within ±5 %" holds for the figure users see.

T is on the table's scale: the table's device, dtype, memory format and runtime; whether the
network then *measures* at T depends on how well that table tracks the host (docs/timing.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from gas_core.genotype import Genotype, derive
from gas_core.latency import LatencyTerm
from gas_core.ops import OPS
from gas_core.search_space import NetworkLayout

TARGET_WEIGHT = 0.1
"""λ of CE + λ·|LAT/T − 1| (TF-NAS's default)."""
TARGET_TOLERANCE = 0.05
"""The band around T the derived network's table latency must land in (±5 %)."""

PredictUs = Callable[[Genotype], float]
"""A derived network's exact table latency, µs (e.g. ``partial(predict_latency_us, shapes=…, table=…)``)."""


def target_loss(ce: torch.Tensor, lat_total_us: torch.Tensor, target_us: float,
                weight: float = TARGET_WEIGHT) -> torch.Tensor:
    """TF-NAS's eq. 8: CE + λ·|LAT/T − 1|. ``lat_total_us`` is the whole network's LAT (scalar,
    µs) under the step's Z, so T and LAT are the same kind of figure."""
    return ce + weight * (lat_total_us / target_us - 1).abs()


class TargetFit(BaseModel):
    """How the derived network was brought to the target: the argmax's latency, the swaps made
    and where it ended. ``within`` is False only when no single-edge swap could move it closer
    (T outside what the search space can reach)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    target_ms: float = Field(gt=0)
    tolerance: float = Field(gt=0)
    argmax_ms: float = Field(description="table latency of the plain argmax of α′")
    fitted_ms: float = Field(description="table latency of the derived network after the swaps")
    swaps: list[str] = Field(default_factory=list, description="'cell k edge e: old → new' per swap, in order")
    logp_cost: float = Field(description="log-probability under softmax(α′) given up by the swaps (≥ 0)")
    within: bool


def fit_to_target(alpha_prime: torch.Tensor, layout: NetworkLayout, term: LatencyTerm, target_us: float,
                  tolerance: float = TARGET_TOLERANCE, predict_us: PredictUs | None = None,
                  max_swaps: int | None = None) -> tuple[Genotype, TargetFit]:
    """The argmax of ``alpha_prime`` [cells, edges, ops], then greedy single-edge swaps until its
    table latency lies within ±``tolerance`` of ``target_us``.

    Each step ranks every swap (k, e, m) that moves towards T by its log-probability cost per µs
    of the linear term's estimate ``L[k, e, m] − L[k, e, current]``, evaluates the cheapest few
    exactly with ``predict_us`` (default: the term's own whole-network sum) and takes the first
    that brings the latency strictly closer to T without landing beyond the far side of the band.
    """
    predict = predict_us or (lambda g: float(term.total(g.one_hot())))
    logp = torch.log_softmax(alpha_prime.detach().float().cpu(), dim=-1)
    L = term.L.detach().float().cpu()
    ops = alpha_prime.shape[-1]
    choice = logp.argmax(-1)
    g = _genotype(choice, layout)
    lat = argmax_lat = predict(g)
    swaps: list[str] = []
    cost = 0.0
    budget = max_swaps if max_swaps is not None else choice.numel() * ops
    while abs(lat / target_us - 1) > tolerance and len(swaps) < budget:
        step = _best_swap(choice, logp, L, lat, target_us, tolerance, layout, predict)
        if step is None:
            break
        (k, e, m), lat = step
        cost += float(logp[k, e, choice[k, e]] - logp[k, e, m])
        swaps.append(f"cell {k} edge {e}: {g.cells[k].edges[e]} → {OPS.names()[m]}")
        choice[k, e] = m
        g = _genotype(choice, layout)
    fit = TargetFit(target_ms=target_us / 1e3, tolerance=tolerance, argmax_ms=argmax_lat / 1e3, fitted_ms=lat / 1e3,
                    swaps=swaps, logp_cost=cost, within=abs(lat / target_us - 1) <= tolerance)
    return g, fit


def _best_swap(choice: torch.Tensor, logp: torch.Tensor, L: torch.Tensor, lat: float, target_us: float,
               tolerance: float, layout: NetworkLayout, predict: PredictUs) -> tuple[tuple[int, int, int], float] | None:
    """The cheapest swap (log-probability per µs, linear estimate) whose exact latency is strictly
    closer to T and not beyond the band's far edge, tried in that order; None when none is."""
    sign = 1.0 if lat < target_us else -1.0  # +: the network must get slower
    current = L.gather(-1, choice.unsqueeze(-1))  # [cells, edges, 1]
    delta = (L - current) * sign  # µs moved towards T by each swap, linear estimate
    loss = logp.gather(-1, choice.unsqueeze(-1)) - logp  # log-probability given up, ≥ 0 at the argmax
    score = loss.clamp(min=0) / delta.clamp(min=1e-6)
    score[delta <= 0] = float("inf")
    order = [tuple(int(i) for i in idx) for idx in torch.nonzero(torch.isfinite(score))]
    order.sort(key=lambda idx: float(score[idx]))
    far = target_us * (1 + sign * tolerance)
    for k, e, m in order:
        trial = choice.clone()
        trial[k, e] = m
        new = predict(_genotype(trial, layout))
        beyond = (new - far) * sign > 0
        if abs(new - target_us) < abs(lat - target_us) and not beyond:
            return (k, e, m), new
    return None


def _genotype(choice: torch.Tensor, layout: NetworkLayout) -> Genotype:
    """The genotype of op indices ``choice`` [cells, edges]."""
    return derive(torch.nn.functional.one_hot(choice, len(OPS.names())).float(), layout)
