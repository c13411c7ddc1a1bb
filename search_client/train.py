"""Retraining and evaluating a derived network (paper §4.2): SGD with a poly learning rate
0.01 → 0, batch 8, online bootstrapping, random flip, scale 0.5–2.0 and crop — on the same
devices, torchrun/NCCL, AMP and DataLoader machinery as the search (search_client.search).

Online bootstrapping (Wu et al., 2016, as the paper uses it): the cross-entropy is averaged
over the hardest pixels only — the ``bootstrap_fraction`` of a batch's labelled pixels with the
highest loss, but never fewer than ``bootstrap_min_kept`` (or all of them, if fewer are
labelled). Easy pixels (most of the road and sky) stop dominating the gradient.
"""

from __future__ import annotations

import csv
import logging
import math
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader

from gas_core.devices import resolve_device
from gas_core.genotype import Genotype
from gas_core.network import GASNet
from gas_core.progress import progress as progress_bar
from search_client.data import IGNORE, SegDataset
from search_client.metrics import confusion_metric, miou, summed_confusion
from search_client.runtime import (
    AMP_DTYPES,
    ComputeConfig,
    DistInfo,
    OnDevice,
    make_loaders,
    place_model,
    rank_micro_batches,
    restore_scaler,
)

log = logging.getLogger(__name__)
TRAIN_CHECKPOINT_KIND = "gas-train-checkpoint"


class TrainConfig(BaseModel):
    """The paper's retraining recipe as defaults; every part is a flag of ``gas-train``."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1
    epochs: int = Field(default=200, ge=1, description="training epochs (paper: 200 on Cityscapes)")
    batch: int = Field(default=8, ge=1, description="global batch (all ranks and accumulation steps together)")
    accum: int = Field(default=1, ge=1, description="micro-batches accumulated per step on each rank")
    lr: float = Field(default=0.01, gt=0, description="initial SGD learning rate, decayed by poly to 0")
    poly_power: float = Field(default=0.9, gt=0, description="lr = lr0 · (1 − step / steps)^power")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(default=5e-4, ge=0, description="SGD weight decay")
    bootstrap_fraction: float = Field(default=0.25, gt=0, le=1, description="online bootstrapping: share of a "
                                      "batch's labelled pixels, hardest first, that the loss averages over (1 = "
                                      "plain cross-entropy)")
    bootstrap_min_kept: int = Field(default=4096, ge=1, description="online bootstrapping: keep at least this "
                                    "many pixels per batch")
    scale_min: float = Field(default=0.5, gt=0, description="random scale, lower bound")
    scale_max: float = Field(default=2.0, gt=0, description="random scale, upper bound")
    seed: int = Field(default=0, description="seeds weights, batches and augmentation")
    max_steps: int | None = Field(default=None, ge=1, description="cap the steps per epoch (smoke runs)")


def bootstrapped_ce(logits: torch.Tensor, target: torch.Tensor, fraction: float, min_kept: int) -> torch.Tensor:
    """Cross-entropy averaged over the hardest pixels. ``logits`` [N, C, H, W] (upsampled to the
    label), ``target`` [N, H, W] with 255 = ignore. Keeps ``max(min_kept, ⌈fraction · valid⌉)``
    pixels, capped at the valid count."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none").flatten()
    valid = loss[target.flatten() != IGNORE]
    if valid.numel() == 0:
        return logits.sum() * 0.0
    k = min(valid.numel(), max(min_kept, math.ceil(fraction * valid.numel())))
    return valid.topk(k, sorted=False).values.mean()


@dataclass(kw_only=True)
class TrainState(OnDevice):
    net: nn.Module  # the DDP wrapper under torchrun, else ``model``
    model: GASNet
    opt: torch.optim.SGD
    scaler: torch.amp.GradScaler
    total_steps: int
    step: int = 0
    history: list[dict] = field(default_factory=list)


def poly_lr(cfg: TrainConfig, step: int, total: int) -> float:
    return cfg.lr * (1 - min(step, total) / total) ** cfg.poly_power


