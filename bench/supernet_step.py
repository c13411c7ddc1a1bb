"""Supernet step cost: forward+backward at batch 2, 128×256, on CPU, in one run.

Variants: plain CE; CE + latency term; CE + latency term + GGM (the full GAS step), stepped
round-robin. Reports the median step time of each, their ratio to the plain step, and the peak
memory (process RSS on CPU, CUDA allocator peak on GPU). Usage: ``python bench/supernet_step.py [--steps 10] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import write_result
from gas_core.ggm import GGMKind
from gas_core.latency import LatencyTerm, latency_loss
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.supernet import Supernet


class Variant:
    """One supernet + optimisers + latency term; ``step()`` runs and times one training step."""

    def __init__(self, name: str, ggm: GGMKind, use_lat: bool, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.name, self.ggm, self.use_lat, self.dev = name, ggm, use_lat, torch.device(args.device)
        layout = NetworkLayout()
        self.net = Supernet(layout, ggm=ggm).to(self.dev)
        shapes = cell_shapes(layout, (args.height, args.width), args.batch)
        # Stand-in µs per key (∝ pixels·channels): the cost measured here is the term's arithmetic,
        # which does not depend on the values in L.
        table = {k.canonical: float(k.h * k.w * k.c_in * k.c_out) / 1e5 + 1.0 for k in shapes.all_keys()}
        self.term = LatencyTerm.from_table(shapes, table).to(self.dev)
        self.opt_w = torch.optim.SGD(self.net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=1e-3)
        self.opt_a = torch.optim.Adam(self.net.arch_parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
        self.x = torch.randn(args.batch, 3, args.height, args.width, device=self.dev)
        self.y = torch.randint(0, layout.num_classes, (args.batch, args.height, args.width), device=self.dev)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        cuda = self.dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.opt_w.zero_grad(set_to_none=True)
        self.opt_a.zero_grad(set_to_none=True)
        logits, z = self.net(self.x)
        ce = F.cross_entropy(logits, self.y)
        loss = latency_loss(ce, self.term(z), 0.005) if self.use_lat else ce
        loss.backward()
        self.opt_w.step()
        self.opt_a.step()
        if cuda:
            torch.cuda.synchronize()
        if record:
            self.times.append((time.perf_counter() - t0) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    kinds: list[tuple[str, GGMKind, bool]] = [("plain", "none", False), ("latency", "none", True),
                                             ("latency+ggm", "gcn", True)]
    variants = [Variant(n, g, lat, args) for n, g, lat in kinds]
    # round-robin, so drift in machine load hits every variant alike
    for i in range(args.warmup + args.steps):
        for v in variants:
            v.step(record=i >= args.warmup)
    cuda = args.device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows: list[dict[str, Any]] = [{"variant": v.name, "ggm": v.ggm, "latency_term": v.use_lat,
                                   "median_ms": statistics.median(v.times), "samples_ms": v.times} for v in variants]
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_plain"] = r["median_ms"] / base
        print(f"{r['variant']:>12}: {r['median_ms']:8.1f} ms/step  ×{r['ratio_to_plain']:.3f}")
    kind = "cuda_max_allocated" if cuda else "process_max_rss (all three variants resident)"
    print(f"peak memory {peak:.0f} MiB ({kind})")
    write_result("supernet_step", {"config": vars(args), "variants": rows, "peak_mib": peak, "peak_kind": kind})


if __name__ == "__main__":
    main()
