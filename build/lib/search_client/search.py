"""The GAS search loop (paper §3.3, §4.2): single-level — one backward per step updates the
weights (SGD + cosine) and α with the GGM (Adam) — on CE + β·log LAT, with the Gumbel
temperature annealed 1.0 → 0.03 per epoch.

Data parallel: under ``torchrun`` each rank takes its slice of every global batch and draws its
own Gumbel sample seeded by (seed, epoch, step, slot); DDP averages the gradients. One process
with ``accum = N`` runs the same N slots as micro-batches, so it reproduces N ranks exactly.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from gas_core.genotype import Genotype, derive
from gas_core.latency import LatencyTerm, latency_loss
from gas_core.search_space import NetworkLayout
from gas_core.supernet import Supernet, temperature_at
from search_client.data import IGNORE, SegDataset, collate, confusion, global_batches, miou

log = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "phase", "loss", "ce", "lat_ms", "expected_lat_ms", "derived_lat_ms", "temperature", "lr_w", "val_miou"]


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    epochs: int = Field(default=10, ge=1)
    batch: int = Field(default=16, ge=1, description="global batch (all ranks, all micro-batches)")
    accum: int = Field(default=1, ge=1, description="micro-batches per rank per step")
    seed: int = 0
    beta: float = Field(default=0.005, ge=0)
    lr_w: float = 0.025
    lr_w_min: float = 0.001
    momentum: float = 0.9
    wd_w: float = 1e-3
    lr_a: float = 1e-3
    betas_a: tuple[float, float] = (0.5, 0.999)
    wd_a: float = 1e-4
    tau_start: float = 1.0
    tau_end: float = 0.03
    cells: Literal["shared", "independent"] = "independent"
    ggm: Literal["none", "fc", "gcn"] = "gcn"
    graph: Literal["edge", "op"] = "edge"
    ggm_dim: int = 64
    gamma: float = 0.5
    max_steps: int | None = Field(default=None, ge=1, description="stop each epoch after this many steps")
    warmup_epochs: int = Field(
        default=0, ge=0,
        description="weights-only epochs on the expected mixture softmax(α′) before the search (not in the "
        "paper, which uses 0): Gumbel-sampled mixtures at τ≈1 barely train a fresh supernet in a short run",
    )


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


@dataclass
class SearchResult:
    genotype: Genotype
    supernet: Supernet
    history: list[dict]


def _gumbel_gen(seed: int, epoch: int, step: int, slot: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 100_003 + step) * 1009 + slot)


def evaluate(
    net: Supernet, val: SegDataset, num_classes: int, calib: SegDataset | None = None, batch: int = 4,
    calib_batches: int = 8,
) -> float:
    """mIoU of the derived architecture (one-hot argmax of α′) run through the supernet.

    BatchNorm statistics are first recalibrated for that architecture on ``calib_batches``
    training batches: the running statistics gathered under Gumbel mixtures do not describe
    a single path, and a short search leaves them near their initial values."""
    with torch.no_grad():
        a = net.alpha_prime()
        z = F.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype)
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in bns]
        if calib is not None:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
            for i in range(0, min(len(calib), calib_batches * batch), batch):
                net(collate(calib, range(i, min(i + batch, len(calib))))[0], z)
        net.eval()
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for i in range(0, len(val), batch):
            x, y = collate(val, range(i, min(i + batch, len(val))))
            conf += confusion(net(x, z).argmax(1), y, num_classes)
        net.train()
        for m, (momentum, state) in zip(bns, saved, strict=True):  # the search goes on with its own statistics
            m.momentum = momentum
            m.load_state_dict(state)
    return miou(conf)


def search(
    cfg: SearchConfig, layout: NetworkLayout, train: SegDataset, val: SegDataset | None, term: LatencyTerm,
    out: Path, *, resume: bool = False, dist_info: DistInfo | None = None, progress: bool = True,
    until_epoch: int | None = None,
) -> SearchResult:
    """Run (or, with ``resume``, continue) the search; ``until_epoch`` stops after that many
    epochs in total, for time-boxed allocations that resume later."""
    d = dist_info or DistInfo()
    slots = d.world * cfg.accum
    if cfg.batch % slots:
        raise ValueError(f"--batch {cfg.batch} must be divisible by ranks × accum = {slots}")
    micro = cfg.batch // slots
    torch.manual_seed(cfg.seed)
    net = Supernet(layout, cells=cfg.cells, ggm=cfg.ggm, graph=cfg.graph, ggm_dim=cfg.ggm_dim, gamma=cfg.gamma)
    model: torch.nn.Module = DDP(net) if d.world > 1 else net
    opt_w = torch.optim.SGD(net.weight_parameters(), lr=cfg.lr_w, momentum=cfg.momentum, weight_decay=cfg.wd_w)
    opt_a = torch.optim.Adam(net.arch_parameters(), lr=cfg.lr_a, betas=cfg.betas_a, weight_decay=cfg.wd_a)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, T_max=cfg.warmup_epochs + cfg.epochs,
                                                       eta_min=cfg.lr_w_min)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "search_log.csv"
    history: list[dict] = []
    start = 0
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"] != cfg.model_dump(mode="json"):
            raise ValueError(f"{ckpt_path} was written with another configuration; use a new --out or the same flags")
        net.load_state_dict(ck["model"])
        opt_w.load_state_dict(ck["opt_w"])
        opt_a.load_state_dict(ck["opt_a"])
        sched.load_state_dict(ck["sched"])
        history, start = ck["history"], ck["epoch"] + 1
        if d.main:
            log.info("resumed from %s after epoch %d", ckpt_path, ck["epoch"])
    elif d.main:
        with log_path.open("w", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writeheader()

    n_batches = len(global_batches(len(train), cfg.batch, cfg.seed, 0))
    if n_batches == 0:
        raise ValueError(f"the training set has {len(train)} samples, fewer than one batch of {cfg.batch}")
    total = cfg.warmup_epochs + cfg.epochs
    for epoch in range(start, min(total, until_epoch or total)):
        warm = epoch < cfg.warmup_epochs
        net.temperature = temperature_at(epoch - cfg.warmup_epochs, cfg.epochs, cfg.tau_start, cfg.tau_end)
        train.set_epoch(epoch)
        batches = global_batches(len(train), cfg.batch, cfg.seed, epoch)[: cfg.max_steps]
        sums = {"loss": 0.0, "ce": 0.0, "lat": 0.0}
        desc = f"warm-up {epoch + 1}/{cfg.warmup_epochs}" if warm else f"epoch {epoch + 1}/{total}"
        bar = tqdm(batches, desc=desc, disable=not (progress and d.main), leave=False)
        for step, idx in enumerate(bar):
            opt_w.zero_grad(set_to_none=True)
            opt_a.zero_grad(set_to_none=True)
            for m in range(cfg.accum):
                slot = d.rank * cfg.accum + m
                x, y = collate(train, idx[slot * micro : (slot + 1) * micro])
                ctx = model.no_sync() if isinstance(model, DDP) and m < cfg.accum - 1 else nullcontext()
                with ctx:
                    logits = model(x, generator=_gumbel_gen(cfg.seed, epoch, step, slot), expected=warm)
                    ce = F.cross_entropy(logits, y, ignore_index=IGNORE)
                    lat = term(net.last_z)
                    loss = latency_loss(ce, lat, cfg.beta) if cfg.beta > 0 and not warm else ce
                    (loss / cfg.accum).backward()
                sums["loss"] += loss.item() / cfg.accum
                sums["ce"] += ce.item() / cfg.accum
                sums["lat"] += lat.item() / cfg.accum
            opt_w.step()
            if not warm:
                opt_a.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lat_ms=f"{lat.item() / 1e3:.2f}")
        lr = sched.get_last_lr()[0]
        sched.step()
        steps = len(batches)
        with torch.no_grad():
            a = net.alpha_prime()
            expected = float(term(torch.softmax(a, -1)))
            derived = float(term(F.one_hot(a.argmax(-1), a.shape[-1]).float()))
        row = {
            "epoch": epoch + 1, "loss": sums["loss"] / steps, "ce": sums["ce"] / steps,
            "lat_ms": sums["lat"] / steps / 1e3, "expected_lat_ms": expected / 1e3, "derived_lat_ms": derived / 1e3,
            "temperature": net.temperature, "lr_w": lr,
            "val_miou": evaluate(net, val, layout.num_classes, train) if (val is not None and d.main) else math.nan,
            "phase": "warmup" if warm else "search",
        }
        history.append(row)
        if d.main:
            log.info("%s %d/%d  loss %.4f  CE %.4f  LAT %.3f ms (expected %.3f, derived %.3f)  τ %.3f  mIoU %.3f",
                     row["phase"], row["epoch"], total, row["loss"], row["ce"], row["lat_ms"], row["expected_lat_ms"],
                     row["derived_lat_ms"], row["temperature"], row["val_miou"])
            with log_path.open("a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writerow(row)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"epoch": epoch, "config": cfg.model_dump(mode="json"), "layout": layout.model_dump(mode="json"),
                        "model": net.state_dict(), "opt_w": opt_w.state_dict(), "opt_a": opt_a.state_dict(),
                        "sched": sched.state_dict(), "history": history}, tmp)
            tmp.replace(ckpt_path)  # atomic: a crash mid-save keeps the previous checkpoint
    genotype = derive(net.alpha_prime(), layout)
    return SearchResult(genotype, net, history)
