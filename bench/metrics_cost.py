"""What scoring costs per batch: torchmetrics' ``MulticlassConfusionMatrix.update`` (what
``search_client.metrics`` uses) against the hand-written ``torch.bincount`` it replaced, on the
same predictions. Issue: a library replaces a hand-written piece only where it is at least as
fast, so this prints both and their ratio, each with its spread, and writes JSON.

    python -m bench.metrics_cost [--rounds 30] [--out bench/results/metrics_cost.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import write_result
from search_client.data import IGNORE
from search_client.metrics import confusion_metric

SHAPES = {"camvid-half batch 8": (8, 180, 240, 11), "camvid batch 4": (4, 360, 480, 11),
          "cityscapes one image": (1, 1024, 2048, 19)}


def bincount_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The hand-written accumulation: drop void, index = truth·C + prediction, bincount. → [C, C]."""
    keep = target != IGNORE
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _times_ms(fn: Callable[[], object], rounds: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _summary(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=10)
    return {"median_ms": statistics.median(ms), "p10_ms": q[0], "p90_ms": q[-1], "all_ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="timed updates per method and shape")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/metrics_cost.json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, (n, h, w, c) in SHAPES.items():
        pred = torch.randint(0, c, (n, h, w))
        target = torch.randint(0, c, (n, h, w))
        target[:, : h // 10] = IGNORE  # a band of void, as real labels have
        metric = confusion_metric(c, "cpu")
        lib = _times_ms(lambda: metric.update(pred, target), args.rounds)  # noqa: B023 — used within the iteration
        hand = _times_ms(lambda: bincount_confusion(pred, target, c), args.rounds)  # noqa: B023
        ref = confusion_metric(c, "cpu")
        ref.update(pred, target)
        assert torch.equal(ref.compute().long(), bincount_confusion(pred, target, c)), name
        results[name] = {"shape": [n, h, w], "classes": c, "torchmetrics": _summary(lib),
                         "bincount": _summary(hand),
                         "ratio_median": statistics.median(lib) / statistics.median(hand)}
        print(f"{name:<22} torchmetrics {statistics.median(lib):7.2f} ms (p10–p90 {_summary(lib)['p10_ms']:.2f}–"
              f"{_summary(lib)['p90_ms']:.2f})  bincount {statistics.median(hand):7.2f} ms (p10–p90 "
              f"{_summary(hand)['p10_ms']:.2f}–{_summary(hand)['p90_ms']:.2f})  ratio "
              f"{results[name]['ratio_median']:.2f}")
    write_result("metrics_cost", {"rounds": args.rounds, "torch_threads": torch.get_num_threads(),
                                  "results": results}, args.out)


if __name__ == "__main__":
    main()
