"""Artefacts of a search: the predicted-vs-measured report (a versioned pydantic model) and the
plots people look at rather than read: α′ per cell as a heat map, LAT / loss / mIoU per epoch."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from gas_core.ops import PRIMITIVES  # noqa: E402
from gas_core.quality import Agreement  # noqa: E402
from gas_core.table import TableComparison  # noqa: E402
from gas_core.target import TargetFit  # noqa: E402
from gas_core.wire import MeasuredOn  # noqa: E402


class DevicePrediction(BaseModel):
    """The derived network's latency predicted from another device's table (``--predict-on``)."""

    device: str
    environment: str
    predicted_ms: float | None = Field(description="plain table sum; null when the table lacks keys")
    missing_keys: int


class Report(MeasuredOn):
    predicted_ms: float | None
    measured_median_ms: float
    measured_p90_ms: float
    fps: float
    error_pct: float | None
    search_lat_ms: float
    val_miou: float | None
    genotype: str
    predicted_on: list[DevicePrediction] = Field(default_factory=list)
    agreement: Agreement | None = Field(default=None, description="both sides as intervals, whether the error lies "
                                        "within the timing noise, and warnings")
    target: TargetFit | None = Field(default=None, description="with --target-ms: T, the argmax's and the derived "
                                     "network's table latency, and the swaps that brought it within the band")


def format_report(r: Report) -> str:
    """The report as aligned lines; with an agreement, both latencies as ± intervals, the verdict,
    and every warning in words after the table (an error is never shown without its noise)."""
    a = r.agreement
    pred = "n/a" if r.predicted_ms is None else f"{r.predicted_ms:.3f}"
    if a is not None:
        pred += f" ± {a.predicted_pm_ms:.3f}"
    meas = f"{r.measured_median_ms:.3f}" + (f" ± {a.measured_pm_ms:.3f}" if a is not None else "")
    err = "n/a" if r.error_pct is None else f"{r.error_pct:+.1f} %"
    if a is not None:
        err += f" ({'within' if a.within_noise else 'beyond'} the timing noise of ±{a.noise_pct:.1f} %)"
    rows = [
        ("device", r.device), ("environment", r.environment),
        ("input", f"{r.batch}×3×{r.input_size[0]}×{r.input_size[1]} {r.dtype} {r.memory_format}, runtime {r.runtime}"),
        ("predicted latency (table)", f"{pred} ms"),
        *_target_rows(r.target),
        ("measured latency median", f"{meas} ms"),
        ("measured latency p90", f"{r.measured_p90_ms:.3f} ms"),
        ("measured FPS", f"{r.fps:.1f}"),
        ("error (pred − meas) / meas", err),
        ("val mIoU (search)", "n/a" if r.val_miou is None or math.isnan(r.val_miou) else f"{r.val_miou:.3f}"),
    ]
    for p in r.predicted_on:
        pred_p = f"{p.predicted_ms:.3f} ms" if p.predicted_ms is not None else f"n/a ({p.missing_keys} keys missing)"
        if p.predicted_ms is not None and r.predicted_ms:
            pred_p += f" (× {p.predicted_ms / r.predicted_ms:.2f} of this device's prediction)"
        rows.append((f"predicted on {p.device}@{p.environment}", pred_p))
    if a is not None and a.host_drift_pct is not None:
        rows.append(("host now vs. while profiled", f"{a.host_drift_pct:+.1f} % (reference workload)"))
    if a is not None and a.host_vs_quiet_pct is not None:
        rows.append(("host now vs. quiet", f"{a.host_vs_quiet_pct:+.1f} % (reference workload against this "
                                           "environment's quiet calibration)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    for w in a.warnings if a is not None else []:
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)


def _target_rows(fit: TargetFit | None) -> list[tuple[str, str]]:
    if fit is None:
        return []
    where = f"{100 * (fit.fitted_ms / fit.target_ms - 1):+.1f} %, band ±{100 * fit.tolerance:.0f} %"
    return [("target latency (table)", f"{fit.target_ms:.3f} ms ({1e3 / fit.target_ms:.1f} FPS at batch 1)"),
            ("derived vs. target", f"{fit.fitted_ms:.3f} ms ({where}; argmax of α′ {fit.argmax_ms:.3f} ms, "
             f"{len(fit.swaps)} swap(s)){'' if fit.within else ' — NOT within the band'}")]


def _edge_names(sources: list[tuple[int, int]]) -> list[str]:
    """``in0→n1``-style names of :meth:`NetworkLayout.edge_sources` (sources 0, 1 are the inputs)."""
    return [f"{'in' + str(src) if src < 2 else 'n' + str(src - 1)}→n{node + 1}" for src, node in sources]


def plot_alpha(alpha_prime: torch.Tensor, sources: list[tuple[int, int]], path: Path) -> None:
    """softmax(α′) as one heat map: a row per (cell, edge), labelled, a column per op. The colour
    scale is fitted to the probabilities (uniform is 1/ops; a flat map means α has not moved), the
    chosen op of each edge is outlined, and its probability written in."""
    probs = torch.softmax(alpha_prime.detach().float().cpu(), -1)
    cells, edges, ops = probs.shape
    flat = probs.reshape(cells * edges, ops)
    lo, hi = float(flat.min()), float(flat.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    fig, ax = plt.subplots(figsize=(8, max(4, cells * edges * 0.17)))
    im = ax.imshow(flat.numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
    ax.set_xticks(range(ops), PRIMITIVES, rotation=45, ha="right", fontsize=8)
    names = _edge_names(sources)
    ax.set_yticks(range(cells * edges), [f"cell {k} {names[e]}" for k in range(cells) for e in range(edges)],
                  fontsize=5.5)
    for k in range(1, cells):
        ax.axhline(k * edges - 0.5, color="white", lw=0.8)
    top = flat.argmax(-1)
    for r in range(cells * edges):
        c = int(top[r])
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=0.8))
        ax.text(c, r, f"{float(flat[r, c]):.2f}", ha="center", va="center", fontsize=4.5, color="white")
    ax.set_title(f"softmax(α′) per cell and edge (uniform = {1 / ops:.3f}; red: the derived op)\n"
                 f"median top-op probability {float(flat.max(-1).values.median()):.2f}", fontsize=9)
    ax.set_xlabel("candidate op")
    fig.colorbar(im, ax=ax, fraction=0.04, label="probability")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_history(history: list[dict], path: Path, warmup_epochs: int = 0) -> None:
    """Four panels per epoch: the latency term (cells-only LAT of the loss, and the whole
    network's expected/derived latency), loss and CE, the median top-op probability, and val mIoU.
    A dashed line marks where the weights-only warm-up ends and the search begins."""
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    ax.plot(ep, [h["lat_total_ms"] for h in history], "o-", label="sampled LAT, whole net")
    ax.plot(ep, [h["lat_ms"] for h in history], "x-", label="sampled LAT, cells only (loss, eqs. 8–9)")
    ax.plot(ep, [h["expected_lat_ms"] for h in history], "s--", label="expected LAT, whole net (softmax α′)")
    ax.plot(ep, [h["derived_lat_ms"] for h in history], "^:", label="derived net (argmax α′)")
    target = next((h["target_ms"] for h in history if h.get("target_ms") not in (None, "")), None)
    if target is not None:
        ax.axhline(float(target), color="tab:red", lw=1, label=f"target T = {float(target):.2f} ms")
        ax.axhspan(0.95 * float(target), 1.05 * float(target), color="tab:red", alpha=0.1, label="T ± 5 %")
    ax.set(xlabel="epoch", ylabel="latency from the table (ms)", title="latency term" + (" against T" if target else ""))
    ax.legend(fontsize=6.5)
    axes[1].plot(ep, [h["loss"] for h in history], "o-",
                 label="loss = CE + λ·|LAT/T − 1|" if target is not None else "loss = CE + β·log LAT")
    axes[1].plot(ep, [h["ce"] for h in history], "s--", label="CE")
    axes[1].set(xlabel="epoch", ylabel="loss (mean over the epoch)", title="loss")
    axes[1].legend(fontsize=7)
    axes[2].plot(ep, [h["top_prob"] for h in history], "o-")
    axes[2].axhline(1 / len(PRIMITIVES), color="grey", lw=0.8, ls=":", label="uniform")
    axes[2].set(xlabel="epoch", ylabel="median over edges of max softmax(α′)", title="α convergence", ylim=(0, 1))
    axes[2].legend(fontsize=7)
    axes[3].plot(ep, [h["val_miou"] for h in history], "o-")
    axes[3].set(xlabel="epoch", ylabel="val mIoU", title="val mIoU (derived arch, BN recalibrated)")
    if 0 < warmup_epochs < len(ep) + 1:
        for a in axes:
            a.axvline(warmup_epochs + 0.5, color="tab:gray", ls="--", lw=1)
            a.text(warmup_epochs + 0.5, 1.0, " search →", transform=a.get_xaxis_transform(), fontsize=7, va="top",
                   color="tab:gray")
            a.text(warmup_epochs + 0.5, 1.0, "← warm-up ", transform=a.get_xaxis_transform(), fontsize=7, va="top",
                   ha="right", color="tab:gray")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(pair: TableComparison, name_a: str, name_b: str, path: Path) -> None:
    """Two panels: the geometric-mean ratio B / A per op (log scale, bar = geomean, whisker =
    min…max), and every common key's latency on A against B (log–log, with y = x and y = g·x for
    the overall geomean g), coloured by op — a key off the band moved against the rest."""
    ops = [op for op, s in pair.per_op.items() if s.geomean_ratio is not None]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.2))
    g = [pair.per_op[op].geomean_ratio or 1.0 for op in ops]
    # max(0, …): for a one-key op min = geomean = max, but exp(mean(log)) rounds a hair past them,
    # and matplotlib refuses a negative whisker ("'xerr' must not contain negative values")
    lo = [max(0.0, gi - (pair.per_op[op].min_ratio or gi)) for gi, op in zip(g, ops, strict=True)]
    hi = [max(0.0, (pair.per_op[op].max_ratio or gi) - gi) for gi, op in zip(g, ops, strict=True)]
    colors = ["tab:red" if gi > 1 else "tab:green" for gi in g]
    ax0.barh(range(len(ops)), g, xerr=[lo, hi], color=colors, alpha=0.75, capsize=3)
    ax0.set_yticks(range(len(ops)), [f"{op} ({pair.per_op[op].keys})" for op in ops], fontsize=8)
    ax0.set_xscale("log")
    ax0.axvline(1.0, color="black", lw=0.8)
    if pair.geomean_ratio is not None:
        ax0.axvline(pair.geomean_ratio, color="tab:blue", ls="--", lw=0.8, label=f"all keys {pair.geomean_ratio:.3f}")
        ax0.legend(fontsize=8, loc="lower right")
    ax0.set(xlabel="latency ratio B / A (geomean, min…max)", title="per op: red = dearer on B, green = cheaper")
    cmap = plt.get_cmap("tab20")
    all_ops = sorted({k.op for k in pair.keys})
    positive = [k for k in pair.keys if k.a_us > 0 and k.b_us > 0]
    for i, op in enumerate(all_ops):
        pts = [k for k in positive if k.op == op]
        if pts:
            ax1.scatter([k.a_us for k in pts], [k.b_us for k in pts], s=12, color=cmap(i % 20), label=op, alpha=0.8)
    if positive:
        lim = [min(min(k.a_us, k.b_us) for k in positive) / 1.5, max(max(k.a_us, k.b_us) for k in positive) * 1.5]
        ax1.plot(lim, lim, color="black", lw=0.8, label="y = x")
        if pair.geomean_ratio is not None:
            ax1.plot(lim, [v * pair.geomean_ratio for v in lim], color="tab:blue", ls="--", lw=0.8,
                     label=f"y = {pair.geomean_ratio:.3f}·x")
        ax1.set(xlim=lim, ylim=lim)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    rho = "n/a" if pair.spearman is None else f"{pair.spearman:.3f}"
    tau = "n/a" if pair.kendall is None else f"{pair.kendall:.3f}"
    ax1.set(xlabel=f"A: {name_a} (median µs)", ylabel=f"B: {name_b} (median µs)",
            title=f"{pair.common_keys} common keys, Spearman ρ {rho}, Kendall τ {tau}")
    ax1.legend(fontsize=6, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
