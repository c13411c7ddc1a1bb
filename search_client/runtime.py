"""Where and how the search and the retraining compute, written once for both: devices, AMP,
DDP under torchrun, data loaders whose batches are a function of (seed, epoch), and the gradient
scaler's checkpoint state. ``search_client.search`` reads as the paper's algorithm and
``search_client.train`` as the retraining recipe; neither imports the other."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

from gas_core.devices import resolve_device
from search_client.data import SegDataset, global_batches

log = logging.getLogger(__name__)

AmpMode = Literal["off", "bf16", "fp16"]
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_workers(local_world: int = 1) -> int:
    """DataLoader workers per rank: this host's usable cores shared by the ranks on it, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, local_world)))


class ComputeConfig(BaseModel):
    """Where and how a search computes. Not part of the checkpoint's identity: a search written
    on a GPU resumes on a CPU and back."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N (auto: CUDA when present; under "
                        "torchrun each rank takes cuda:LOCAL_RANK)")
    amp: AmpMode = Field(default="off", description="autocast: off, bf16, or fp16 with a gradient scaler")
    channels_last: bool = Field(default=False, description="run the supernet and its batches channels-last")
    workers: int | None = Field(default=None, ge=0, description="DataLoader workers per rank (0: load in the "
                                "training process; default: the host's cores / ranks on it, at most 8)")

    def loader_workers(self, d: DistInfo) -> int:
        return self.workers if self.workers is not None else default_workers(d.local_world)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun: NCCL when the ranks compute on
    CUDA (each on cuda:LOCAL_RANK), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, world)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        atexit.register(leave_distributed)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank,
                    int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def leave_distributed() -> None:
    """Destroy the process group, if this process joined one. Registered with ``atexit`` by
    :func:`init_distributed`; calling it again is harmless."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_rank(app: Callable[[], object]) -> None:
    """Run a CLI's Typer app; under torchrun, leave the process without interpreter finalisation.

    Why: once DDP has wrapped a model, torch (2.13 here) keeps the gloo group alive in C++ even
    after ``destroy_process_group``, with its worker threads; at interpreter teardown a rank then
    aborts now and then ("terminate called without an active exception", SIGABRT; about 1 run in
    6 of ``gas-train`` with 2 CPU ranks on this VM), and torchrun fails the whole run after the
    work was done and saved (pytorch/pytorch#190489). So a rank flushes what it wrote, leaves the
    group and ends with ``os._exit`` and the app's own exit status. Single-process runs exit as
    usual."""
    try:
        app()
        code: int = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if not dist.is_initialized():
        sys.exit(code)
    leave_distributed()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------- data loaders


class EpochBatches(Sampler[list[Any]]):
    """A batch sampler whose batches are a function of the epoch. It runs in the training
    process, so :meth:`set_epoch` reaches it even with persistent workers; the epoch also travels
    inside each index as ``(epoch, i)``, which is how a worker that never saw ``set_epoch`` seeds
    the augmentation by (seed, epoch, index)."""

    def __init__(self, make: Callable[[int], list[list[Any]]]) -> None:
        self.make, self.epoch = make, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.make(self.epoch))

    def __len__(self) -> int:
        return len(self.make(self.epoch))


class StepPlan(Protocol):
    """What batching needs of a config (the search's and gas-train's both have it)."""

    batch: int
    accum: int
    seed: int
    max_steps: int | None


def rank_micro_batches(n: int, cfg: StepPlan, d: DistInfo, epoch: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of every step of ``epoch``, in order: ``accum`` per step, each
    of ``batch / (world·accum)`` ``(epoch, index)`` pairs; slot ``rank·accum + m`` of each global
    batch from :func:`search_client.data.global_batches`."""
    micro = cfg.batch // (d.world * cfg.accum)
    out = []
    for idx in global_batches(n, cfg.batch, cfg.seed, epoch)[: cfg.max_steps]:
        for m in range(cfg.accum):
            slot = d.rank * cfg.accum + m
            out.append([(epoch, i) for i in idx[slot * micro : (slot + 1) * micro]])
    return out


@dataclass
class Loaders:
    train: DataLoader
    calib: DataLoader | None
    val: DataLoader | None
    samplers: list[EpochBatches] = field(default_factory=list)

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)


def make_loaders(
    cfg: StepPlan, train: SegDataset, val: SegDataset | None, d: DistInfo, device: torch.device, workers: int,
    eval_batch: int = 4, calib_batches: int = 8,
) -> Loaders:
    """Train (this rank's slice of each step), BN-calibration (the same few training batches on
    every rank, so every rank evaluates the same statistics; none with ``calib_batches=0``) and
    validation (this rank's shard)."""
    opts: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda",
                            "persistent_workers": workers > 0}
    train_s = EpochBatches(lambda e: rank_micro_batches(len(train), cfg, d, e))
    loaders = Loaders(DataLoader(train, batch_sampler=train_s, **opts), None, None, [train_s])
    if val is not None and calib_batches > 0:
        n_cal = min(len(train), calib_batches * eval_batch)
        calib_s = EpochBatches(lambda e: [[(e, i) for i in range(j, min(j + eval_batch, n_cal))]
                                          for j in range(0, n_cal, eval_batch)])
        loaders.calib = DataLoader(train, batch_sampler=calib_s, **opts)
        loaders.samplers.append(calib_s)
    if val is not None:
        loaders.val, val_s = sharded_loader(val, d, eval_batch, opts)
        loaders.samplers.append(val_s)
    return loaders


def sharded_loader(ds: SegDataset, d: DistInfo, batch: int, opts: dict[str, Any]) -> tuple[DataLoader, EpochBatches]:
    """Evaluation batches of this rank's shard (every ``world``-th sample from ``rank``)."""
    shard = list(range(d.rank, len(ds), d.world))
    sampler = EpochBatches(lambda e: [shard[j : j + batch] for j in range(0, len(shard), batch)])
    return DataLoader(ds, batch_sampler=sampler, **opts), sampler


@dataclass(kw_only=True)
class OnDevice:
    """Where a model computes (the search's and gas-train's state both are one)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-blocking copies from pinned memory on CUDA; channels-last when asked."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return (x.to(self.device, non_blocking=True, memory_format=fmt), y.to(self.device, non_blocking=True))


def place_model(net: nn.Module, device: torch.device, compute: ComputeConfig, d: DistInfo) -> nn.Module:
    """Move ``net`` to ``device`` (channels-last when asked) in place; return what the steps call:
    the DDP wrapper under torchrun, else ``net`` itself."""
    net.to(device)
    if compute.channels_last:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if d.world > 1:
        return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any] | None) -> None:
    """Load a gradient scaler's state when the checkpoint has one. A run without fp16 saves a
    disabled scaler's empty state; resuming it under fp16 (a CPU checkpoint moved to a GPU, say)
    starts the scale afresh instead of failing in torch's ``load_state_dict``."""
    if state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        log.info("the checkpoint has no gradient-scaler state (written without fp16): the loss scale starts afresh")


# ---------------------------------------------------------------- the search


