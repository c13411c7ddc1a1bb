"""The differentiable latency term (paper §3.3, eqs. 8–10) and exact predictions for derived nets.

L is a [cells, edges, ops] tensor of microseconds, each entry the table's median at the exact
shape that edge sees; ``fixed`` is everything α does not choose (stem, preprocess, node sums,
concat, head, classifier, upsample).

Two sums, for two uses (docs/architecture.md, "Latency term"):

* the loss uses eqs. 8–9 as written: LAT(Z) = Σ_k Σ_e Σ_m Z·L, the cells' candidate ops only
  (:meth:`LatencyTerm.forward`). Adding ``fixed`` inside β·log(LAT) would scale β's gradient on α
  down by (fixed + Σ)/Σ — about 1.6 at 256×512 on a CPU — for no gain: ``fixed`` has no gradient.
* reports and predictions use the whole network, ``fixed`` + Σ Z·L (:meth:`LatencyTerm.total`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from gas_core.genotype import Genotype
from gas_core.keys import LatencyKey
from gas_core.runtimes import REGISTRY as RUNTIME_REGISTRY
from gas_core.runtimes import in_graph
from gas_core.search_space import CellStructure, NetworkShapes

DEFAULT_BETA = 0.005

LatencyLookup = Mapping[str, float]
"""Canonical key string → median microseconds."""


class MissingLatencyKeys(KeyError):
    """A table lacks keys a network needs; ``missing`` lists every one of them."""

    def __init__(self, missing: list[LatencyKey]) -> None:
        self.missing = missing
        listing = "\n  ".join(k.canonical for k in missing)
        super().__init__(f"latency table lacks {len(missing)} key(s):\n  {listing}")

    def __str__(self) -> str:
        return str(self.args[0])


def _lookup_all(keys: Iterable[LatencyKey], table: LatencyLookup) -> None:
    missing: dict[str, LatencyKey] = {}
    for k in keys:
        if k.canonical not in table:
            missing.setdefault(k.canonical, k)
    if missing:
        raise MissingLatencyKeys(list(missing.values()))


class LatencyTerm(nn.Module):
    """LAT(Z) in µs for Z [cells, edges, ops]; no parameters, L and fixed are buffers."""

    L: torch.Tensor
    fixed: torch.Tensor

    def __init__(self, L: torch.Tensor, fixed: float) -> None:
        super().__init__()
        self.register_buffer("L", L.float())
        self.register_buffer("fixed", torch.tensor(float(fixed)))

    @classmethod
    def from_table(cls, shapes: NetworkShapes, table: LatencyLookup) -> LatencyTerm:
        """Raises :class:`MissingLatencyKeys` naming every key the table lacks."""
        _lookup_all(shapes.all_keys(), table)
        L = torch.zeros(shapes.layout.alpha_shape)
        for k, cell in enumerate(shapes.edges):
            for e, edge in enumerate(cell):
                for m, key in enumerate(edge):
                    if key is not None:
                        L[k, e, m] = own_cost_us(key, table, shapes.call)
        fixed = math.fsum(own_cost_us(key, table, shapes.call) for key in shapes.fixed())
        return cls(L, fixed)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Eqs. 8–9, the loss's LAT: Σ Z·L over the cells' candidate ops, scalar µs (float32).
        ``z`` [cells, edges, ops] may be a Gumbel sample, softmax(α′) or a one-hot genotype."""
        return (z.float() * self.L).sum()

    def total(self, z: torch.Tensor) -> torch.Tensor:
        """The whole network's µs: ``fixed`` + :meth:`forward` (reports, not the loss)."""
        return self.fixed + self.forward(z)


def own_cost_us(key: LatencyKey, table: LatencyLookup, call: LatencyKey | None) -> float:
    """What ``key`` adds to a whole network, µs. A key timed inside a graph
    (:func:`gas_core.runtimes.in_graph`: the marginal cost of one more copy) costs its median; a key
    timed as its own graph costs its median less the graph entry ``call``
    (:attr:`gas_core.search_space.NetworkShapes.call`) that its timing paid and a network under a
    one-graph runtime pays once, never below zero (a key timed at or under the entry cost is noise
    around nothing). ``call`` itself costs its median, and with no ``call`` (eager: every op is
    its own dispatch in a network too) a key costs its median."""
    if call is None or key == call or in_graph(key):
        return table[key.canonical]
    return max(table[key.canonical] - table[call.canonical], 0.0)


