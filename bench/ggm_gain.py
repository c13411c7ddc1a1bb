"""Is the deep-cell collapse in α or in the link between cells? For a search checkpoint, the
link's push α′ − α per cell (its size against ‖α‖ and its share common to all edges, see
``bench.camvid_study.ggm_share``) three ways: the link at initialisation on its own initial α,
the trained link on the trained α, and the trained link on a fresh α of 1e-3 (is the
amplification in the link's weights, or in α?); then the trained link and α read the other way
(each link fed α_{k−1} instead of α′_{k−1}, or back), with the share of cells whose edges would
all take one op. Prints the figures and writes JSON.

``python -m bench.ggm_gain bench/results/camvid/work/search-gas-s0/checkpoint.pt``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.camvid_study import collapse, ggm_share
from bench.common import write_result
from gas_core.genotype import derive
from gas_core.ggm import GGMSource
from gas_core.search_space import NetworkLayout
from gas_core.supernet import Supernet
from search_client.search import SearchConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="checkpoint.pt of a gas-search run (its work directory)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    cfg, layout = SearchConfig.model_validate(ck["config"]), NetworkLayout.model_validate(ck["layout"])

    def supernet() -> Supernet:
        torch.manual_seed(cfg.seed)  # the initialisation the search started from
        return Supernet(layout, cells=cfg.cells, ggm=cfg.ggm, graph=cfg.graph, ggm_dim=cfg.ggm_dim, gamma=cfg.gamma,
                        ggm_source=cfg.ggm_source)

    fresh, trained = supernet(), supernet()
    trained.load_state_dict(ck["model"])
    small = 1e-3 * torch.randn(trained.alphas().shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rows = {"initial link, initial α": ggm_share(fresh.alphas(), fresh.alpha_prime()),
                "trained link, trained α": ggm_share(trained.alphas(), trained.alpha_prime()),
                "trained link, fresh α (1e-3)": ggm_share(small, trained.ggm(small))}
        collapsed = {cfg.ggm_source: collapse(derive(trained.alpha_prime(), layout))}
        other: GGMSource = "alpha" if cfg.ggm_source == "alpha_prime" else "alpha_prime"
        trained.ggm.source = other
        rows[f"trained link, trained α, links fed {other}"] = ggm_share(trained.alphas(), trained.alpha_prime())
        collapsed[other] = collapse(derive(trained.alpha_prime(), layout))
    for name, r in rows.items():
        print(f"{name}:\n  ‖α′−α‖/‖α‖ per cell {' '.join(f'{g:.2f}' for g in r['gain'])}\n"
              f"  common share per cell {' '.join(f'{c:.2f}' for c in r['common'])}")
    for source, c in collapsed.items():
        print(f"links fed {source}: cells with one op on every edge {c['cells']} (share {c['share']:.2f})")
    write_result("ggm_gain", {"checkpoint": str(args.checkpoint), "config": ck["config"], "epoch": ck["epoch"],
                              "rows": rows, "collapse": collapsed}, args.out)


if __name__ == "__main__":
    main()
