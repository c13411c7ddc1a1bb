"""Network layout and the shape contract.

The layout is plain data (pydantic), carried inside every genotype so a derived network can be
rebuilt anywhere. :func:`cell_shapes` walks the layout exactly as :mod:`gas_core.network` builds
it and names the latency key of every edge op and of every fixed component; it is the single
source of truth for which keys a table must hold.

Choices the paper leaves open (docs/architecture.md) live here and only here: stem strides (2, 1, 2), stem
channels, reduction positions (3, 7), head channels, cell 0 taking the stem output as both inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from gas_core.keys import Dtype, LatencyKey, MemoryFormat, Runtime, ceil_div
from gas_core.ops import OPS, PRIMITIVES

Head = Literal["aspp", "ppm"]
MAX_WIDTH = 2**20
"""Widest tensor (channels) a layout may describe: far beyond any real network, far below the
32-bit bound of a latency key's columns, so an absurd layout is a 422 naming its field rather
than a key that fails its own validation deep inside the service."""
Width = Annotated[int, Field(strict=True, ge=1, le=MAX_WIDTH)]


class NetworkLayout(BaseModel):
    """The macro structure shared by the supernet and every derived network."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_cells: int = Field(default=14, strict=True, ge=1, le=64)
    nodes: int = Field(default=2, strict=True, ge=1, le=6, description="intermediate nodes per cell")
    init_channels: int = Field(default=8, strict=True, ge=1, le=1024, description="C of the first cells")
    reduction_cells: tuple[StrictInt, ...] = Field(default=(3, 7), max_length=64)
    stem_channels: tuple[Width, ...] = Field(default=(16, 16, 32), max_length=16)
    stem_strides: tuple[StrictInt, ...] = Field(default=(2, 1, 2), max_length=16)
    head: Head = "aspp"
    head_channels: int = Field(default=64, strict=True, ge=1, le=4096)
    num_classes: int = Field(default=19, strict=True, ge=1, le=1000)

    @model_validator(mode="after")
    def _check(self) -> NetworkLayout:
        if len(self.stem_channels) != len(self.stem_strides) or not self.stem_channels:
            raise ValueError("stem_channels and stem_strides must be non-empty and of equal length")
        if any(s not in (1, 2) for s in self.stem_strides):
            raise ValueError("stem_strides must each be 1 or 2")
        if any(c < 1 for c in self.stem_channels):
            raise ValueError("stem_channels must be positive")
        if list(self.reduction_cells) != sorted(set(self.reduction_cells)):
            raise ValueError("reduction_cells must be strictly increasing")
        if any(not 0 <= r < self.num_cells for r in self.reduction_cells):
            raise ValueError(f"reduction_cells must lie in [0, {self.num_cells})")
        widest = self.cell_channels(self.num_cells - 1) * self.nodes
        if widest > MAX_WIDTH:
            raise ValueError(f"reduction_cells: init_channels {self.init_channels} doubled at {len(self.reduction_cells)} "
                             f"reductions makes the last cell {widest} channels wide, beyond {MAX_WIDTH}")
        return self

    @property
    def edges_per_cell(self) -> int:
        return len(self.edge_sources())

    def edge_sources(self) -> list[tuple[int, int]]:
        """(source, node) per edge in α order. Sources 0 and 1 are the cell inputs, 2+i is node i."""
        return [(src, node) for node in range(self.nodes) for src in range(2 + node)]

    def is_reduction(self, cell: int) -> bool:
        return cell in self.reduction_cells

    def cell_channels(self, cell: int) -> int:
        """C of ``cell``: doubles at every reduction cell up to and including it."""
        return self.init_channels * 2 ** sum(1 for r in self.reduction_cells if r <= cell)

    @property
    def output_stride(self) -> int:
        out = 2 ** len(self.reduction_cells)
        for s in self.stem_strides:
            out *= s
        return out

    @property
    def alpha_shape(self) -> tuple[int, int, int]:
        return (self.num_cells, self.edges_per_cell, len(PRIMITIVES))


@dataclass(frozen=True)
class CellPlan:
    """Channels of one cell, from the layout alone (the network and the shapes share it)."""

    index: int
    reduction: bool
    c: int
    c_prev_prev: int
    c_prev: int
    pre0_reduce: bool
    """Input 0 (cell k-2) is at twice the resolution of input 1: factorized reduce, not 1×1."""


def cell_plan(layout: NetworkLayout) -> list[CellPlan]:
    """Cell 0 takes the stem output as both inputs; the cell after a reduction reduces input 0."""
    plans = []
    c_pp = c_p = layout.stem_channels[-1]
    for k in range(layout.num_cells):
        ck = layout.cell_channels(k)
        pre0 = k > 0 and layout.is_reduction(k - 1)
        plans.append(CellPlan(k, layout.is_reduction(k), ck, c_pp, c_p, pre0))
        c_pp, c_p = c_p, ck * layout.nodes
    return plans


@dataclass(frozen=True)
class CellShape:
    """Where a cell runs: its plan plus the spatial sizes of its inputs and of its nodes."""

    plan: CellPlan
    hw_prev_prev: tuple[int, int]
    hw_in: tuple[int, int]
    hw_out: tuple[int, int]


