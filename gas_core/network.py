"""The macro network shared by the supernet and the derived network, and ``GASNet``.

Stem (3×3 conv-BN-ReLU ×3) → cells → head (ASPP | PPM) → 1×1 classifier → bilinear upsample.
Every piece is built through :func:`gas_core.ops.build_component`, so each forward call maps to a
latency key of :func:`gas_core.search_space.cell_shapes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gas_core.genotype import Genotype
from gas_core.ops import OPS, build_component
from gas_core.search_space import CellPlan, NetworkLayout, cell_plan


class CellBase(nn.Module):
    """Shared cell plumbing: preprocess both inputs to C, run nodes, concat.

    Inputs ``s0`` (N, c_prev_prev, H0, W0), ``s1`` (N, c_prev, H, W); output (N, nodes·C, H', W')
    with H' = ceil(H/2) in a reduction cell. Subclasses provide :meth:`edge`.
    """

    def __init__(self, layout: NetworkLayout, plan: CellPlan, used_inputs: tuple[bool, bool] = (True, True)) -> None:
        super().__init__()
        self.layout = layout
        self.plan = plan
        self.sources = layout.edge_sources()
        c = plan.c
        pre0 = ("preprocess_reduce", 2) if plan.pre0_reduce else ("preprocess_1x1", 1)
        self.pre0 = build_component(pre0[0], plan.c_prev_prev, c, pre0[1]) if used_inputs[0] else None
        self.pre1 = build_component("preprocess_1x1", plan.c_prev, c, 1) if used_inputs[1] else None
        self.sums = nn.ModuleList(build_component("node_sum", c, c) for _ in range(layout.nodes))
        self.concat = build_component("concat", c, c * layout.nodes)

    def edge_stride(self, src: int) -> int:
        return 2 if self.plan.reduction and src < 2 else 1

    def edge(self, e: int, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        states: list[torch.Tensor | None] = [
            self.pre0(s0) if self.pre0 is not None else None,
            self.pre1(s1) if self.pre1 is not None else None,
        ]
        ref = s1
        for node in range(self.layout.nodes):
            outs = []
            for e, (src, dst) in enumerate(self.sources):
                if dst != node:
                    continue
                x = states[src]
                if x is not None:
                    y = self.edge(e, x, weights)
                    if y is not None:
                        outs.append(y)
            if not outs:
                n, _, h, w = ref.shape
                stride = 2 if self.plan.reduction else 1
                states.append(ref.new_zeros(n, self.plan.c, -(-h // stride), -(-w // stride)))
            elif len(outs) == 1:
                states.append(outs[0])
            else:
                states.append(self.sums[node](*outs))
        return self.concat(*states[2:])


class DerivedCell(CellBase):
    """A cell with one op per edge; ``none`` edges are dropped and unused preprocesses skipped."""

    def __init__(self, layout: NetworkLayout, plan: CellPlan, ops: Sequence[str]) -> None:
        used = tuple(
            any(src == i and not OPS[op].zero_cost for (src, _), op in zip(layout.edge_sources(), ops, strict=True))
            for i in (0, 1)
        )
        super().__init__(layout, plan, used)  # type: ignore[arg-type]
        self.ops = nn.ModuleDict()
        for e, ((src, _), op) in enumerate(zip(self.sources, ops, strict=True)):
            if not OPS[op].zero_cost:
                self.ops[str(e)] = build_component(op, plan.c, plan.c, self.edge_stride(src))

    def edge(self, e: int, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor | None:
        key = str(e)
        return self.ops[key](x) if key in self.ops else None


class Backbone(nn.Module):
    """Stem, cells, head, classifier, upsample. ``(N, 3, H, W) → (N, classes, H, W)``."""

    def __init__(self, layout: NetworkLayout, cells: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layout = layout
        stem, c = [], 3
        for c_out, s in zip(layout.stem_channels, layout.stem_strides, strict=True):
            stem.append(build_component("stem_conv", c, c_out, s))
            c = c_out
        self.stem = nn.Sequential(*stem)
        self.cells = nn.ModuleList(cells)
        c_last = layout.cell_channels(layout.num_cells - 1) * layout.nodes
        self.head = build_component(f"head_{layout.head}", c_last, layout.head_channels)
        self.classifier = build_component("classifier", layout.head_channels, layout.num_classes)
        self.upsample = build_component("upsample", layout.num_classes, layout.num_classes, layout.output_stride)

    def run(self, x: torch.Tensor, cell_weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        s0 = s1 = self.stem(x)
        for cell, wts in zip(self.cells, cell_weights, strict=True):
            s0, s1 = s1, cell(s0, s1, wts)
        return self.upsample(self.classifier(self.head(s1)), size)


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
        cells = [DerivedCell(layout, plan, g.edges) for plan, g in zip(cell_plan(layout), genotype.cells, strict=True)]
        super().__init__(layout, cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, [None] * len(self.cells))
