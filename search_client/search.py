"""The GAS search loop (paper §3.3, §4.2): single-level — one backward per step updates the
weights (SGD + cosine) and α with the GGM (Adam) — on CE + β·log LAT, with the Gumbel
temperature annealed 1.0 → 0.03 per epoch.

The compute device is a parameter (:class:`search_client.runtime.ComputeConfig`), never a branch of the loop: the
supernet, the latency term, every batch and the Gumbel noise live on it, and the same code runs
on the CPU in the tests and on CUDA (optionally under autocast, channels-last) on a GPU host.

Data parallel: under ``torchrun`` each rank takes ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo),
loads only its own slice of every global batch through a DataLoader, and draws its own Gumbel
sample seeded by (seed, epoch, step, slot); DDP averages the gradients. One process with
``accum = N`` runs the same N slots as micro-batches, so it reproduces N ranks exactly.
Validation is sharded over the ranks and the confusion matrices are all-reduced.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from gas_core.devices import resolve_device
from gas_core.genotype import Genotype, derive
from gas_core.ggm import GGMKind, GGMSource, GraphKind
from gas_core.latency import LatencyTerm, latency_loss
from gas_core.progress import progress as progress_bar
from gas_core.search_space import NetworkLayout
from gas_core.supernet import CellSharing, Supernet, default_ggm, temperature_at
from gas_core.target import TARGET_TOLERANCE, TARGET_WEIGHT, PredictUs, TargetFit, fit_to_target, target_loss
from search_client.data import IGNORE, SegDataset
from search_client.metrics import confusion_metric, miou, summed_confusion
from search_client.runtime import (
    AMP_DTYPES,
    ComputeConfig,
    DistInfo,
    Loaders,
    OnDevice,
    make_loaders,
    place_model,
    restore_scaler,
)

log = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "phase", "loss", "ce", "lat_ms", "lat_total_ms", "expected_lat_ms", "derived_lat_ms",
              "target_ms", "temperature", "lr_w", "top_prob", "val_miou", "images_per_s", "data_wait_pct"]


class SearchConfig(BaseModel):
    """Every hyperparameter of a search and the one place its default lives (the CLI's flags
    are built from these fields). Defaults are the paper's §4.2 except where a field says so.
    Stored in the checkpoint: a resume with other values is refused. Version 2 added
    ``ggm_source``; a version-1 config was written by code whose links read α′, so it reads as
    ``alpha_prime``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1, 2] = 2
    epochs: int = Field(default=10, ge=1, description="search epochs (τ anneals tau_start → tau_end over them)")
    batch: int = Field(default=16, ge=1, description="global batch size over all ranks and micro-batches (paper: 16)")
    accum: int = Field(default=1, ge=1, description="micro-batches per rank per step (gradient accumulation)")
    seed: int = Field(default=0, description="seed of init, data order, augmentation and Gumbel noise")
    beta: float = Field(default=0.005, ge=0, description="latency weight β in CE + β·log(LAT µs) (paper: 0.005); "
                        "unused with --target-ms")
    target_ms: float | None = Field(
        default=None, gt=0, description="search for the most accurate network within this whole-network latency "
        "from the table (ms; not in the paper): the loss is CE + target_weight·|LAT/T − 1| (TF-NAS, ECCV 2020) "
        "instead of β·log LAT, and the derived network's ops are swapped until its table latency lies within "
        "±target_tolerance of T (gas_core/target.py)")
    target_weight: float = Field(default=TARGET_WEIGHT, gt=0, description="λ of the target loss (TF-NAS: 0.1)")
    target_tolerance: float = Field(default=TARGET_TOLERANCE, gt=0, lt=1,
                                    description="the derived network's table latency lies within ±this of T")
    lr_w: float = Field(default=0.025, gt=0, description="SGD learning rate of the weights, cosine-annealed")
    lr_w_min: float = Field(default=0.001, ge=0, description="final weight learning rate of the cosine schedule")
    momentum: float = Field(default=0.9, ge=0, description="SGD momentum")
    wd_w: float = Field(default=1e-3, ge=0, description="weight decay of the weights")
    lr_a: float = Field(default=1e-3, gt=0, description="Adam learning rate of α and the GGM (paper: 0.001)")
    betas_a: tuple[float, float] = Field(default=(0.5, 0.999), description="Adam betas of α and the GGM")
    wd_a: float = Field(default=1e-4, ge=0, description="weight decay of α and the GGM")
    lr_ggm: float | None = Field(
        default=None, gt=0, description="Adam learning rate of the GGM's weights (default: --lr-a, as in the paper). "
        "A short search that raises --lr-a wants this lower: a fast-moving GCN drowns α and makes every edge of a "
        "cell choose the same op")
    tau_start: float = Field(default=1.0, gt=0, description="initial Gumbel-softmax temperature λ")
    tau_end: float = Field(default=0.03, gt=0, description="final Gumbel-softmax temperature λ")
    cells: CellSharing = Field(default="independent", description="α per cell (GAS) or one per cell type (shared)")
    ggm: GGMKind | None = Field(
        default=None, description="link between adjacent cells' α: gcn (GAS), fc, none; default gcn for independent "
        "cells and none for shared ones")
    graph: GraphKind = Field(default="edge", description="GCN reasoning graph: edge-similarity or op-identity")
    ggm_dim: int = Field(default=64, ge=1, description="GCN hidden size d (paper: 64)")
    gamma: float = Field(default=0.5, ge=0, description="GGM weight γ in α′ = α + γ·GCN (paper: 0.5)")
    ggm_source: GGMSource = Field(
        default="alpha", description="what the link from cell k−1 reads: its own α (paper eqs. 5–7) or its "
        "updated α′ (alpha_prime: chains every link down the network; collapsed most cells on CamVid)")
    max_steps: int | None = Field(default=None, ge=1, description="stop each epoch after this many steps")
    warmup_epochs: int = Field(
        default=0, ge=0,
        description="weights-only epochs on the expected mixture softmax(α′) before the search (not in the "
        "paper, which uses 0): Gumbel-sampled mixtures at λ≈1 barely train a fresh supernet in a short run",
    )

    @model_validator(mode="before")
    @classmethod
    def _upgrade_v1(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = {"ggm_source": "alpha_prime", **data, "schema_version": 2}
        return data

    @model_validator(mode="after")
    def _resolve_ggm(self) -> SearchConfig:
        if self.ggm is None:
            self.ggm = default_ggm(self.cells)
        return self


@dataclass
class SearchResult:
    genotype: Genotype
    supernet: Supernet
    history: list[dict]
    fit: TargetFit | None = None
    """With a target: how the derived network was brought within the band around T."""


# ---------------------------------------------------------------- state


@dataclass(kw_only=True)
class SearchState(OnDevice):
    """Everything a step touches, on one device."""

    net: Supernet
    model: nn.Module  # the DDP wrapper under torchrun, else ``net``
    term: LatencyTerm
    opt_w: torch.optim.Optimizer
    opt_a: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def gumbel(self, seed: int, epoch: int, step: int, slot: int) -> torch.Generator:
        """The Gumbel noise of (seed, epoch, step, slot), drawn on the compute device."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(((seed * 1_000_003 + epoch) * 100_003 + step) * 1009 + slot)


def build_state(
    cfg: SearchConfig, layout: NetworkLayout, term: LatencyTerm, compute: ComputeConfig, d: DistInfo,
) -> SearchState:
    """The supernet on its device (DDP-wrapped under torchrun) and the §4.2 optimisers."""
    device = resolve_device(compute.device, d.local_rank, d.world)
    torch.manual_seed(cfg.seed)
    net = Supernet(layout, cells=cfg.cells, ggm=cfg.ggm, graph=cfg.graph, ggm_dim=cfg.ggm_dim, gamma=cfg.gamma,
                   ggm_source=cfg.ggm_source)
    model = place_model(net, device, compute, d)
    opt_w = torch.optim.SGD(net.weight_parameters(), lr=cfg.lr_w, momentum=cfg.momentum, weight_decay=cfg.wd_w)
    groups: list[dict[str, Any]] = [{"params": [net.alpha]},
                                    {"params": list(net.ggm.parameters()), "lr": cfg.lr_ggm or cfg.lr_a}]
    opt_a = torch.optim.Adam(groups, lr=cfg.lr_a, betas=cfg.betas_a, weight_decay=cfg.wd_a)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, T_max=cfg.warmup_epochs + cfg.epochs,
                                                       eta_min=cfg.lr_w_min)
    scaler = torch.amp.GradScaler(device.type, enabled=compute.amp == "fp16")
    return SearchState(net=net, model=model, term=term.to(device), opt_w=opt_w, opt_a=opt_a, sched=sched,
                       scaler=scaler, device=device, amp_dtype=AMP_DTYPES[compute.amp],
                       channels_last=compute.channels_last)


# ---------------------------------------------------------------- one epoch


def train_step(
    s: SearchState, cfg: SearchConfig, d: DistInfo, epoch: int, step: int,
    fetch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """One single-level step over ``cfg.accum`` micro-batches, each ``fetch()``-ed on the device:
    weights by SGD, α and the GGM by Adam (not during warm-up). Returns [loss, CE, LAT µs] of
    the step on the device (no host sync)."""
    warm = epoch < cfg.warmup_epochs
    s.opt_w.zero_grad(set_to_none=True)
    s.opt_a.zero_grad(set_to_none=True)
    sums = torch.zeros(3, device=s.device, dtype=torch.float64)
    for m in range(cfg.accum):
        x, y = fetch()
        sync = isinstance(s.model, DDP) and m < cfg.accum - 1
        with s.model.no_sync() if sync else nullcontext():  # type: ignore[operator]
            with s.autocast():
                logits, z = s.model(x, generator=s.gumbel(cfg.seed, epoch, step, d.rank * cfg.accum + m),
                                    expected=warm)
                ce = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
            lat = s.term(z)
            loss = ce if warm else step_loss(cfg, ce, lat, s.term.fixed)
            s.scaler.scale(loss / cfg.accum).backward()
        sums += torch.stack([loss.detach(), ce.detach(), lat.detach()]).double() / cfg.accum
    s.scaler.step(s.opt_w)
    if not warm:
        s.scaler.step(s.opt_a)
    s.scaler.update()
    return sums


def step_loss(cfg: SearchConfig, ce: torch.Tensor, lat_cells_us: torch.Tensor, fixed_us: torch.Tensor) -> torch.Tensor:
    """The search loss of one micro-batch: the paper's CE + β·log LAT over the cells' ops (eq. 10),
    or with a target CE + λ·|LAT/T − 1| over the whole network (gas_core/target.py)."""
    if cfg.target_ms is not None:
        return target_loss(ce, fixed_us + lat_cells_us, cfg.target_ms * 1e3, cfg.target_weight)
    return latency_loss(ce, lat_cells_us, cfg.beta) if cfg.beta > 0 else ce


def train_epoch(
    s: SearchState, loader: DataLoader, cfg: SearchConfig, epoch: int, d: DistInfo, progress: bool,
) -> dict[str, float]:
    """One epoch of :func:`train_step`; returns mean loss, CE, LAT (µs, eqs. 8–9 and whole
    network), throughput and the share of the epoch spent waiting for data."""
    warm = epoch < cfg.warmup_epochs
    total = cfg.warmup_epochs + cfg.epochs
    s.net.temperature = temperature_at(epoch - cfg.warmup_epochs, cfg.epochs, cfg.tau_start, cfg.tau_end)
    steps = len(loader) // cfg.accum
    desc = f"warm-up {epoch + 1}/{cfg.warmup_epochs}" if warm else f"epoch {epoch + 1}/{total}"
    sums = torch.zeros(3, device=s.device, dtype=torch.float64)  # loss, CE, LAT: one sync per epoch, not per step
    wait, images, t0 = 0.0, 0, time.perf_counter()
    it = iter(loader)

    def fetch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal wait, images
        t = time.perf_counter()
        x, y = s.to_device(*next(it))
        wait += time.perf_counter() - t
        images += len(x) * d.world
        return x, y

    for step in progress_bar(range(steps), desc=desc, enabled=progress and d.main, transient=True):
        sums += train_step(s, cfg, d, epoch, step, fetch)
    mean = (sums / max(steps, 1)).tolist()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    wall = time.perf_counter() - t0
    return {"loss": mean[0], "ce": mean[1], "lat_us": mean[2], "lat_total_us": mean[2] + float(s.term.fixed),
            "images_per_s": images / wall, "data_wait_pct": 100 * wait / wall}


@torch.no_grad()
def evaluate(s: SearchState, loaders: Loaders, num_classes: int, d: DistInfo) -> float:
    """mIoU of the derived architecture (one-hot argmax of α′) run through the supernet.

    BatchNorm statistics are first recalibrated for that architecture on a few training batches
    (the same on every rank): the running statistics gathered under Gumbel mixtures do not
    describe a single path, and a short search leaves them near their initial values. Each rank
    then scores its shard of the validation set; the confusion matrices are all-reduced."""
    assert loaders.val is not None and loaders.calib is not None
    net = s.net
    a = net.alpha_prime()
    z = F.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    with s.autocast():
        for x, y in loaders.calib:
            net(s.to_device(x, y)[0], z)
        net.eval()
        metric = confusion_metric(num_classes, s.device)
        for x, y in loaders.val:
            x, y = s.to_device(x, y)
            metric.update(net(x, z)[0].argmax(1), y)
    net.train()
    for m, (momentum, state) in zip(bns, saved, strict=True):  # the search goes on with its own statistics
        m.momentum = momentum
        m.load_state_dict(state)
    return miou(summed_confusion(metric))


# ---------------------------------------------------------------- checkpoint


def save_checkpoint(s: SearchState, cfg: SearchConfig, layout: NetworkLayout, epoch: int, history: list[dict],
                    path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"epoch": epoch, "config": cfg.model_dump(mode="json"), "layout": layout.model_dump(mode="json"),
                "model": s.net.state_dict(), "opt_w": s.opt_w.state_dict(), "opt_a": s.opt_a.state_dict(),
                "sched": s.sched.state_dict(), "scaler": s.scaler.state_dict(), "history": history}, tmp)
    tmp.replace(path)  # atomic: a crash mid-save keeps the previous checkpoint


def load_checkpoint(s: SearchState, cfg: SearchConfig, path: Path) -> tuple[list[dict], int]:
    """Restore onto this run's device (a GPU checkpoint resumes on a CPU and back); returns the
    history so far and the next epoch."""
    ck = torch.load(path, map_location=s.device, weights_only=True)  # a search's own checkpoint: plain data
    if SearchConfig.model_validate(ck["config"]) != cfg:
        raise ValueError(f"{path} was written with another configuration; use a new --out or the same flags")
    s.net.load_state_dict(ck["model"])
    s.opt_w.load_state_dict(ck["opt_w"])
    s.opt_a.load_state_dict(ck["opt_a"])
    s.sched.load_state_dict(ck["sched"])
    restore_scaler(s.scaler, ck.get("scaler"))
    return ck["history"], ck["epoch"] + 1


def epoch_row(s: SearchState, stats: dict[str, float], epoch: int, warm: bool, lr: float, val_miou: float,
              target_ms: float | None = None) -> dict:
    """One line of the search log: what the step saw and where α′ stands now."""
    with torch.no_grad():
        a = s.net.alpha_prime()
        probs = torch.softmax(a, -1)
        one_hot = F.one_hot(a.argmax(-1), a.shape[-1]).float()
        expected, derived = float(s.term.total(probs)), float(s.term.total(one_hot))
        top = float(probs.max(-1).values.median())
    return {"epoch": epoch + 1, "phase": "warmup" if warm else "search", "loss": stats["loss"], "ce": stats["ce"],
            "lat_ms": stats["lat_us"] / 1e3, "lat_total_ms": stats["lat_total_us"] / 1e3,
            "expected_lat_ms": expected / 1e3, "derived_lat_ms": derived / 1e3, "target_ms": target_ms,
            "temperature": s.net.temperature,
            "lr_w": lr, "top_prob": top, "val_miou": val_miou, "images_per_s": stats["images_per_s"],
            "data_wait_pct": stats["data_wait_pct"]}


def search(
    cfg: SearchConfig, layout: NetworkLayout, train: SegDataset, val: SegDataset | None, term: LatencyTerm,
    out: Path, *, compute: ComputeConfig | None = None, resume: bool = False, dist_info: DistInfo | None = None,
    progress: bool = True, until_epoch: int | None = None, deadline: float | None = None,
    predict_us: PredictUs | None = None,
) -> SearchResult:
    """Run (or, with ``resume``, continue) the search: optimisers, then per epoch one pass of
    steps, an evaluation of the derived architecture, a log row and a checkpoint.
    ``until_epoch`` stops after that many epochs in total, for time-boxed allocations that resume
    later; ``deadline`` (a ``time.monotonic()`` instant) stops after the epoch during which it
    passed. Returns the derived genotype, the supernet (on its device) and the history. With
    ``cfg.target_ms`` the derived network is fitted to the target (:func:`gas_core.target.fit_to_target`)
    with ``predict_us``, the exact table latency (default: the latency term's own sum)."""
    d = dist_info or DistInfo()
    compute = compute or ComputeConfig()
    if cfg.batch % (d.world * cfg.accum):
        raise ValueError(f"--batch {cfg.batch} must be divisible by ranks × accum = {d.world * cfg.accum}")
    if len(train) < cfg.batch:
        raise ValueError(f"the training set has {len(train)} samples, fewer than one batch of {cfg.batch}")
    s = build_state(cfg, layout, term, compute, d)
    loaders = make_loaders(cfg, train, val, d, s.device, compute.loader_workers(d))
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "search_log.csv"
    history: list[dict] = []
    start = 0
    if resume and ckpt_path.is_file():
        history, start = load_checkpoint(s, cfg, ckpt_path)
        if d.main:
            log.info("resumed from %s after epoch %d on %s", ckpt_path, start, s.device)
    elif d.main:
        with log_path.open("w", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writeheader()
    total = cfg.warmup_epochs + cfg.epochs
    for epoch in range(start, min(total, until_epoch or total)):
        loaders.set_epoch(epoch)
        stats = train_epoch(s, loaders.train, cfg, epoch, d, progress)
        lr = float(s.sched.get_last_lr()[0])
        s.sched.step()
        val_miou = evaluate(s, loaders, layout.num_classes, d) if loaders.val is not None else math.nan
        row = epoch_row(s, stats, epoch, epoch < cfg.warmup_epochs, lr, val_miou, cfg.target_ms)
        history.append(row)
        if d.main:
            _log_epoch(row, total)
            with log_path.open("a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writerow(row)
            save_checkpoint(s, cfg, layout, epoch, history, ckpt_path)
        if deadline is not None and time.monotonic() >= deadline:
            break
    return derived_result(cfg, layout, s, history, predict_us)


def derived_result(cfg: SearchConfig, layout: NetworkLayout, s: SearchState, history: list[dict],
                   predict_us: PredictUs | None) -> SearchResult:
    """The argmax of α′, or with a target the network fitted within its band."""
    with torch.no_grad():
        alpha_prime = s.net.alpha_prime()
    if cfg.target_ms is None:
        return SearchResult(derive(alpha_prime, layout), s.net, history)
    g, fit = fit_to_target(alpha_prime, layout, s.term, cfg.target_ms * 1e3, cfg.target_tolerance, predict_us)
    log.info("target %.3f ms: argmax of α′ at %.3f ms, %d swap(s) → %.3f ms (%+.1f %%, band ±%.0f %%)%s",
             fit.target_ms, fit.argmax_ms, len(fit.swaps), fit.fitted_ms, 100 * (fit.fitted_ms / fit.target_ms - 1),
             100 * fit.tolerance, "" if fit.within else "; NOT within the band: the search space cannot reach it")
    return SearchResult(g, s.net, history, fit)


def _log_epoch(row: dict, total: int) -> None:
    target = "" if row.get("target_ms") is None else f" against T {row['target_ms']:.3f}"
    log.info("%s %d/%d  loss %.4f  CE %.4f  LAT %.3f ms cells (%.3f whole net; expected %.3f, derived %.3f%s)  "
             "τ %.3f  top p %.2f  mIoU %.3f  %.1f img/s, %.0f %% waiting for data", row["phase"], row["epoch"], total,
             row["loss"], row["ce"], row["lat_ms"], row["lat_total_ms"], row["expected_lat_ms"], row["derived_lat_ms"],
             target, row["temperature"], row["top_prob"], row["val_miou"], row["images_per_s"], row["data_wait_pct"])
