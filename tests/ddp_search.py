"""Run a tiny search and save α — under torchrun (N ranks) or alone (``--accum N``).
Used by test_search_client.py::test_ddp_matches_single_process_accumulation."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gas_core.latency import LatencyTerm, work_table
from gas_core.search_space import NetworkLayout, cell_shapes
from search_client.data import build_datasets
from search_client.runtime import ComputeConfig, init_distributed, run_rank
from search_client.search import SearchConfig, search

LAYOUT = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=8, num_classes=4)


def term_for(layout: NetworkLayout, hw: tuple[int, int]) -> LatencyTerm:
    """A deterministic table (µs ∝ work) so ranks and the single process agree exactly."""
    sh = cell_shapes(layout, hw)
    return LatencyTerm.from_table(sh, work_table(sh))


def main() -> None:
    out, accum = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    train, val = build_datasets("synthetic", None, (32, 48), 0, (16, 5))
    cfg = SearchConfig(epochs=2, batch=4, accum=accum, seed=3, beta=0.05, max_steps=2, lr_a=0.01)
    res = search(cfg, LAYOUT, train, val, term_for(LAYOUT, (32, 48)), out, dist_info=d, progress=False,
                 compute=ComputeConfig(device="cpu", workers=1))
    if d.main:
        torch.save({"alpha": res.supernet.alpha.detach(), "ggm": res.supernet.ggm.state_dict(),
                    "val_miou": [h["val_miou"] for h in res.history]}, out / "alpha.pt")


if __name__ == "__main__":
    run_rank(main)
