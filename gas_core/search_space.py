"""Network layout, the network's structure, and the shape contract.

The layout is plain data (pydantic), carried inside every genotype so a derived network can be
rebuilt anywhere. :func:`network_structure` turns it into the one ordered description of the
network: every component as a :class:`Site` (what runs, channels, stride, how far its input is
downsampled). :mod:`gas_core.network` builds its modules from the sites, :func:`cell_shapes`
names the latency key of every site at an input size, and
:func:`gas_core.latency.derived_keys` picks the sites a derived network runs, with the same
rules (:meth:`CellStructure.used_inputs`, :meth:`CellStructure.arity`) the derived cell uses.

Choices the paper leaves open (docs/architecture.md) live here and only here: stem strides (2, 1, 2), stem
channels, reduction positions (3, 7), head channels, cell 0 taking the stem output as both inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from torch import nn

from gas_core.keys import Dtype, LatencyKey, MemoryFormat, Runtime, ceil_div
from gas_core.ops import OPS, build_component, resolve
from gas_core.runtimes import REGISTRY as RUNTIMES

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
        return (self.num_cells, self.edges_per_cell, len(OPS))


@dataclass(frozen=True)
class Site:
    """One component of the network. ``op`` is None on a cell edge, where the genotype (or α)
    picks one of the candidate ops. ``scale`` is how far its (first) input is downsampled from
    the image: that input is ceil(H / scale) × ceil(W / scale). ``n_inputs`` is the most tensors
    it takes (a node's sum at full arity)."""

    op: str | None
    c_in: int
    c_out: int
    stride: int
    scale: int
    n_inputs: int = 1

    def build(self, op: str | None = None, affine: bool = True) -> nn.Module:
        """The module that runs here (``op`` chooses on an edge), tagged with its key spec."""
        return build_component(self._op(op), self.c_in, self.c_out, self.stride, affine)

    def key_hw(self, image_hw: tuple[int, int], op: str | None = None) -> tuple[int, int]:
        """h, w of this site's latency key for an image of ``image_hw`` (see :class:`~gas_core.ops.Entry`)."""
        scale = self.scale // self.stride if resolve(self._op(op)).sized_by_output else self.scale
        return ceil_div(image_hw[0], scale), ceil_div(image_hw[1], scale)

    def _op(self, op: str | None) -> str:
        name = op or self.op
        if name is None:
            raise ValueError("an edge site needs an op")
        return name


@dataclass(frozen=True)
class Edge(Site):
    """A cell edge: from state ``src`` (0, 1: the cell's inputs; 2 + i: node i) into ``node``."""

    src: int = 0
    node: int = 0


@dataclass(frozen=True)
class CellStructure:
    """One cell: preprocess of both inputs to C, the edges in α order, one sum per node, the
    concat. Cell 0 takes the stem output as both inputs; the cell after a reduction reduces its
    input 0 (twice the resolution of input 1) with a factorized reduce instead of a 1×1."""

    index: int
    reduction: bool
    c: int
    pre: tuple[Site, Site]
    edges: tuple[Edge, ...]
    sums: tuple[Site, ...]
    concat: Site
    scale_prev_prev: int
    scale_in: int
    scale_out: int

    def live(self, ops: Sequence[str]) -> list[bool]:
        """Per edge: does the derived network run it (``none`` edges are dropped)?"""
        return [not OPS[op].zero_cost for op in ops]

    def used_inputs(self, ops: Sequence[str]) -> tuple[bool, bool]:
        """Which preprocesses the derived network keeps: an input no live edge reads is skipped."""
        read = {e.src for e, alive in zip(self.edges, self.live(ops), strict=True) if alive}
        return 0 in read, 1 in read

    def arity(self, ops: Sequence[str], node: int) -> int:
        """Live edges into ``node``: its sum runs only at 2 or more."""
        return sum(1 for e, alive in zip(self.edges, self.live(ops), strict=True) if alive and e.node == node)


@dataclass(frozen=True)
class NetworkStructure:
    """The network, in order: stem convs, cells, then head, classifier and upsample."""

    layout: NetworkLayout
    stem: tuple[Site, ...]
    cells: tuple[CellStructure, ...]
    head: tuple[Site, Site, Site]


def _cell(layout: NetworkLayout, k: int, c_pp: int, c_p: int, s_pp: int, s_p: int) -> CellStructure:
    red, ck, n = layout.is_reduction(k), layout.cell_channels(k), layout.nodes
    s_out = s_p * 2 if red else s_p
    pre0 = (Site("preprocess_reduce", c_pp, ck, 2, s_pp) if k > 0 and layout.is_reduction(k - 1)
            else Site("preprocess_1x1", c_pp, ck, 1, s_pp))
    edges = tuple(Edge(None, ck, ck, 2 if red and src < 2 else 1, s_p if src < 2 else s_out, src=src, node=node)
                  for src, node in layout.edge_sources())
    sums = tuple(Site("node_sum", ck, ck, 1, s_out, 2 + node) for node in range(n))
    return CellStructure(k, red, ck, (pre0, Site("preprocess_1x1", c_p, ck, 1, s_p)), edges, sums,
                         Site("concat", ck, ck * n, 1, s_out, n), s_pp, s_p, s_out)


@cache
def network_structure(layout: NetworkLayout) -> NetworkStructure:
    """The layout as an ordered list of sites: the one description the network's modules, the
    table's keys and the derived network's keys are all read from."""
    stem, c, scale = [], 3, 1
    for c_out, st in zip(layout.stem_channels, layout.stem_strides, strict=True):
        stem.append(Site("stem_conv", c, c_out, st, scale))
        c, scale = c_out, scale * st
    cells = []
    c_pp = c_p = c
    s_pp = s_p = scale
    for k in range(layout.num_cells):
        cell = _cell(layout, k, c_pp, c_p, s_pp, s_p)
        cells.append(cell)
        c_pp, c_p, s_pp, s_p = c_p, cell.concat.c_out, s_p, cell.scale_out
    head = (Site(f"head_{layout.head}", c_p, layout.head_channels, 1, s_p),
            Site("classifier", layout.head_channels, layout.num_classes, 1, s_p),
            Site("upsample", layout.num_classes, layout.num_classes, s_p, s_p))
    return NetworkStructure(layout, tuple(stem), tuple(cells), head)


@dataclass(frozen=True)
class CellShape:
    """Where a cell runs: its structure plus the spatial sizes of its inputs and of its nodes."""

    plan: CellStructure
    hw_prev_prev: tuple[int, int]
    hw_in: tuple[int, int]
    hw_out: tuple[int, int]


@dataclass
class NetworkShapes:
    """Every latency key of a layout at one input configuration.

    ``edges[k][e][m]`` is the key of op ``m`` on edge ``e`` of cell ``k`` (``None`` for a
    zero-cost op); ``cell_fixed[k]`` the preprocess/node-sum/concat keys of cell ``k`` with
    multiplicity, at full node arity; ``stem``/``head`` the keys outside the cells; ``call``
    the ``graph_call`` key of a one-graph runtime (None otherwise): each own-graph key's timing
    entered its graph once, the network enters one graph once (see
    :func:`gas_core.latency.own_cost_us`). :meth:`key` names any site's key at this configuration.
    """

    structure: NetworkStructure
    image_hw: tuple[int, int]
    batch: int
    dtype: Dtype
    memory_format: MemoryFormat
    runtime: Runtime
    cells: list[CellShape] = field(default_factory=list)
    edges: list[list[list[LatencyKey | None]]] = field(default_factory=list)
    cell_fixed: list[list[LatencyKey]] = field(default_factory=list)
    stem: list[LatencyKey] = field(default_factory=list)
    head: list[LatencyKey] = field(default_factory=list)
    call: LatencyKey | None = None
    _made: dict[tuple, LatencyKey] = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> NetworkLayout:
        return self.structure.layout

    def key(self, site: Site, op: str | None = None, n_inputs: int | None = None) -> LatencyKey:
        """The key of ``site`` (running ``op`` on an edge, with ``n_inputs`` tensors if fewer than
        its full arity); cells of one shape repeat their keys, so each is built once."""
        name, n = op or site.op, n_inputs or site.n_inputs
        args = (name, site.c_in, site.c_out, site.stride, site.scale, n)
        if args not in self._made:
            h, w = site.key_hw(self.image_hw, op)
            self._made[args] = LatencyKey(op=name, c_in=site.c_in, c_out=site.c_out, h=h, w=w, stride=site.stride,
                                          n_inputs=n, batch=self.batch, dtype=self.dtype,
                                          memory_format=self.memory_format, runtime=self.runtime)
        return self._made[args]

    def hw(self, scale: int) -> tuple[int, int]:
        return ceil_div(self.image_hw[0], scale), ceil_div(self.image_hw[1], scale)

    def fixed(self) -> list[LatencyKey]:
        """Keys of everything α does not choose, with multiplicity (summed into L_fixed)."""
        return self.calls() + self.stem + [k for keys in self.cell_fixed for k in keys] + self.head

    def calls(self) -> list[LatencyKey]:
        """The graph entry a network pays once: ``[call]`` under a one-graph runtime, else ``[]``."""
        return [] if self.call is None else [self.call]

    def all_keys(self) -> list[LatencyKey]:
        """Every distinct key, in first-seen order (duplicates collapse: keys are hashable and
        equal by value)."""
        seen: dict[LatencyKey, None] = dict.fromkeys(self.calls() + self.stem)
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
    """Every key the network of ``layout`` runs at input ``(batch, 3, H, W)``: each site of
    :func:`network_structure`, each candidate op on each edge. The coverage test hooks a real
    derived network and checks that each call's key is among them."""
    h, w = input_hw
    if h < 1 or w < 1:
        raise ValueError(f"input size must be positive, got {input_hw}")
    st = network_structure(layout)
    sh = NetworkShapes(st, (h, w), batch, dtype, memory_format, runtime)
    sh.stem = [sh.key(site) for site in st.stem]
    ops = OPS.names()
    for cell in st.cells:
        sh.cells.append(CellShape(cell, sh.hw(cell.scale_prev_prev), sh.hw(cell.scale_in), sh.hw(cell.scale_out)))
        sh.edges.append([[None if OPS[m].zero_cost else sh.key(e, m) for m in ops] for e in cell.edges])
        sh.cell_fixed.append([sh.key(site) for site in (*cell.pre, *cell.sums, cell.concat)])
    sh.head = [sh.key(site) for site in st.head]
    if RUNTIMES[runtime].one_graph:
        sh.call = LatencyKey(op="graph_call", c_in=1, c_out=1, h=1, w=1, stride=1, batch=batch, dtype=dtype,
                             memory_format=memory_format, runtime=runtime)
    return sh