def train_epoch(s: TrainState, cfg: TrainConfig, loader: DataLoader, epoch: int, progress: bool) -> dict[str, float]:
    """One epoch of SGD with the poly schedule set per step; returns mean loss and last lr."""
    s.net.train()
    losses: list[float] = []
    lr = poly_lr(cfg, s.step, s.total_steps)
    batches: Iterator = iter(loader)
    n_steps = len(loader) // cfg.accum
    with progress_bar(total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress, transient=True) as bar:
        for _ in range(n_steps):
            lr = poly_lr(cfg, s.step, s.total_steps)
            for g in s.opt.param_groups:
                g["lr"] = lr
            s.opt.zero_grad(set_to_none=True)
            total = 0.0
            for _m in range(cfg.accum):
                x, y = s.to_device(*next(batches))
                with s.autocast():
                    logits = s.net(x)
                loss = bootstrapped_ce(logits, y, cfg.bootstrap_fraction, cfg.bootstrap_min_kept) / cfg.accum
                s.scaler.scale(loss).backward()
                total += float(loss.detach())
            s.scaler.step(s.opt)
            s.scaler.update()
            s.step += 1
            losses.append(total)
            bar.update()
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.5f}")
    return {"loss": sum(losses) / max(1, len(losses)), "lr": lr}


