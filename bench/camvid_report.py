"""The CamVid study's report, rebuilt from whatever runs have finished (``OUT/runs/*.json``):
Table 3 (GAS against random (a) and (b)), Figure 5 (cell sharing and the link between cells),
Figure 6 (β), the deep-cell collapse per variant, the recipe check, and their plots.

``python -m bench.camvid_report bench/results/camvid`` redraws it without running anything.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.camvid_round2 import input_eval, round2_sections  # noqa: E402

GROUPS = {"GAS (GCN)": "train-search-gas-", "random (b): latency-matched": "train-random-b",
          "random (a): uniform": "train-random-a"}
FIG5 = {"shared cells": "search-shared-", "independent, no link": "search-none-",
        "independent, FC": "search-fc-", "independent, GCN (GAS)": "search-gas-",
        "FC fed α′ (first version)": "search-fcchain-", "GCN fed α′ (first version)": "search-gcnchain-",
        "GCN, link at lr 1e-4": "search-gcnlr0.0001-"}
HOLDOUTS = {"start": "the first 62 training images (the dusk sequence 0001TP)",
            "end": "the last 62 training images (the end of daylight 0016E5, the sequence val is cut from)"}


def load_runs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.4f} (n = 1)"
    return f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs):.4f} (n = {len(xs)})"


def _measure(runs: dict[str, dict], source: str) -> dict | None:
    return runs.get(f"measure-{source}")


def table3(runs: dict[str, dict]) -> tuple[list[str], dict[str, list[dict]]]:
    """Rows per network and a summary per group."""
    lines = ["| network | val mIoU (gas-eval) | best epoch mIoU | table latency ms | measured ms (p10–p90) | FPS | "
             "params | train wall |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {g: [] for g in GROUPS}
    for name, r in runs.items():
        group = next((g for g, prefix in GROUPS.items() if name.startswith(prefix)), None)
        if group is None:
            continue
        m = _measure(runs, r["source"])
        ev, mark = input_eval(runs, name)
        row = {"name": name, "miou": ev["miou"], "table_ms": r["table_ms"], "params": r["params"],
               "measured_ms": m["median_ms"] if m else None, "p10": m.get("p10_ms") if m else None,
               "p90": m["p90_ms"] if m else None, "fps": m["fps"] if m else None}
        if not mark:  # a score at native labels is not comparable with round 1's: out of the group's figures
            groups[group].append(row)
        r2 = "fit" in runs.get(r["source"], {})  # searched in round 2, on table-r2 (round 1's table is lost)
        meas = "—" if m is None else f"{m['median_ms']:.2f} ({m.get('p10_ms') or float('nan'):.2f}–{m['p90_ms']:.2f})"
        fps = "—" if m is None else f"{m['fps']:.1f}"
        lines.append(f"| {name.removeprefix('train-')} | {row['miou']:.4f}{mark} | {r['best_epoch_miou']:.4f} | "
                     f"{r['table_ms']:.2f}{' (table-r2)' if r2 else ''} | {meas} | {fps} | "
                     f"{r['params']:,} | {r['wall_s'] / 60:.0f} min |")
    lines += ["", "| group | val mIoU mean ± std | table ms mean | measured ms mean | FPS mean |", "|---|---|---|---|---|"]
    for g, rows in groups.items():
        measured = [r["measured_ms"] for r in rows if r["measured_ms"] is not None]
        lines.append(f"| {g} | {mean_std([r['miou'] for r in rows])} | "
                     f"{statistics.fmean([r['table_ms'] for r in rows]) if rows else float('nan'):.2f} | "
                     f"{statistics.fmean(measured) if measured else float('nan'):.2f} | "
                     f"{1e3 / statistics.fmean(measured) if measured else float('nan'):.1f} |")
    return lines, groups


def verdict(groups: dict[str, list[dict]]) -> str:
    """Does GAS beat random (b) beyond the seed-to-seed spread? Welch's t-test where both groups
    have ≥ 2 networks, and the plainer test: is the gap larger than both groups' std added?"""
    a = [r["miou"] for r in groups["GAS (GCN)"]]
    b = [r["miou"] for r in groups["random (b): latency-matched"]]
    if len(a) < 2 or len(b) < 2:
        return f"Not yet decidable: {len(a)} GAS and {len(b)} random (b) networks trained (need ≥ 2 each)."
    gap = statistics.fmean(a) - statistics.fmean(b)
    spread = statistics.stdev(a) + statistics.stdev(b)
    try:
        from scipy.stats import ttest_ind

        p: float | None = float(ttest_ind(a, b, equal_var=False).pvalue)
        ptxt = f"Welch's t-test p = {p:.3f} (n = {len(a)} and {len(b)})"
    except ImportError:  # scipy is a dev dependency
        p, ptxt = None, "scipy not installed: no t-test"
    who = "GAS" if gap > 0 else "random (b)"
    if abs(gap) <= spread:
        call = "The gap is within the seed-to-seed spread: no winner at this scale."
    elif p is not None and p < 0.05:
        call = f"{who} is ahead beyond the seed-to-seed spread, and significantly (p < 0.05)."
    else:
        call = (f"{who} is ahead by more than the two stds added, but not significantly (p ≥ 0.05 or untested): "
                "suggestive, not shown; more networks per group would decide it.")
    return f"GAS − random (b) = {gap:+.4f} mIoU; the two groups' std added = {spread:.4f}; {ptxt}. {call}"


