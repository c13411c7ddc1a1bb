"""The GAS supernet: independent cells of mixed ops, α as logits, Gumbel-softmax sampling (eq. 4),
the GCN-guided module and the paper's ablation switches.

α has shape [cells, edges, ops] (default [14, 5, 8]). With ``cells='shared'`` the parameter is
[2, edges, ops] (one normal, one reduction α, as in DARTS) and is expanded to every cell.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from gas_core.genotype import Genotype, derive
from gas_core.ggm import GGM, GGMKind, GGMSource, GraphKind
from gas_core.network import Backbone, CellBase, GASNet
from gas_core.ops import OPS
from gas_core.search_space import CellStructure, Edge, NetworkLayout, network_structure

CellSharing = Literal["shared", "independent"]


def default_ggm(cells: CellSharing) -> GGMKind:
    """The inter-cell module a sharing mode gets unless one is asked for: the GCN links
    independent cells (the paper's GAS); shared cells have one α per cell type and nothing to
    link (Fig. 5 strategy (a))."""
    return "none" if cells == "shared" else "gcn"


class MixedOp(nn.Module):
    """Σ_m z_m · o_m(x) over the candidate ops; zero-cost ops contribute nothing and are skipped.
    ``x`` (N, C, H, W), ``weights`` [ops] → (N, C, H/stride, W/stride)."""

    def __init__(self, edge: Edge) -> None:
        super().__init__()
        names = OPS.names()
        self.ops = nn.ModuleList(edge.build(name, affine=False) for name in names)
        self.live = [not OPS[name].zero_cost for name in names]

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for w, op, live in zip(weights, self.ops, self.live, strict=True):
            if live:
                y = w * op(x)
                out = y if out is None else out + y
        assert out is not None
        return out


class SearchCell(CellBase):
    def __init__(self, cell: CellStructure) -> None:
        super().__init__(cell)
        self.mixed = nn.ModuleList(MixedOp(edge) for edge in cell.edges)

    def edge(self, e: int, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        assert weights is not None
        return self.mixed[e](x, weights[e])


def gumbel_softmax_sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Eq. 4: softmax((α + G)/λ) over the last axis, G = −log(−log U). Relaxed, not hard."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    neg_log_u = (-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)
    g = -torch.log(neg_log_u)
    return F.softmax((logits + g) / temperature, dim=-1)


def temperature_at(epoch: int, epochs: int, start: float = 1.0, end: float = 0.03) -> float:
    """Exponential anneal per epoch: λ_0 = start, λ_{epochs−1} = end."""
    if epochs <= 1:
        return start
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return start * math.exp(t * math.log(end / start))


class Supernet(nn.Module):
    """``(N, 3, H, W) → ((N, classes, H, W) logits, Z [cells, edges, ops])``: the forward returns
    the architecture sample it ran with, so the latency term of the same step reads it from the
    call's result (no state outside ``state_dict``, nothing a DDP wrapper could hide)."""

    def __init__(
        self,
        layout: NetworkLayout | None = None,
        *,
        cells: CellSharing = "independent",
        ggm: GGMKind | None = None,
        graph: GraphKind = "edge",
        ggm_dim: int = 64,
        gamma: float = 0.5,
        ggm_source: GGMSource = "alpha",
    ) -> None:
        super().__init__()
        self.layout = layout or NetworkLayout()
        self.cell_sharing = cells
        K, p, q = self.layout.alpha_shape
        self.net = Backbone(self.layout, [SearchCell(cell) for cell in network_structure(self.layout).cells])
        n_alpha = 2 if cells == "shared" else K
        if cells not in ("shared", "independent"):
            raise ValueError(f"cells must be shared or independent, got {cells!r}")
        self.alpha = nn.Parameter(1e-3 * torch.randn(n_alpha, p, q))
        self.ggm = GGM(K, p, q, kind=ggm or default_ggm(cells), graph=graph, d=ggm_dim, gamma=gamma,
                       source=ggm_source)
        self.temperature = 1.0
        self.register_buffer(
            "_cell_type", torch.tensor([int(self.layout.is_reduction(k)) for k in range(K)]), persistent=False
        )

    def alphas(self) -> torch.Tensor:
        """α expanded to [cells, edges, ops] (before the GGM)."""
        return self.alpha[cast(torch.Tensor, self._cell_type)] if self.cell_sharing == "shared" else self.alpha

    def alpha_prime(self) -> torch.Tensor:
        """α′ = GGM(α), [cells, edges, ops]: the logits that are sampled and derived from."""
        return self.ggm(self.alphas())

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """α and the GGM's weights: optimised by Adam (§4.2)."""
        yield self.alpha
        yield from self.ggm.parameters()

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Operation weights: optimised by SGD (§4.2)."""
        return self.net.parameters()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Z = softmax((α′ + G)/λ), [cells, edges, ops], float32 on α's device."""
        return gumbel_softmax_sample(self.alpha_prime(), self.temperature, generator)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor | None = None, generator: torch.Generator | None = None,
        expected: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits, z)``. With ``z`` None a Gumbel sample is drawn (from ``generator``
        when given, so DDP ranks and micro-batches can each draw a reproducible one; it must live
        on α's device); ``expected`` uses softmax(α′). The sample is drawn in float32 even under
        autocast: α, the GGM and the latency term are tiny, and half precision would quantise the
        Gumbel noise and α's small steps."""
        if z is None:
            with torch.autocast(self.alpha.device.type, enabled=False):
                z = torch.softmax(self.alpha_prime(), -1) if expected else self.sample(generator)
        return self.net.run(x, list(z)), z

    def derived_network(self, genotype: Genotype | None = None) -> GASNet:
        """The derived :class:`GASNet` of ``genotype`` (default: argmax of α′) carrying this
        supernet's weights for the chosen ops: stem, preprocesses, head and classifier as they
        are, each edge's chosen op from its mixed op. The supernet's edge ops have no BN affine
        parameters (DARTS' convention); the derived ones start from the identity (1, 0), so in
        eval mode ``GASNet(x)`` equals the supernet run with that genotype's one-hot Z."""
        genotype = genotype or derive(self.alpha_prime(), self.layout)
        if genotype.layout != self.layout:
            raise ValueError("the genotype's layout differs from the supernet's")
        net = GASNet(genotype).to(self.alpha.device)
        src = self.net.state_dict()
        mapped = {}
        for name in net.state_dict():
            parts = name.split(".")
            if parts[0] == "cells" and parts[2] == "ops":  # cells.k.ops.e.* ← cells.k.mixed.e.ops.m.*
                k, e = int(parts[1]), int(parts[3])
                m = OPS.names().index(genotype.cells[k].edges[e])
                parts = ["cells", str(k), "mixed", str(e), "ops", str(m), *parts[4:]]
            mapped[name] = src[".".join(parts)] if ".".join(parts) in src else None
        missing = [n for n, v in mapped.items() if v is None]
        affine = {f"{m}.{p}" for m, mod in net.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
                  for p in ("weight", "bias")}
        if any(n not in affine for n in missing):
            raise RuntimeError(f"no supernet weights for {[n for n in missing if n not in affine]}")
        net.load_state_dict({n: v for n, v in mapped.items() if v is not None}, strict=False)
        return net
