"""GCN-Guided Module (paper §3.2, eqs. 5–7) and the ablation baselines of Fig. 5 / Table 5.

For an α of shape [K, p, q] (cells, edges, ops) the module returns α′ of the same shape:

    α′_0 = α_0
    α′_k = α_k + γ · Φ2( Adj · Φ1(s_{k−1}) · W_g + Φ1(s_{k−1}) ),   k = 1..K−1
    Adj  = softmax_row( (α_k W1) (s_{k−1} W2)ᵀ )                     (p × p)

with s_{k−1} = α_{k−1} as eqs. 5–7 write it (``source='alpha'``, the default), or α′_{k−1}
(``source='alpha_prime'``), which chains the links: cell k then receives every earlier cell's
push through k links. On CamVid the chained form collapsed 10–11 of 14 cells to one op on all
their edges (README, "Search on real images (CamVid)"): each link's push is nearly the same
vector on every edge, and chaining compounds it down the network.

Φ1 / Φ2 are kernel-1 1-D convolutions q → d → q over the p edges, without bias: the update is
then a function of α alone (α = 0 gives α′ = 0). With biases the module learns an edge- and
α-independent op preference that swamps α (seen in a 6-epoch search: α ≤ 0.03, α′ up to 8,
all edges of the last cells identical). One GCN layer (its own Φ1, Φ2, W1, W2, W_g) per
adjacent pair.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

GGMKind = Literal["none", "fc", "gcn"]
GraphKind = Literal["edge", "op"]
GGMSource = Literal["alpha", "alpha_prime"]


class EdgeGCN(nn.Module):
    """One edge-similarity GCN layer between cell k−1 and cell k. Inputs [p, q]; output [p, q]."""

    def __init__(self, q: int, d: int) -> None:
        super().__init__()
        self.phi1 = nn.Conv1d(q, d, 1, bias=False)
        self.phi2 = nn.Conv1d(d, q, 1, bias=False)
        self.w1 = nn.Parameter(torch.empty(q, q))
        self.w2 = nn.Parameter(torch.empty(q, q))
        self.wg = nn.Parameter(torch.empty(d, d))
        for w in (self.w1, self.w2, self.wg):
            nn.init.xavier_uniform_(w)

    def adjacency(self, a_k: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
        """Eq. 6: [p, p], row k-edge → softmax over the edges of cell k−1."""
        return torch.softmax((a_k @ self.w1) @ (a_prev @ self.w2).T, dim=-1)

    def forward(self, a_k: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
        emb = self.phi1(a_prev.T.unsqueeze(0)).squeeze(0).T  # [p, d]
        g = self.adjacency(a_k, a_prev) @ emb @ self.wg + emb  # eq. 7, [p, d]
        return self.phi2(g.T.unsqueeze(0)).squeeze(0).T  # [p, q]


class OpGCN(nn.Module):
    """Operation-identity graph (Table 5): every (edge, op) is a node with a scalar feature.
    Adj = softmax_row(vec(α_k) vec(α′_{k−1})ᵀ), [pq, pq]; Φ1/Φ2 map 1 → d → 1. The paper writes
    the plain product; the row softmax keeps it a propagation matrix, as in eq. 6."""

    def __init__(self, q: int, d: int) -> None:
        super().__init__()
        self.phi1 = nn.Conv1d(1, d, 1, bias=False)
        self.phi2 = nn.Conv1d(d, 1, 1, bias=False)
        self.wg = nn.Parameter(torch.empty(d, d))
        nn.init.xavier_uniform_(self.wg)

    def forward(self, a_k: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
        vk, vp = a_k.reshape(-1, 1), a_prev.reshape(-1, 1)
        adj = torch.softmax(vk @ vp.T, dim=-1)
        emb = self.phi1(vp.T.unsqueeze(0)).squeeze(0).T  # [pq, d]
        g = adj @ emb @ self.wg + emb
        return self.phi2(g.T.unsqueeze(0)).squeeze(0).T.reshape(a_k.shape)


class FCLink(nn.Module):
    """Fig. 5 strategy (c): a fully connected layer infers cell k's update from cell k−1."""

    def __init__(self, p: int, q: int, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(p * q, d, bias=False), nn.ReLU(), nn.Linear(d, p * q, bias=False))

    def forward(self, a_k: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
        return self.net(a_prev.reshape(-1)).reshape(a_k.shape)


class GGM(nn.Module):
    """α [K, p, q] → α′ [K, p, q]; ``kind='none'`` is the identity (independent cells, no link)."""

    def __init__(
        self,
        num_cells: int,
        p: int,
        q: int,
        kind: GGMKind = "gcn",
        graph: GraphKind = "edge",
        d: int = 64,
        gamma: float = 0.5,
        source: GGMSource = "alpha",
    ) -> None:
        super().__init__()
        if source not in ("alpha", "alpha_prime"):
            raise ValueError(f"ggm source must be alpha or alpha_prime, got {source!r}")
        self.kind, self.graph, self.gamma, self.source = kind, graph, gamma, source
        links: list[nn.Module] = []
        if kind == "gcn":
            links = [EdgeGCN(q, d) if graph == "edge" else OpGCN(q, d) for _ in range(num_cells - 1)]
        elif kind == "fc":
            links = [FCLink(p, q, d) for _ in range(num_cells - 1)]
        elif kind != "none":
            raise ValueError(f"ggm kind must be none, fc or gcn, got {kind!r}")
        self.links = nn.ModuleList(links)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return alpha
        out = [alpha[0]]
        for k, link in enumerate(self.links, start=1):
            prev = alpha[k - 1] if self.source == "alpha" else out[-1]
            out.append(alpha[k] + self.gamma * link(alpha[k], prev))
        return torch.stack(out)