def work_table(shapes: NetworkShapes) -> dict[str, float]:
    """A stand-in table whose µs grow with each key's work (1 + h·w·c_in·c_out / 10⁴): no
    timing, the same on every host and rank, so tests and step-cost benchmarks that must not
    depend on a timed table get a deterministic, plausible one."""
    return {k.canonical: 1.0 + k.h * k.w * k.c_in * k.c_out / 1e4 for k in shapes.all_keys()}


def latency_loss(ce: torch.Tensor, lat_us: torch.Tensor, beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Eq. 10: CE + β·log(LAT), LAT in microseconds."""
    return ce + beta * torch.log(lat_us)


def derived_keys(genotype: Genotype, shapes: NetworkShapes) -> list[LatencyKey]:
    """Keys the derived network of ``genotype`` runs, with multiplicity, read from the same
    structure and rules as :class:`gas_core.network.DerivedCell`: ``none`` edges dropped, unused
    preprocesses skipped, node sums at their real arity (none for a single input).

    What the runtime itself removes is left out too (:class:`gas_core.runtimes.RuntimeEntry`):
    under one that folds constants, every component only constants feed (a node no live edge
    feeds is zeros; a cell of only such nodes is a constant, and so is what it alone feeds, up
    to the head); under one that drops dead code, every cell whose output reaches the network's
    output through no component that runs (neither of the next two cells reads it, or only
    folded parts do), and the stem when no such cell reads it."""
    if genotype.layout != shapes.layout:
        raise ValueError("genotype layout differs from the layout the shapes were computed for")
    entry = RUNTIME_REGISTRY[shapes.runtime]
    cells = _cell_ops(genotype, shapes)
    runs, constant = _cells_forward(cells, shapes, entry.folds_constants)
    head = not constant[-1]
    needed = _needed(cells, constant, head) if entry.drops_dead_code else [True] * (len(cells) + 1)
    keys = shapes.calls() + (shapes.stem if needed[0] else [])
    for cell_run, need in zip(runs, needed[1:], strict=True):
        keys += cell_run if need else []
    return keys + (list(shapes.head) if head else [])


def constant_output(genotype: Genotype, shapes: NetworkShapes) -> bool:
    """Whether the derived network's output is the same whatever its input: its last cell's
    nodes are fed by no live edge, or only by constants (a degenerate network, which a runtime
    that folds constants reduces to copying one tensor)."""
    return _cells_forward(_cell_ops(genotype, shapes), shapes, folds=True)[1][-1]


def _cell_ops(genotype: Genotype, shapes: NetworkShapes) -> list[tuple[CellStructure, tuple[str, ...]]]:
    """Each cell's structure with the genotype's op per edge."""
    return list(zip(shapes.structure.cells, (g.edges for g in genotype.cells), strict=True))


def _cells_forward(cells: Sequence[tuple[CellStructure, Sequence[str]]], shapes: NetworkShapes,
                   folds: bool) -> tuple[list[list[LatencyKey]], list[bool]]:
    """Each cell's keys on its (possibly constant) inputs, and whether each state is a constant:
    ``[stem, cell 0, …]``; cell k reads states k (its s0; the stem for cell 0) and k + 1."""
    constant = [False]  # the stem's output
    runs = []
    for k, (cell, ops) in enumerate(cells):
        inputs = (constant[max(k - 1, 0)], constant[k])
        cell_run, out_constant = _cell_run(cell, ops, shapes, inputs, folds)
        runs.append(cell_run)
        constant.append(out_constant)
    return runs, constant


def _needed(cells: Sequence[tuple[CellStructure, Sequence[str]]], constant: list[bool], head: bool) -> list[bool]:
    """Backwards from the head: is state ``[stem, cell 0, …]`` read by a component that runs?
    A cell that runs reads the inputs it uses unless they are constants (folded)."""
    needed = [False] * len(constant)
    needed[-1] = head
    for k in range(len(cells) - 1, -1, -1):
        if not needed[k + 1] or constant[k + 1]:
            continue
        used0, used1 = cells[k][0].used_inputs(cells[k][1])
        for src, used in ((max(k - 1, 0), used0), (k, used1)):
            needed[src] = needed[src] or (used and not constant[src])
    return needed


def cell_keys(cell: CellStructure, ops: Sequence[str], shapes: NetworkShapes) -> list[LatencyKey]:
    """The keys one derived cell runs on inputs that are not constants (``ops``: its op per
    edge), with multiplicity: its live preprocesses, its live edges' ops, its node sums of two or
    more inputs, its concat."""
    return _cell_run(cell, ops, shapes, (False, False), folds=False)[0]


def _cell_run(cell: CellStructure, ops: Sequence[str], shapes: NetworkShapes,
              constant_inputs: tuple[bool, bool], folds: bool) -> tuple[list[LatencyKey], bool]:
    """The keys a derived cell runs and, when the runtime ``folds`` constants, whether its output
    is one (then none of the keys of a component that only constants feed). States follow
    :class:`gas_core.network.CellBase`: two preprocessed inputs, then one per node (the sum of
    its live edges; zeros when it has none)."""
    used = cell.used_inputs(ops)
    live = [(edge, op) for edge, op, alive in zip(cell.edges, ops, cell.live(ops), strict=True) if alive]
    constant = list(constant_inputs)
    for node in range(len(cell.sums)):  # an edge reads an input or an earlier node: in node order
        constant.append(folds and all(constant[edge.src] for edge, _ in live if edge.node == node))  # none: zeros
    keys = [shapes.key(pre) for pre, u, c in zip(cell.pre, used, constant_inputs, strict=True) if u and not c]
    keys += [shapes.key(edge, op) for edge, op in live if not constant[edge.src]]
    for node, site in enumerate(cell.sums):
        arity = cell.arity(ops, node)
        if arity >= 2 and not constant[2 + node]:
            keys.append(shapes.key(site, n_inputs=arity))
    out_constant = all(constant[2:])
    if not out_constant:
        keys.append(shapes.key(cell.concat))
    return keys, out_constant


def predict_latency_us(genotype: Genotype, shapes: NetworkShapes, table: LatencyLookup) -> float:
    """Sum of :func:`own_cost_us` over :func:`derived_keys` (µs; under eager, the plain sum of
    medians); raises :class:`MissingLatencyKeys`."""
    keys = derived_keys(genotype, shapes)
    _lookup_all(keys, table)
    return math.fsum(own_cost_us(k, table, shapes.call) for k in keys)


class OverheadModel(BaseModel):
    """measured ≈ scale · Σ table, one parameter fitted on a calibration set of derived networks
    timed end to end, and only ever applied to other networks.

    Context timing (latency_service.profiler) removes most of the gap between per-key timings and
    a whole network; what is left grows with the network's work (cache effects the context only
    approximates), not with its number of calls: on a 2-core Xeon at 256×512 a two-parameter
    fit (scale + µs per call) came out collinear and non-physical (−33 µs per call), one scale
    did not. The raw sum stays the primary figure; this is reported beside it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    scale: float = Field(gt=0)
    fitted_on: int = Field(ge=1, description="number of calibration networks")
    residual_pct: float = Field(description="median |error| on the calibration networks, %")

    def predict_us(self, raw_us: float) -> float:
        return self.scale * raw_us

    @classmethod
    def fit(cls, raw_us: Sequence[float], measured_us: Sequence[float]) -> OverheadModel:
        """Relative least squares (each net weighted by 1/measured, so big nets do not dominate)."""
        if len(raw_us) != len(measured_us) or len(raw_us) < 3:
            raise ValueError("fit needs at least 3 networks, each with a raw sum and a measurement")
        r = torch.tensor(list(raw_us), dtype=torch.float64)
        y = torch.tensor(list(measured_us), dtype=torch.float64)
        scale = float((r / y).sum() / (r / y).square().sum())  # argmin Σ((s·r − y)/y)²
        resid = ((scale * r - y).abs() / y * 100).median()
        return cls(scale=scale, fitted_on=len(y), residual_pct=float(resid))