def predict(model: nn.Module, x: torch.Tensor, out_hw: tuple[int, int], flip: bool = False,
            scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """Class probabilities [N, C, *out_hw] for ``x`` [N, 3, H, W]: averaged over ``scales`` (the
    input resized by each) and, with ``flip``, the mirrored input; upsampled to ``out_hw`` (the
    label's own size: Cityscapes is scored at 1024×2048 whatever size the network runs at)."""
    h, w = x.shape[-2:]
    acc = None
    for sc in scales:
        xs = x if sc == 1.0 else F.interpolate(x, size=(round(h * sc), round(w * sc)), mode="bilinear",
                                               align_corners=False)
        views = [(xs, False), (xs.flip(-1), True)] if flip else [(xs, False)]
        for v, flipped in views:
            p = F.interpolate(model(v).float(), size=out_hw, mode="bilinear", align_corners=False).softmax(1)
            p = p.flip(-1) if flipped else p
            acc = p if acc is None else acc + p
    assert acc is not None
    return acc


@torch.no_grad()
def evaluate_confusion(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
                       d: DistInfo, flip: bool = False, scales: tuple[float, ...] = (1.0,),
                       progress: bool = False) -> torch.Tensor:
    """Confusion matrix [C, C] (rows = truth) over this rank's shard, all-reduced across ranks."""
    model.eval()
    metric = confusion_metric(num_classes, device)
    for x, y in progress_bar(loader, desc="evaluating", unit="batch", enabled=progress):
        x, y = x.to(device), y.to(device)
        metric.update(predict(model, x, tuple(y.shape[-2:]), flip, scales).argmax(1), y)
    return summed_confusion(metric)


def checkpoint_payload(s: TrainState, cfg: TrainConfig, genotype: Genotype, epoch: int,
                       input_size: tuple[int, int], downscale: int = 1) -> dict:
    """``downscale``: the factor the images were shrunk by at load, so gas-eval scores the
    network on the same data by default."""
    return {"kind": TRAIN_CHECKPOINT_KIND, "schema_version": 1, "epoch": epoch, "config": cfg.model_dump(mode="json"),
            "input_size": list(input_size), "downscale": downscale,
            "genotype": genotype.model_dump(mode="json"), "model": s.model.state_dict(), "opt": s.opt.state_dict(),
            "scaler": s.scaler.state_dict(), "step": s.step, "history": s.history}


def save_checkpoint(payload: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash mid-save keeps the previous checkpoint


class CheckpointError(ValueError):
    """Not a readable gas-train checkpoint, or one of another network; one line for the CLI."""


def safe_load(path: Path, what: str, device: torch.device | str = "cpu") -> object:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, never arbitrary
    pickled objects — users pass checkpoints they downloaded from others, and a full unpickle runs
    whatever code the file names. Our own checkpoints hold nothing else (dicts, lists, numbers,
    strings, tensors), so no class needs allow-listing. One line on failure."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = "Unsupported global" in str(err)  # not junk bytes: a GLOBAL the allow-list lacks
        if refused:
            raise CheckpointError(f"{what} {path}: refused: it holds pickled objects other than tensors and plain "
                                  "data, which could run code when loaded") from None
        raise CheckpointError(f"{what} {path}: not a readable torch checkpoint (UnpicklingError)") from None
    except Exception as err:  # truncated, not a torch file
        raise CheckpointError(f"{what} {path}: not a readable torch checkpoint ({type(err).__name__})") from None


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A gas-train checkpoint, checked: a file that is not one says so in one line."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    ck = safe_load(path, "checkpoint", device)
    if not isinstance(ck, dict) or ck.get("kind") != TRAIN_CHECKPOINT_KIND:
        raise CheckpointError(f"checkpoint {path}: not a gas-train checkpoint (no kind={TRAIN_CHECKPOINT_KIND!r})")
    return ck


def init_from(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Copy the tensors of ``path`` whose name and shape match ``model``'s (pretrained weights,
    another genotype's checkpoint, a gas-train checkpoint); returns (matched, unmatched) names of
    the model. Accepts a bare state_dict or a dict holding one under ``model``/``state_dict``."""
    if not path.is_file():
        raise CheckpointError(f"--init {path}: no such file")
    raw = safe_load(path, "--init")
    state = raw.get("model", raw.get("state_dict", raw)) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--init {path}: holds no state_dict of tensors")
    own = model.state_dict()
    matched = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    return matched, sorted(set(own) - set(matched))


def write_csv(history: list[dict], path: Path) -> None:
    if not history:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def train(cfg: TrainConfig, genotype: Genotype, train_ds: SegDataset, val_ds: SegDataset | None, out: Path,
          compute: ComputeConfig, d: DistInfo, resume: bool = False, init: Path | None = None,
          progress: bool = True, until_epoch: int | None = None, deadline: float | None = None) -> TrainState:
    """The loop: a checkpoint (``out/last.pt``) and a CSV row (``out/train_log.csv``) per epoch.
    ``until_epoch`` stops after that many epochs in total, ``deadline`` (a ``time.monotonic()``
    instant) after the epoch during which it passed: time-boxed stages that resume."""
    device = resolve_device(compute.device, d.local_rank, d.world)
    torch.manual_seed(cfg.seed)
    model = GASNet(genotype)
    net = place_model(model, device, compute, d)
    if init is not None:
        matched, unmatched = init_from(model, init)
        log.info("--init %s: %d tensors matched by name and shape, %d did not%s", init, len(matched), len(unmatched),
                 f" (first: {', '.join(unmatched[:5])})" if unmatched else "")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=compute.amp == "fp16")
    loaders = make_loaders(cfg, train_ds, val_ds, d, device, compute.loader_workers(d), eval_batch=2, calib_batches=0)
    steps_per_epoch = len(rank_micro_batches(len(train_ds), cfg, d, 0)) // cfg.accum
    if steps_per_epoch == 0:
        raise ValueError(f"--batch {cfg.batch}: the training set has only {len(train_ds)} images")
    s = TrainState(net=net, model=model, opt=opt, scaler=scaler, total_steps=steps_per_epoch * cfg.epochs,
                   device=device, amp_dtype=AMP_DTYPES[compute.amp], channels_last=compute.channels_last)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume and (out / "last.pt").is_file():
        ck = read_checkpoint(out / "last.pt", device)
        if ck["config"] != cfg.model_dump(mode="json") or ck["genotype"] != genotype.model_dump(mode="json"):
            raise CheckpointError(f"{out / 'last.pt'} was written for another genotype or recipe; use a new --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        restore_scaler(scaler, ck.get("scaler"))
        s.step, s.history, start = ck["step"], ck["history"], ck["epoch"] + 1
        log.info("resumed at epoch %d/%d", start + 1, cfg.epochs)
    for epoch in range(start, min(cfg.epochs, until_epoch or cfg.epochs)):
        loaders.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        stats = train_epoch(s, cfg, loaders.train, epoch, progress and d.main)
        val = math.nan
        if loaders.val is not None:
            val = miou(evaluate_confusion(model, loaders.val, train_ds.num_classes, device, d))
        s.history.append({"epoch": epoch + 1, "loss": stats["loss"], "lr": stats["lr"], "val_miou": val})
        if d.main:
            save_checkpoint(checkpoint_payload(s, cfg, genotype, epoch, train_ds.augment.crop, train_ds.downscale),
                            out / "last.pt")
            write_csv(s.history, out / "train_log.csv")
            log.info("epoch %d/%d  loss %.4f  lr %.5f  val mIoU %.3f", epoch + 1, cfg.epochs, stats["loss"],
                     stats["lr"], val)
        if deadline is not None and time.monotonic() >= deadline:
            break
    return s
