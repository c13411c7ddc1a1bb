"""Cost of one training sample in a DataLoader worker: decode a Cityscapes-size image and label
(1024×2048 PNGs), apply the paper's augmentation (flip, scale 0.5–2.0, crop), normalise.

Compared in the same run, on the same files and random draws, one torch thread (as in a
DataLoader worker):

- ``decode``: the two PNGs decoded by PIL, nothing else (the floor);
- ``crop_only``: ``Cityscapes[i]`` as the search and training read it — ``Augment`` computes only
  the output pixels;
- ``whole_image``: the same sample the obvious way (the loader before this bench existed): the
  whole image to float, resized with ``F.interpolate`` (up to 2× the full size), padded, cropped.

On a GPU the search waits for this: at 256×512 crops one H200 step waited 79–88 % of its time
(docs/gpu.md). Every timing is kept; medians with p10/p90.

``python -m bench.loader_cost [--images 8] [--rounds 3] [--size 256 512]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import write_result
from bench.search_throughput import write_cityscapes_pngs
from gas_core.quality import quantile
from search_client.data import MEAN, STD, Augment, Cityscapes, augment_by_interpolate


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def summary(ms: list[float]) -> dict:
    return {"median_ms": quantile(ms, 0.5), "p10_ms": quantile(ms, 0.1), "p90_ms": quantile(ms, 0.9), "n": len(ms),
            "samples_per_s_per_worker": 1e3 / quantile(ms, 0.5), "all_ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="Cityscapes-size PNG pairs to write")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the images (each a new epoch's draws)")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 512), help="search crop H W")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cityscapes_pngs(root, args.images)
        ds = Cityscapes(root, "train", Augment(tuple(args.size), True))

        def whole_image(epoch: int, i: int) -> None:
            img, lbl = ds.load(i)
            gen = torch.Generator().manual_seed(hash((ds.seed, epoch, i)) & 0x7FFF_FFFF)
            x, _ = augment_by_interpolate(ds.augment, img, lbl, gen)
            _ = (x - MEAN) / STD

        def decode(i: int) -> None:
            np.array(Image.open(ds.items[i][0]).convert("RGB"))
            np.array(Image.open(ds.items[i][1]))

        times: dict[str, list[float]] = {"decode": [], "crop_only": [], "whole_image": []}
        for epoch in range(args.rounds):
            for i in range(len(ds)):  # interleaved, so host noise falls on all three alike
                times["decode"].append(timed(lambda: decode(i)))  # noqa: B023 — called at once
                times["crop_only"].append(timed(lambda: ds[(epoch, i)]))  # noqa: B023
                times["whole_image"].append(timed(lambda: whole_image(epoch, i)))  # noqa: B023
    res = {name: summary(ms) for name, ms in times.items()}
    for name, r in res.items():
        print(f"{name:>12}: {r['median_ms']:6.1f} ms (p10 {r['p10_ms']:.1f}, p90 {r['p90_ms']:.1f}), "
              f"{r['samples_per_s_per_worker']:.1f} samples/s per worker")
    speedup = res["whole_image"]["median_ms"] / res["crop_only"]["median_ms"]
    print(f"crop-only sampling: {speedup:.2f}x fewer ms per sample than resizing the whole image")
    write_result("loader_cost", {"images": args.images, "rounds": args.rounds, "size": list(args.size),
                                 "torch_threads": 1, "results": res, "speedup_median": speedup}, args.out)


if __name__ == "__main__":
    main()
