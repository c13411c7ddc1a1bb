"""β sweep, like the paper's Figure 6: searches on the synthetic data at the demo's settings
(``scripts/demo.sh``: 96×192, batch 8, 128 images, 3 warm-up + 6 search epochs, α lr 0.1 with
the GGM at 0.001) for several latency weights β and several seeds, against a live service on
this host. Each derived network's latency is read from the table (exact sum over its keys, no
timing noise) and timed end to end by ``POST /measure``. Plots the mean over seeds (with each
seed's points) against β, with val mIoU; writes JSON.

``python -m bench.beta_sweep [--betas 0 0.0005 0.005 0.05 0.5] [--seeds 0 1 2]``
``python -m bench.beta_sweep --replot bench/results/beta_sweep.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from gas_core.latency import predict_latency_us  # noqa: E402
from gas_core.search_space import NetworkLayout, cell_shapes  # noqa: E402
from latency_service.testing import QUICK_TIMING, start_server, stop_server  # noqa: E402
from search_client.cli import fetch_latency_term  # noqa: E402
from search_client.client import LatencyClient  # noqa: E402
from search_client.data import build_datasets  # noqa: E402
from search_client.search import SearchConfig, search  # noqa: E402

DEMO: dict[str, Any] = {"size": (96, 192), "batch": 8, "images": (128, 16), "warmup_epochs": 3, "epochs": 6,
                        "lr_a": 0.1, "lr_ggm": 0.001}


def by_beta(rows: list[dict], field: str) -> tuple[list[float], list[float], list[list[float]]]:
    betas = sorted({r["beta"] for r in rows})
    vals = [[r[field] for r in rows if r["beta"] == b] for b in betas]
    return betas, [statistics.fmean(v) for v in vals], vals


def plot(rows: list[dict], slug: str, size: tuple[int, ...], path: Path) -> None:
    """Derived-network latency from the table and measured (left), val mIoU (right), against β:
    the mean over seeds as a line, each seed as a dot."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    betas, mean_pred, pred = by_beta(rows, "predicted_ms")
    _, mean_meas, meas = by_beta(rows, "measured_ms")
    _, mean_miou, miou = by_beta(rows, "val_miou")
    xs = range(len(betas))
    ax.plot(xs, mean_pred, "o-", color="tab:blue", label="table sum of the derived net (mean over seeds)")
    ax.plot(xs, mean_meas, "s--", color="tab:orange", label="measured end to end (mean over seeds)")
    for i, (p, m) in enumerate(zip(pred, meas, strict=True)):
        ax.scatter([i] * len(p), p, color="tab:blue", s=10, alpha=0.5)
        ax.scatter([i] * len(m), m, color="tab:orange", s=10, alpha=0.5, marker="s")
    ax.set(xlabel="β (latency weight)", ylabel="derived network latency (ms)",
           title=f"latency against β on {slug}, {size[0]}×{size[1]}")
    ax.legend(fontsize=7)
    ax2.plot(xs, mean_miou, "o-", color="tab:red", label="mean over seeds")
    for i, v in enumerate(miou):
        ax2.scatter([i] * len(v), v, color="tab:red", s=10, alpha=0.5)
    ax2.set(xlabel="β (latency weight)", ylabel="val mIoU (derived arch, search)", title="accuracy against β")
    ax2.legend(fontsize=7)
    for a in (ax, ax2):
        a.set_xticks(list(xs), [f"{b:g}" for b in betas])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.0005, 0.005, 0.05, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=RESULTS / "beta_sweep.png")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the plot from this results JSON")
    args = ap.parse_args()
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        plot(saved["results"], saved["device"], tuple(saved["config"]["size"]), args.plot)
        return
    size = DEMO["size"]
    layout = NetworkLayout(num_classes=4)
    shapes = cell_shapes(layout, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(f"sqlite:///{tmp}/sweep.db", Path(tmp), {**QUICK_TIMING, "GAS_SAMPLES": "30", "GAS_WARMUP_MS": "50",
                                                                   "GAS_MIN_SAMPLE_MS": "1", "GAS_E2E_SAMPLES": "40",
                                                                   "GAS_CPU_THREADS": "0"})
        try:
            with LatencyClient(srv.url, timeout=600) as client:
                term, slug = fetch_latency_term(client, None, layout, size, 1, "float32", "contiguous", progress=False)
                table = client.table(slug, dtype="float32", batch=1).lookup()
                for seed in args.seeds:
                    train, val = build_datasets("synthetic", None, size, seed, DEMO["images"])
                    for beta in args.betas:
                        t0 = time.perf_counter()
                        cfg = SearchConfig(epochs=DEMO["epochs"], warmup_epochs=DEMO["warmup_epochs"],
                                           batch=DEMO["batch"], beta=beta, seed=seed, lr_a=DEMO["lr_a"],
                                           lr_ggm=DEMO["lr_ggm"])
                        res = search(cfg, layout, train, val, term, Path(tmp) / f"s{seed}-b{beta}", progress=False)
                        m = client.measure(res.genotype, size, batch=1, dtype="float32", memory_format="contiguous")
                        last = res.history[-1]
                        row = {"beta": beta, "seed": seed,
                               "predicted_ms": predict_latency_us(res.genotype, shapes, table) / 1e3,
                               "measured_ms": m.median_ms, "measured_p90_ms": m.p90_ms,
                               "search_expected_lat_ms": last["expected_lat_ms"], "top_prob": last["top_prob"],
                               "val_miou": last["val_miou"], "search_s": time.perf_counter() - t0,
                               "ops": [list(c.edges) for c in res.genotype.cells]}
                        rows.append(row)
                        print(f"seed {seed} β = {beta:<7g} table {row['predicted_ms']:6.3f} ms  measured "
                              f"{m.median_ms:6.3f} ms (p90 {m.p90_ms:6.3f})  top p {last['top_prob']:.2f}  "
                              f"val mIoU {last['val_miou']:.3f}  ({row['search_s']:.0f} s)", flush=True)
        finally:
            stop_server(srv)
    betas, mean_pred, _ = by_beta(rows, "predicted_ms")
    _, mean_meas, _ = by_beta(rows, "measured_ms")
    _, mean_miou, _ = by_beta(rows, "val_miou")
    for b, p, ms, q in zip(betas, mean_pred, mean_meas, mean_miou, strict=True):
        print(f"β = {b:<7g} mean over {len(args.seeds)} seeds: table {p:6.3f} ms, measured {ms:6.3f} ms, mIoU {q:.3f}")
    drops = [i for i in range(1, len(betas)) if mean_pred[i] > mean_pred[i - 1]]
    print("mean table latency falls monotonically with β" if not drops else
          "not monotone: the mean rises from β = " + ", ".join(f"{betas[i - 1]:g} to {betas[i]:g}" for i in drops))
    plot(rows, slug, size, args.plot)
    write_result("beta_sweep", {"config": {**DEMO, "betas": args.betas, "seeds": args.seeds}, "device": slug,
                                "summary": {"betas": betas, "mean_predicted_ms": mean_pred, "mean_measured_ms": mean_meas,
                                            "mean_val_miou": mean_miou, "rises_at": [betas[i] for i in drops]},
                                "results": rows}, args.out)


if __name__ == "__main__":
    main()
