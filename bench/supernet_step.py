"""Supernet step cost: forward+backward at batch 2, 128×256, on CPU, in one run.

Variants: plain CE; CE + latency term; CE + latency term + GGM (the full GAS step). Reports the
median step time of each, their ratio to the plain step, and peak RSS growth (CPU) or peak CUDA
memory. Usage: ``python bench/supernet_step.py [--steps 10] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import write_result
from gas_core.latency import LatencyTerm, latency_loss
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.supernet import Supernet


def run_variant(name: str, ggm: str, use_lat: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    layout = NetworkLayout()
    net = Supernet(layout, ggm=ggm).to(dev)
    shapes = cell_shapes(layout, (args.height, args.width), args.batch)
    # Synthetic µs per key (2·MACs-free proxy: pixels·channels) — the cost being measured is the
    # term's arithmetic, which is independent of the values in L.
    table = {k.canonical: float(k.h * k.w * k.c_in * k.c_out) / 1e5 + 1.0 for k in shapes.all_keys()}
    term = LatencyTerm.from_table(shapes, table).to(dev)
    opt_w = torch.optim.SGD(net.weight_parameters(), lr=0.025, momentum=0.9, weight_decay=1e-3)
    opt_a = torch.optim.Adam(net.arch_parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.height, args.width, device=dev)
    y = torch.randint(0, layout.num_classes, (args.batch, args.height, args.width), device=dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        ce = F.cross_entropy(net(x), y, ignore_index=255)
        loss = latency_loss(ce, term(net.last_z), 0.005) if use_lat else ce
        loss.backward()
        opt_w.step()
        opt_a.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    # CUDA: the variant's own peak; CPU: the process's peak RSS so far (monotonic across variants)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "variant": name,
        "ggm": ggm,
        "latency_term": use_lat,
        "median_ms": statistics.median(times),
        "samples_ms": times,
        "peak_mib": peak,
        "peak_kind": "cuda_allocated" if dev.type == "cuda" else "process_rss",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    variants = [("plain", "none", False), ("latency", "none", True), ("latency+ggm", "gcn", True)]
    rows = [run_variant(n, g, lat, args) for n, g, lat in variants]
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_plain"] = r["median_ms"] / base
        ratio, peak = r["ratio_to_plain"], r["peak_mib"]
        print(f"{r['variant']:>12}: {r['median_ms']:8.1f} ms/step  ×{ratio:.3f}  peak {peak:.0f} MiB")
    write_result("supernet_step", {"config": vars(args), "variants": rows})


if __name__ == "__main__":
    main()
