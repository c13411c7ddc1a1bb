"""β sweep, like the paper's Figure 6: searches on the synthetic data with several latency
weights (same seed, small size) against a live service; each derived network is timed end to
end by ``POST /measure``. Plots measured latency and validation mIoU against β; writes JSON.

Short CPU searches need a β far above the paper's before the latency term shows (its gradient on
α is ~150× smaller than CE's at β = 0.05; tests/test_search_client.py), so the default sweep
adds β = 0.5 to the paper's four values. Usage:
``python -m bench.beta_sweep [--betas 0 0.0005 0.005 0.05 0.5] [--input-size 64 128] [--epochs 6]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from gas_core.search_space import NetworkLayout  # noqa: E402
from search_client.cli import fetch_latency_term  # noqa: E402
from search_client.client import LatencyClient  # noqa: E402
from search_client.data import build_datasets  # noqa: E402
from search_client.search import SearchConfig, search  # noqa: E402
from tests.support import start_server, stop_server  # noqa: E402


def plot(rows: list[dict], slug: str, size: tuple[int, ...], path: Path) -> None:
    """Measured latency (left axis) and val mIoU (right axis) against β, the legend under the axes."""
    fig, ax = plt.subplots(figsize=(6, 4.1))
    xs = range(len(rows))
    (h1,) = ax.plot(xs, [r["measured_ms"] for r in rows], "o-", color="tab:blue", label="measured latency")
    ax.set(xlabel="β", ylabel="measured latency (ms)", title=f"β sweep on {slug}, {size[0]}×{size[1]}")
    ax.set_xticks(list(xs), [f"{r['beta']:g}" for r in rows])
    ax2 = ax.twinx()
    (h2,) = ax2.plot(xs, [r["val_miou"] for r in rows], "s--", color="tab:red", label="val mIoU")
    ax2.set_ylabel("val mIoU (search)")
    ax.legend(handles=[h1, h2], loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.0005, 0.005, 0.05, 0.5])
    ap.add_argument("--input-size", type=int, nargs=2, default=(64, 128))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup-epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="steps per epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=RESULTS / "beta_sweep.png")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the plot from this results JSON")
    args = ap.parse_args()
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        plot(saved["results"], saved["device"], tuple(saved["config"]["input_size"]), args.plot)
        return
    size = tuple(args.input_size)
    train, val = build_datasets("synthetic", None, size, args.seed, (64, 16))
    layout = NetworkLayout(num_classes=train.num_classes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(f"sqlite:///{tmp}/sweep.db", Path(tmp), {"GAS_SAMPLES": "30", "GAS_WARMUP_MS": "50",
                                                                   "GAS_MIN_SAMPLE_MS": "1", "GAS_E2E_SAMPLES": "40",
                                                                   "GAS_CPU_THREADS": "0"})
        try:
            with LatencyClient(srv.url, timeout=600) as client:
                term, slug = fetch_latency_term(client, None, layout, size, 1, "float32", "contiguous", progress=False)
                for beta in args.betas:
                    cfg = SearchConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch=8,
                                       max_steps=args.steps, beta=beta, seed=args.seed)
                    res = search(cfg, layout, train, val, term, Path(tmp) / f"beta{beta}", progress=False)
                    m = client.measure(res.genotype, size, batch=1, dtype="float32", memory_format="contiguous")
                    last = res.history[-1]
                    rows.append({"beta": beta, "measured_ms": m.median_ms, "measured_p90_ms": m.p90_ms,
                                 "predicted_ms": m.predicted_ms, "search_expected_lat_ms": last["expected_lat_ms"],
                                 "val_miou": last["val_miou"], "ops": [list(c.edges) for c in res.genotype.cells]})
                    print(f"β = {beta:<7g} measured {m.median_ms:6.3f} ms (table {m.predicted_ms:6.3f})  "
                          f"expected LAT {last['expected_lat_ms']:6.3f} ms  val mIoU {last['val_miou']:.3f}")
        finally:
            stop_server(srv)
    plot(rows, slug, size, args.plot)
    write_result("beta_sweep", {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                "device": slug, "results": rows}, args.out)


if __name__ == "__main__":
    main()