@dataclass
class NetworkShapes:
    """Every latency key of a layout at one input configuration.

    ``edges[k][e][m]`` is the key of op ``m`` on edge ``e`` of cell ``k`` (``None`` for a
    zero-cost op); ``cell_fixed[k]`` the preprocess/node-sum/concat keys of cell ``k`` with
    multiplicity, at full node arity; ``stem``/``head`` the keys outside the cells.
    """

    layout: NetworkLayout
    cells: list[CellShape]
    edges: list[list[list[LatencyKey | None]]]
    cell_fixed: list[list[LatencyKey]]
    stem: list[LatencyKey]
    head: list[LatencyKey]

    def fixed(self) -> list[LatencyKey]:
        """Keys of everything α does not choose, with multiplicity (summed into L_fixed)."""
        return self.stem + [k for keys in self.cell_fixed for k in keys] + self.head

    def all_keys(self) -> list[LatencyKey]:
        """Every distinct key, in first-seen order (duplicates collapse: keys are hashable and
        equal by value)."""
        seen: dict[LatencyKey, None] = dict.fromkeys(self.stem)
        for k, cell in enumerate(self.edges):
            for edge in cell:
                seen.update(dict.fromkeys(op_key for op_key in edge if op_key is not None))
            seen.update(dict.fromkeys(self.cell_fixed[k]))
        seen.update(dict.fromkeys(self.head))
        return list(seen)


def cell_shapes(
    layout: NetworkLayout,
    input_hw: tuple[int, int],
    batch: int = 1,
    dtype: Dtype = "float32",
    memory_format: MemoryFormat = "contiguous",
    runtime: Runtime = "eager",
) -> NetworkShapes:
    """Walk ``layout`` at input ``(batch, 3, H, W)`` and return every key it runs.

    Mirrors :class:`gas_core.network.Backbone` step for step; the coverage test hooks a real
    derived network and checks that each call's key is in :meth:`NetworkShapes.all_keys`.
    """
    h, w = input_hw
    if h < 1 or w < 1:
        raise ValueError(f"input size must be positive, got {input_hw}")

    made: dict[tuple, LatencyKey] = {}  # cells of one shape repeat their keys: build each key once

    def key(op: str, c_in: int, c_out: int, hw: tuple[int, int], stride: int = 1, n: int = 1) -> LatencyKey:
        args = (op, c_in, c_out, hw, stride, n)
        if args not in made:
            made[args] = LatencyKey(op=op, c_in=c_in, c_out=c_out, h=hw[0], w=hw[1], stride=stride, n_inputs=n,
                                    batch=batch, dtype=dtype, memory_format=memory_format, runtime=runtime)
        return made[args]

    stem: list[LatencyKey] = []
    c, hw = 3, (h, w)
    for c_out, s in zip(layout.stem_channels, layout.stem_strides, strict=True):
        stem.append(key("stem_conv", c, c_out, hw, s))
        c, hw = c_out, (ceil_div(hw[0], s), ceil_div(hw[1], s))

    cells: list[CellShape] = []
    edges: list[list[list[LatencyKey | None]]] = []
    cell_fixed: list[list[LatencyKey]] = []
    hw_pp = hw_p = hw
    for plan in cell_plan(layout):
        red, ck, c_pp, c_p = plan.reduction, plan.c, plan.c_prev_prev, plan.c_prev
        hw_out = (ceil_div(hw_p[0], 2), ceil_div(hw_p[1], 2)) if red else hw_p
        cells.append(CellShape(plan, hw_pp, hw_p, hw_out))
        fixed = [
            key("preprocess_reduce", c_pp, ck, hw_pp, 2)
            if plan.pre0_reduce
            else key("preprocess_1x1", c_pp, ck, hw_pp),
            key("preprocess_1x1", c_p, ck, hw_p),
        ]
        cell_edges: list[list[LatencyKey | None]] = []
        for src, _node in layout.edge_sources():
            stride = 2 if red and src < 2 else 1
            src_hw = hw_p if src < 2 else hw_out
            cell_edges.append([None if OPS[m].zero_cost else key(m, ck, ck, src_hw, stride) for m in PRIMITIVES])
        for node in range(layout.nodes):
            fixed.append(key("node_sum", ck, ck, hw_out, 1, 2 + node))
        fixed.append(key("concat", ck, ck * layout.nodes, hw_out, 1, layout.nodes))
        edges.append(cell_edges)
        cell_fixed.append(fixed)
        hw_pp, hw_p = hw_p, hw_out
    c_last = cells[-1].plan.c * layout.nodes if cells else c

    head_op = f"head_{layout.head}"
    head = [
        key(head_op, c_last, layout.head_channels, hw_p),
        key("classifier", layout.head_channels, layout.num_classes, hw_p),
        key("upsample", layout.num_classes, layout.num_classes, (h, w), layout.output_stride),
    ]
    return NetworkShapes(layout, cells, edges, cell_fixed, stem, head)
