"""The macro network shared by the supernet and the derived network, and ``GASNet``.

Stem (3×3 conv-BN-ReLU ×3) → cells → head (ASPP | PPM) → 1×1 classifier → bilinear upsample.
Every module is built from a site of :func:`gas_core.search_space.network_structure`, so each
forward call maps to a latency key of :func:`gas_core.search_space.cell_shapes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gas_core.genotype import Genotype
from gas_core.search_space import CellStructure, NetworkLayout, network_structure


class CellBase(nn.Module):
    """Shared cell plumbing: preprocess both inputs to C, run nodes, concat — every module built
    from the cell's sites (:class:`gas_core.search_space.CellStructure`).

    Inputs ``s0`` (N, c_prev_prev, H0, W0), ``s1`` (N, c_prev, H, W); output (N, nodes·C, H', W')
    with H' = ceil(H/2) in a reduction cell. Subclasses provide :meth:`edge`.
    """

    def __init__(self, cell: CellStructure, used_inputs: tuple[bool, bool] = (True, True)) -> None:
        super().__init__()
        self.plan = cell
        self.pre0 = cell.pre[0].build() if used_inputs[0] else None
        self.pre1 = cell.pre[1].build() if used_inputs[1] else None
        self.sums = nn.ModuleList(site.build() for site in cell.sums)
        self.concat = cell.concat.build()

    def edge(self, e: int, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        states: list[torch.Tensor | None] = [
            self.pre0(s0) if self.pre0 is not None else None,
            self.pre1(s1) if self.pre1 is not None else None,
        ]
        for node in range(len(self.plan.sums)):
            outs = []
            for e, edge in enumerate(self.plan.edges):
                x = states[edge.src] if edge.node == node else None
                y = self.edge(e, x, weights) if x is not None else None
                if y is not None:
                    outs.append(y)
            if not outs:
                n, _, h, w = s1.shape
                stride = 2 if self.plan.reduction else 1
                states.append(s1.new_zeros(n, self.plan.c, -(-h // stride), -(-w // stride)))
            elif len(outs) == 1:
                states.append(outs[0])
            else:
                states.append(self.sums[node](*outs))
        return self.concat(*states[2:])


class DerivedCell(CellBase):
    """A cell with one op per edge; ``none`` edges are dropped and unused preprocesses skipped."""

    def __init__(self, cell: CellStructure, ops: Sequence[str]) -> None:
        super().__init__(cell, cell.used_inputs(ops))
        self.ops = nn.ModuleDict(
            {str(e): edge.build(op) for e, (edge, op, alive) in enumerate(zip(cell.edges, ops, cell.live(ops),
                                                                               strict=True)) if alive})

    def edge(self, e: int, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        key = str(e)
        return self.ops[key](x) if key in self.ops else None


class Backbone(nn.Module):
    """Stem, cells, head, classifier, upsample. ``(N, 3, H, W) → (N, classes, H, W)``."""

    def __init__(self, layout: NetworkLayout, cells: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layout = layout
        st = network_structure(layout)
        self.stem = nn.Sequential(*(site.build() for site in st.stem))
        self.cells = nn.ModuleList(cells)
        self.head, self.classifier, self.upsample = (site.build() for site in st.head)

    def run(self, x: torch.Tensor, cell_weights: Sequence[torch.Tensor | None], parts: int | None = None) -> torch.Tensor:
        """``x`` (N, 3, H, W) through the network, one weight tensor (or None) per cell.

        ``parts`` stops after that many of the network's parts, in order: the stem, each cell,
        the head, the classifier with the final resize (None: all of them, the logits
        ``(N, classes, H, W)``). A prefix is what a benchmark times to find one part's cost inside
        the network; it runs the same modules in the same order as the whole."""
        n = len(self.cells)
        parts = n + 3 if parts is None else parts
        size = (int(x.shape[-2]), int(x.shape[-1]))
        s0 = s1 = self.stem(x)
        for cell, wts in zip(self.cells[: max(parts - 1, 0)], cell_weights[: max(parts - 1, 0)], strict=True):
            s0, s1 = s1, cell(s0, s1, wts)
        if parts > n + 1:
            s1 = self.head(s1)
        if parts > n + 2:
            s1 = self.upsample(self.classifier(s1), size)
        return s1


class GASNet(Backbone):
    """The derived network of a genotype: a plain module, exportable to ONNX and TorchScript.

    ``num_classes`` and ``head`` override the genotype's layout (e.g. transfer to CamVid).
    """

    def __init__(self, genotype: Genotype, num_classes: int | None = None, head: str | None = None) -> None:
        update: dict[str, object] = {}
        if num_classes is not None:
            update["num_classes"] = num_classes
        if head is not None:
            update["head"] = head
        layout = NetworkLayout.model_validate({**genotype.layout.model_dump(), **update})
        self.genotype = genotype.model_copy(update={"layout": layout})
        cells = [DerivedCell(cell, g.edges) for cell, g in zip(network_structure(layout).cells, genotype.cells,
                                                                strict=True)]
        super().__init__(layout, cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, [None] * len(self.cells))
