"""Search throughput: images/s of a GAS search step, and the share of step time spent waiting
for data, with DataLoader workers 0 against N in one run.

``--data png`` (default) writes synthetic scenes of Cityscapes size (1024×2048) as PNGs in the
Cityscapes layout and reads them through the real Cityscapes loader with the paper's
augmentation (flip, scale 0.5–2.0, crop to ``--size``): decoding and resizing cost what they
would on the real data. ``--data memory`` times the step alone on one fixed batch on the device
(no loader), which is what the GPU check uses at 769×1537. Each configuration runs one untimed
epoch first (worker start-up, cuDNN autotuning), then ``--epochs`` timed epochs of ``--steps``
steps; the figures are the timed epochs' medians with their range.

``python -m bench.search_throughput [--size 256 512] [--batch 16] [--workers 0 2] [--device auto]
[--amp off bf16] [--data png|memory]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import stand_in_term, write_result
from gas_core.search_space import NetworkLayout
from search_client.data import CITYSCAPES_ID_TO_TRAIN, Augment, Cityscapes, Synthetic
from search_client.runtime import ComputeConfig, DistInfo, make_loaders
from search_client.search import SearchConfig, build_state, train_epoch, train_step

CITYSCAPES_HW = (1024, 2048)


def write_cityscapes_pngs(root: Path, n: int, hw: tuple[int, int] = CITYSCAPES_HW) -> None:
    """``n`` synthetic scenes at full Cityscapes size, in its layout (labelIds: 4 used classes)."""
    ids = np.array([k for k, v in CITYSCAPES_ID_TO_TRAIN.items() if v in (0, 2, 8, 13)], dtype=np.uint8)
    scenes = Synthetic(n, hw, Augment(hw, False))
    for i in range(n):
        img, lbl = scenes.load(i)
        stem = f"synth_{i:06d}_000019"
        for sub, arr in (("leftImg8bit", (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)),
                         ("gtFine", ids[lbl.numpy()])):
            d = root / sub / "train" / "synth"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / (f"{stem}_leftImg8bit.png" if sub == "leftImg8bit" else
                                          f"{stem}_gtFine_labelIds.png"))


def loader_run(cfg: SearchConfig, compute: ComputeConfig, train: Cityscapes, epochs: int) -> list[dict]:
    """Steps through the real DataLoader; one row per timed epoch."""
    layout = NetworkLayout(num_classes=train.num_classes)
    d = DistInfo()
    s = build_state(cfg, layout, stand_in_term(layout, train.augment.crop), compute, d)
    loaders = make_loaders(cfg, train, None, d, s.device, compute.workers or 0)
    rows = []
    for epoch in range(epochs + 1):
        loaders.set_epoch(epoch)
        stats = train_epoch(s, loaders.train, cfg, cfg.warmup_epochs + epoch, d, progress=False)
        if epoch:
            rows.append(stats)
    return rows


def memory_run(cfg: SearchConfig, compute: ComputeConfig, size: tuple[int, int], epochs: int) -> list[dict]:
    """Steps on one fixed batch already on the device: the step's own cost, no data pipeline."""
    layout = NetworkLayout(num_classes=19)
    d = DistInfo()
    s = build_state(cfg, layout, stand_in_term(layout, size), compute, d)
    gen = torch.Generator().manual_seed(0)
    x, y = s.to_device(torch.randn(cfg.batch, 3, *size, generator=gen),
                       torch.randint(0, 19, (cfg.batch, *size), generator=gen))
    rows = []
    for epoch in range(epochs + 1):
        steps = cfg.max_steps or 1
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        t0 = time.perf_counter()
        for step in range(steps):
            train_step(s, cfg, d, epoch, step, lambda: (x, y))
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        wall = time.perf_counter() - t0
        if epoch:
            rows.append({"images_per_s": steps * cfg.batch / wall, "data_wait_pct": 0.0, "step_ms": wall / steps * 1e3})
    return rows


def run_config(args: argparse.Namespace, workers: int, amp: str, batch: int, train: Cityscapes | None) -> dict:
    cfg = SearchConfig(batch=batch, max_steps=args.steps, epochs=10, warmup_epochs=0, seed=0)
    compute = ComputeConfig(device=args.device, amp=amp, channels_last=args.channels_last, workers=workers)  # type: ignore[arg-type]
    if train is None:
        rows = memory_run(cfg, compute, tuple(args.size), args.epochs)
    else:
        rows = loader_run(cfg, compute, train, args.epochs)
    ips = [r["images_per_s"] for r in rows]
    wait = [r["data_wait_pct"] for r in rows]
    return {"workers": workers, "amp": amp, "batch": batch, "images_per_s_median": statistics.median(ips),
            "images_per_s_range": [min(ips), max(ips)], "data_wait_pct_median": statistics.median(wait),
            "data_wait_pct_range": [min(wait), max(wait)], "epochs": rows}


def largest_batch_run(args: argparse.Namespace, workers: int, amp: str, train: Cityscapes | None) -> dict:
    """``--batch``, halved while the device runs out of memory."""
    batch = args.batch
    while True:
        try:
            return run_config(args, workers, amp, batch, train)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"  batch {batch} does not fit; trying {batch // 2}")
            batch //= 2
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 512), help="search crop H W")
    ap.add_argument("--batch", type=int, default=16, help="batch (halved until it fits on a GPU)")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after one untimed)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to compare")
    ap.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--data", choices=["png", "memory"], default="png")
    ap.add_argument("--images", type=int, default=None,
                    help="Cityscapes-size PNGs to write (--data png; default batch × steps, one epoch's worth)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the training process (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        train = None
        if args.data == "png":
            args.images = args.images or args.batch * args.steps
            t0 = time.perf_counter()
            write_cityscapes_pngs(Path(tmp), args.images)
            print(f"wrote {args.images} PNGs of {CITYSCAPES_HW[0]}×{CITYSCAPES_HW[1]} in {time.perf_counter() - t0:.1f} s")
            train = Cityscapes(tmp, "train", Augment(tuple(args.size), True))
        for amp in args.amp:
            for workers in args.workers if args.data == "png" else [0]:
                r = largest_batch_run(args, workers, amp, train)
                results.append(r)
                print(f"workers {workers}  amp {amp:<4}  batch {r['batch']}: {r['images_per_s_median']:7.2f} images/s "
                      f"(range {r['images_per_s_range'][0]:.2f}–{r['images_per_s_range'][1]:.2f}), waiting for data "
                      f"{r['data_wait_pct_median']:5.1f} % of the step time (range {r['data_wait_pct_range'][0]:.1f}–"
                      f"{r['data_wait_pct_range'][1]:.1f} %)")
    write_result("search_throughput", {"config": {**{k: v for k, v in vars(args).items() if k != "out"},
                                                  "source_hw": CITYSCAPES_HW}, "results": results}, args.out)


if __name__ == "__main__":
    main()
