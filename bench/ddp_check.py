"""A short search under ``torchrun`` on the GPUs present: NCCL process group, DDP with
``device_ids``, each rank on ``cuda:LOCAL_RANK`` loading its own slice. Checks that every rank
ends with the same α (DDP kept them in step) and writes JSON from rank 0.

``torchrun --nproc_per_node N -m bench.ddp_check --out bench/results/gpu/torchrun.json``

With one GPU, torchrun starts one rank: the NCCL group is still created and an all-reduce run,
but there is no second GPU to exchange gradients with — the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import machine, stand_in_term
from gas_core.search_space import NetworkLayout
from search_client.data import build_datasets
from search_client.runtime import ComputeConfig, init_distributed, run_rank
from search_client.search import SearchConfig, search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (each rank on cuda:LOCAL_RANK) or cpu (gloo)")
    ap.add_argument("--size", type=int, nargs=2, default=(256, 512))
    ap.add_argument("--batch", type=int, default=16, help="global batch")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    d = init_distributed(args.device)
    if not dist.is_initialized():  # one rank: create the group anyway, so the backend itself is exercised
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device.startswith("cuda"):
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo", rank=0, world_size=1)
    backend = dist.get_backend()
    size = tuple(args.size)
    train, val = build_datasets("synthetic", None, size, 0, (args.batch * args.steps, 2 * d.world))
    layout = NetworkLayout(num_classes=train.num_classes)
    cfg = SearchConfig(epochs=2, batch=args.batch, max_steps=args.steps, lr_a=0.01, seed=0)
    t0 = time.perf_counter()
    res = search(cfg, layout, train, val, stand_in_term(layout, size), Path(tempfile.mkdtemp(prefix="gas-ddp-")), dist_info=d,
                 compute=ComputeConfig(device=args.device, amp=args.amp, workers=2), progress=False)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    alphas: list = [None] * dist.get_world_size()
    dist.all_gather_object(alphas, res.supernet.alpha.detach().cpu())
    one = torch.ones(1, device=res.supernet.alpha.device)
    dist.all_reduce(one)
    if d.main:
        same = all(torch.equal(alphas[0], a) for a in alphas)
        out = {"benchmark": "torchrun", "machine": machine(), "backend": backend, "world": dist.get_world_size(),
               "rank0_device": str(res.supernet.alpha.device), "all_reduce_sum": float(one), "alpha_equal_on_all_ranks": same,
               "ddp_gradient_exchange": dist.get_world_size() > 1, "epochs": len(res.history),
               "wall_s": wall, "val_miou": res.history[-1]["val_miou"],
               "images_per_s": [h["images_per_s"] for h in res.history]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
        print(json.dumps({k: v for k, v in out.items() if k != "machine"}))


if __name__ == "__main__":
    run_rank(main)
