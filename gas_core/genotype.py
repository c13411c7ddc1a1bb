"""The genotype: plain data naming the op on each edge of each cell, plus the layout.

It is the artefact a search produces, the service measures and users ship, so it is a
versioned pydantic model with a JSON round trip and strict validation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gas_core.ops import OPS
from gas_core.search_space import NetworkLayout

GENOTYPE_SCHEMA_VERSION: Final = 1


class CellGenotype(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["normal", "reduction"]
    edges: tuple[str, ...] = Field(description="op name per edge, in NetworkLayout.edge_sources() order")


class Genotype(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = GENOTYPE_SCHEMA_VERSION
    layout: NetworkLayout = NetworkLayout()
    cells: tuple[CellGenotype, ...]

    @model_validator(mode="after")
    def _check(self) -> Genotype:
        lay = self.layout
        if len(self.cells) != lay.num_cells:
            raise ValueError(f"layout has {lay.num_cells} cells but the genotype lists {len(self.cells)}")
        for k, cell in enumerate(self.cells):
            want = "reduction" if lay.is_reduction(k) else "normal"
            if cell.type != want:
                raise ValueError(f"cell {k}: type {cell.type!r} but the layout makes it {want!r}")
            if len(cell.edges) != lay.edges_per_cell:
                raise ValueError(f"cell {k}: {len(cell.edges)} edges, expected {lay.edges_per_cell}")
            for e, op in enumerate(cell.edges):
                if op not in OPS:
                    raise ValueError(f"cell {k} edge {e}: unknown op {op!r}; known: {', '.join(OPS)}")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def op_indices(self) -> torch.Tensor:
        """[cells, edges] long tensor of op indices into the candidate ops (``OPS.names()``)."""
        return torch.tensor([[OPS.names().index(op) for op in c.edges] for c in self.cells], dtype=torch.long)

    def one_hot(self) -> torch.Tensor:
        """[cells, edges, ops] float one-hot, the Z of a derived network (for LAT)."""
        return torch.nn.functional.one_hot(self.op_indices(), len(OPS)).float()


def derive(alpha_prime: torch.Tensor, layout: NetworkLayout) -> Genotype:
    """Argmax of α′ [cells, edges, ops] per edge. ``none`` is a legal choice: the paper's
    searched nets use it as the cheapest op (supplement, Fig. 7)."""
    if tuple(alpha_prime.shape) != layout.alpha_shape:
        raise ValueError(f"α′ has shape {tuple(alpha_prime.shape)}, layout needs {layout.alpha_shape}")
    idx = alpha_prime.detach().argmax(dim=-1).tolist()
    cells = tuple(
        CellGenotype(
            type="reduction" if layout.is_reduction(k) else "normal",
            edges=tuple(OPS.names()[i] for i in row),
        )
        for k, row in enumerate(idx)
    )
    return Genotype(layout=layout, cells=cells)


def random_genotype(
    layout: NetworkLayout, generator: torch.Generator, op_probs: torch.Tensor | None = None
) -> Genotype:
    """A genotype drawn per edge from ``op_probs`` [ops] (uniform by default)."""
    probs = op_probs if op_probs is not None else torch.ones(len(OPS))
    n = layout.num_cells * layout.edges_per_cell
    idx = torch.multinomial(probs.float(), n, replacement=True, generator=generator)
    alpha = torch.nn.functional.one_hot(idx, len(OPS)).float().view(layout.alpha_shape)
    return derive(alpha, layout)