def search_rows(runs: dict[str, dict], variants: dict[str, str]) -> tuple[list[str], dict[str, list[dict]]]:
    lines = ["| variant | seed | derived-path val mIoU | table latency ms | top p | cells collapsed | search wall |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {v: [] for v in variants}
    for v, prefix in variants.items():
        for name, r in runs.items():
            if not name.startswith(prefix) or r["kind"] != "search":
                continue
            groups[v].append(r)
            lines.append(f"| {v} | {r['config']['seed']} | {r['val_miou_derived']:.4f} | {r['table_ms']:.2f} | "
                         f"{r['top_prob']:.2f} | {r['collapse']['share']:.0%} ({len(r['collapse']['cells'])}/14) | "
                         f"{r['wall_s'] / 60:.0f} min |")
    return lines, groups


def collapse_lines(runs: dict[str, dict]) -> list[str]:
    """Item 4: the share of cells whose five edges chose one op, per search variant — of the
    derived α′ and of α alone (what the cells would choose without the link) — and how much of
    the link's push is the same on every edge in the deep cells (5–13)."""
    lines = ["| search | cells collapsed (α′, derived) | cells collapsed (α alone) | GGM push ‖Δ‖/‖α‖, cells 5–13 | "
             "common share of the push, cells 5–13 |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        if r["kind"] != "search":
            continue
        share = r.get("ggm_share")
        deep = slice(5, 14)
        gain = statistics.fmean(share["gain"][deep]) if share else float("nan")
        common = statistics.fmean(share["common"][deep]) if share else float("nan")
        alone = r.get("collapse_of_alpha", {}).get("share")
        lines.append(f"| {name.removeprefix('search-')} | {r['collapse']['share']:.0%} | "
                     f"{'—' if alone is None else f'{alone:.0%}'} | {gain:.2f} | {common:.2f} |")
    return lines


def plot_ggm(runs: dict[str, dict], path: Path) -> None:
    searches = {n: r for n, r in runs.items() if r["kind"] == "search" and r.get("ggm_share")}
    if not searches:
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for n, r in searches.items():
        cells = range(len(r["ggm_share"]["common"]))
        ax0.plot(cells, r["ggm_share"]["gain"], marker=".", lw=1, label=n.removeprefix("search-"))
        ax1.plot(cells, r["ggm_share"]["common"], marker=".", lw=1, label=n.removeprefix("search-"))
    ax0.set(xlabel="cell", ylabel="‖α′ − α‖ / ‖α‖", yscale="log", title="how much of α′ the link wrote")
    ax1.set(xlabel="cell", ylabel="share of ‖α′ − α‖² equal on all edges", ylim=(0, 1.02),
            title="the link's push: common to all edges (1) or per edge (0)")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def recipe_lines(runs: dict[str, dict]) -> list[str]:
    """Each recipe check: the curve's end, the last tenth's range (the issue's plateau test) and the
    mean of every tenth of the epochs (under a poly schedule the last tenth is flat by design, at
    a learning rate near 0; whether the tenths still rise says whether more epochs would help)."""
    lines = []
    for name in ("train-recipe", "train-recipe-0001TP"):
        r = runs.get(name)
        if r is None:
            continue
        cfg, curve = r["config"], [h["val_miou"] for h in r["history"]]
        tenth = max(1, len(curve) // 10)
        means = [statistics.fmean(curve[i:i + tenth]) for i in range(0, len(curve) - tenth + 1, tenth)]
        ok = r["last_tenth_range"] < 0.01
        lines.append(
            f"- `{name}`: one uniform random genotype trained on the rest of train and scored each epoch on "
            f"{HOLDOUTS[r.get('holdout_at') or 'start']}: {cfg['epochs']} epochs, batch {cfg['batch']}, lr "
            f"{cfg['lr']} poly, bootstrapping {cfg['bootstrap_fraction']}. Final {r['final_epoch_miou']:.4f}, best "
            f"{r['best_epoch_miou']:.4f}; the last tenth of epochs moved by {100 * r['last_tenth_range']:.2f} "
            f"points ({'< 1 point' if ok else '≥ 1 point'}); mean of each tenth: "
            f"{', '.join(f'{m:.3f}' for m in means)}; {r['wall_s'] / 60:.0f} min.")
    return lines or ["Not run yet."]


def plot_scatter(groups: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (g, rows), (colour, marker) in zip(groups.items(), (("tab:red", "*"), ("tab:blue", "o"), ("tab:grey", "s")),
                                           strict=True):
        xs = [r["measured_ms"] if r["measured_ms"] is not None else r["table_ms"] for r in rows]
        ax.scatter(xs, [r["miou"] for r in rows], c=colour, marker=marker, s=80 if marker == "*" else 40, label=g)
    ax.set(xlabel="latency, ms (measured end to end; table sum where not yet measured)", ylabel="val mIoU (gas-eval)",
           title="CamVid val: every trained network")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_searches(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for g, rows in groups.items():
        if rows:
            ax.scatter([r["table_ms"] for r in rows], [r["val_miou_derived"] for r in rows], label=g, s=40)
    ax.set(xlabel="table latency of the derived net, ms", ylabel="derived-path val mIoU (after BN recalibration)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: dict[str, dict], path: Path) -> None:
    trained = {n: r for n, r in runs.items() if r["kind"] in ("train", "recipe")}
    if not trained:
        return
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for n, r in trained.items():
        ax.plot([h["epoch"] for h in r["history"]], [h["val_miou"] for h in r["history"]], lw=1,
                label=n.removeprefix("train-") + (" (held-out train)" if r.get("holdout") else ""))
    ax.set(xlabel="epoch", ylabel="mIoU (val; held-out train for the recipe)", title="training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, scale: str) -> Path:
    runs = load_runs(out)
    t3, groups = table3(runs)
    f5, f5_groups = search_rows(runs, FIG5)
    betas = {f"β = {r['config']['beta']:g}": f"search-beta{r['config']['beta']:g}-"
             for r in runs.values() if r["kind"] == "search" and r["name"].startswith("search-beta")}
    if any(n.startswith("search-gas-") for n in runs):
        betas = {"β = 0.005": "search-gas-", **betas}
    f6, f6_groups = search_rows(runs, dict(sorted(betas.items())))
    plot_scatter(groups, out / "table3_scatter.png")
    plot_searches(f5_groups, out / "fig5.png", "Figure 5 on CamVid: cell sharing and the link between cells")
    plot_searches(f6_groups, out / "fig6_beta.png", "Figure 6 on CamVid: the latency weight β")
    plot_curves(runs, out / "curves.png")
    plot_ggm(runs, out / "ggm_share.png")
    table = runs.get("table", runs.get("table-r2", {}))
    md = [f"# CamVid study ({scale} scale)", "",
          f"Host: {table.get('machine', {}).get('cpu', '?')}, torch {table.get('machine', {}).get('torch', '?')}; "
          f"table {table.get('device', '?')}@{table.get('environment', '?')} ({table.get('keys', 0)} keys, profiled in "
          f"{table.get('wall_s', 0) / 60:.1f} min). Finished runs: {len(runs)}.", "",
          "## Recipe check (held-out training images, never val)", "", *recipe_lines(runs), "",
          "## Table 3: GAS against random architectures", "", *t3, "", verdict(groups), "",
          "![latency against mIoU](table3_scatter.png)", "", "## Figure 5: cells and their link", "", *f5, "",
          "![Figure 5](fig5.png)", "", "## Figure 6: β", "", *f6, "", "![Figure 6](fig6_beta.png)", "",
          "## Deep-cell collapse", "", *collapse_lines(runs), "", "![the link's share of α′ per cell](ggm_share.png)", "",
          *round2_sections(runs, out), "## Training curves", "", "![curves](curves.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    summary: dict[str, Any] = {"scale": scale, "runs": sorted(runs), "table3": groups, "verdict": verdict(groups)}
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results/camvid")
    write_report(target, json.loads((target / "study.json").read_text())["scale"] if (target / "study.json").is_file()
                 else "?")
