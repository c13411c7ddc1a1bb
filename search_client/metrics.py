"""Segmentation scores, one convention everywhere: torchmetrics accumulates the confusion matrix
(rows: truth, columns: prediction; void pixels ignored) and sums it over the ranks under
torchrun; mIoU is the mean IoU over the classes that occur in the truth or the prediction,
which is how torchmetrics' macro Jaccard index reduces the same matrix (tested equal). It is
faster than the ``torch.bincount`` it replaced (``python -m bench.metrics_cost``: 0.44–0.84× its
time per update on this 2-core EPYC)."""

from __future__ import annotations

import math

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from search_client.data import IGNORE


def confusion_metric(num_classes: int, device: torch.device | str) -> MulticlassConfusionMatrix:
    """An empty accumulator on ``device``: ``update(pred [N, H, W], target [N, H, W])`` per batch.
    Argument checks are off: they cost a pass over every pixel and the inputs are ours."""
    return MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE, validate_args=False).to(device)


def summed_confusion(metric: MulticlassConfusionMatrix) -> torch.Tensor:
    """The matrix [C, C] (int64, CPU), summed over all ranks when a process group is running."""
    return metric.compute().long().cpu()


def class_iou(conf: torch.Tensor) -> list[float | None]:
    """IoU per class of a confusion matrix [C, C]; None for a class in neither truth nor prediction."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return [float(i / u) if u > 0 else None for i, u in zip(inter, union, strict=True)]


def miou(conf: torch.Tensor) -> float:
    """Mean of :func:`class_iou` over the classes that occur; NaN when none does."""
    present = [v for v in class_iou(conf) if v is not None]
    return sum(present) / len(present) if present else math.nan


def pixel_accuracy(conf: torch.Tensor) -> float:
    """Share of the labelled pixels predicted right (void excluded); NaN with no labelled pixel."""
    total = float(conf.sum())
    return float(conf.diag().sum()) / total if total else math.nan


def class_accuracy(conf: torch.Tensor) -> list[float | None]:
    """Recall per class (right / labelled as that class); None for a class absent from the truth."""
    conf = conf.double()
    rows = conf.sum(1)
    return [float(d / r) if r > 0 else None for d, r in zip(conf.diag(), rows, strict=True)]


def mean_class_accuracy(conf: torch.Tensor) -> float:
    """Mean of :func:`class_accuracy` over the classes present in the truth; NaN when none is."""
    present = [v for v in class_accuracy(conf) if v is not None]
    return sum(present) / len(present) if present else math.nan
