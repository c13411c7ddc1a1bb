"""Artefacts of a search: the predicted-vs-measured report (a versioned pydantic model) and the
plots people look at rather than read: α′ per cell as a heat map, LAT / loss / mIoU per epoch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from gas_core.ops import PRIMITIVES  # noqa: E402


class Report(BaseModel):
    schema_version: Literal[1] = 1
    device: str
    environment: str
    input_size: tuple[int, int]
    batch: int
    dtype: str
    memory_format: str
    predicted_ms: float | None
    measured_median_ms: float
    measured_p90_ms: float
    fps: float
    error_pct: float | None
    search_lat_ms: float
    val_miou: float | None
    genotype: str


def format_report(r: Report) -> str:
    pred = "n/a" if r.predicted_ms is None else f"{r.predicted_ms:.3f}"
    err = "n/a" if r.error_pct is None else f"{r.error_pct:+.1f} %"
    rows = [
        ("device", r.device), ("environment", r.environment),
        ("input", f"{r.batch}×3×{r.input_size[0]}×{r.input_size[1]} {r.dtype} {r.memory_format}"),
        ("predicted latency (table)", f"{pred} ms"),
        ("measured latency median", f"{r.measured_median_ms:.3f} ms"),
        ("measured latency p90", f"{r.measured_p90_ms:.3f} ms"),
        ("measured FPS", f"{r.fps:.1f}"),
        ("error (pred − meas) / meas", err),
        ("val mIoU (search)", "n/a" if r.val_miou is None or math.isnan(r.val_miou) else f"{r.val_miou:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def plot_alpha(alpha_prime: torch.Tensor, path: Path) -> None:
    """softmax(α′) as one heat map: a row per (cell, edge), a column per op."""
    probs = torch.softmax(alpha_prime.detach(), -1)
    cells, edges, ops = probs.shape
    fig, ax = plt.subplots(figsize=(7, max(4, cells * edges * 0.12)))
    im = ax.imshow(probs.reshape(cells * edges, ops).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(ops), PRIMITIVES, rotation=45, ha="right", fontsize=8)
    ax.set_yticks([k * edges + edges / 2 - 0.5 for k in range(cells)], [f"cell {k}" for k in range(cells)], fontsize=7)
    for k in range(1, cells):
        ax.axhline(k * edges - 0.5, color="white", lw=0.6)
    ax.set_title("op probabilities softmax(α′) per cell and edge")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [h["lat_ms"] for h in history], "o-", label="sampled LAT")
    axes[0].plot(ep, [h["expected_lat_ms"] for h in history], "s--", label="expected LAT")
    axes[0].plot(ep, [h["derived_lat_ms"] for h in history], "^:", label="derived LAT")
    axes[0].set(xlabel="epoch", ylabel="ms", title="latency term")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, [h["loss"] for h in history], "o-", label="loss")
    axes[1].plot(ep, [h["ce"] for h in history], "s--", label="CE")
    axes[1].set(xlabel="epoch", title="loss")
    axes[1].legend(fontsize=8)
    axes[2].plot(ep, [h["val_miou"] for h in history], "o-")
    axes[2].set(xlabel="epoch", title="val mIoU (derived arch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
