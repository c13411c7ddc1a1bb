"""Where a one-graph runtime's per-key sum misses, and whether a coarser key would not.

A table times each key as its own graph or, where it can, as the marginal cost of one more copy
of itself inside a graph (docs/latency-key.md "In-graph keys"). A runtime that compiles the
whole network as one graph (ONNX Runtime, torch.compile) fuses across key boundaries (a ReLU
into the conv before it, a node sum into what reads it) and plans memory across them, so the
per-key sum misses by what that saves. This benchmark measures by how much, and at which granularity the miss goes away:

1. every cell of ``--nets`` derived networks, exported or compiled as one graph at its exact
   inputs (BN folded, as shipped) and timed with the service's method, against the sum of its
   keys' own costs (:func:`gas_core.latency.own_cost_us`: an in-graph key's median, an
   own-graph key's median less the ``graph_call`` entry its graph paid);
2. every whole network as one graph, against (a) the per-key sum, the table's prediction, and
   (b) the cell-granular sum: the stem and head keys plus each cell as one graph (less its entry).

If (b) lands where (a) does not, the runtime fuses inside cells and a cell-level key is the fix;
if both miss alike, the loss is between cells or in the network's graph as a whole.

3. each network split into its parts *in the network*: the graphs of its prefixes (stem; stem and
   cell 0; …; all cells; + head; + classifier and resize = the network) prepared under the
   runtime, and each part's cost the paired marginal of its prefix over the one before
   (:func:`latency_service.profiler.time_marginal`; the stem's is its prefix less the entry).
   The parts telescope to the whole graph, so this says *which* part's keys miss it: the stem,
   normal or reduction cells, the head, the classifier and resize. (A prefix ends at its last
   part, which is then live even where the network drops it as dead code: such a part's share
   moves to its neighbours; derived networks of ``--nets`` rarely have one.)

Pairing against this VM's noise (one host here switches between a fast and a 2–3× slower mode
for minutes): each cell is timed, then its keys, then the cell again; each network before and
after its cells. A ratio's two sides therefore share the host's mode. ``--passes`` repeats all of
it; every figure is the median over passes with the spread (max − min) / median beside it.

    python -m bench.fusion_gap --runtime eager --runtime onnxruntime --input-size 128 256 --nets 6
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from bench.prediction_accuracy import CHEAP, DEAR, summary  # noqa: E402
from gas_core.genotype import Genotype, random_genotype  # noqa: E402
from gas_core.keys import LatencyKey, Runtime  # noqa: E402
from gas_core.latency import cell_keys, own_cost_us  # noqa: E402
from gas_core.network import GASNet  # noqa: E402
from gas_core.runtimes import prepare  # noqa: E402
from gas_core.search_space import NetworkLayout, NetworkShapes, cell_shapes  # noqa: E402
from latency_service.profiler import Method, time_callable, time_key, time_marginal  # noqa: E402

METHOD = Method(warmup_runs=10, warmup_ms=50.0, samples=30, min_sample_ms=1.0)
"""The service's timing of a key (the figures of ``bench.prediction_accuracy``'s tables)."""


def nets_spanning(layout: NetworkLayout, n: int) -> list[Genotype]:
    """``n`` random genotypes whose op mixture goes from cheap (skips, pools) to dear (convs)."""
    return [random_genotype(layout, torch.Generator().manual_seed(500 + i),
                            CHEAP * (1 - i / max(1, n - 1)) + DEAR * i / max(1, n - 1)) for i in range(n)]


def cell_inputs(net: GASNet, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each cell's ``(s0, s1)`` in the network's eager forward on ``x`` (N, 3, H, W): the outputs
    of the prefixes ending two parts and one part before it (the stem's output twice for cell 0)."""
    n = len(net.cells)
    with torch.no_grad():
        outs = [net.run(x, [None] * n, parts=j) for j in range(1, n + 1)]  # stem, cells 0 … n − 2
    return [(outs[max(c - 1, 0)], outs[c]) for c in range(n)]


@dataclass
class Plan:
    """What one pass of a runtime times. Nothing is prepared ahead: each network, cell, prefix
    and key is exported or compiled just before it is timed, as the service does. A
    ``torch.compile`` callable stays compiled only until the next one is prepared (that resets
    dynamo), and every cell or prefix shares one ``forward``: prepared all at once, the later
    calls would recompile each, past dynamo's recompile limit (:mod:`gas_core.runtimes` makes
    that an error rather than a silent eager timing)."""

    runtime: str
    shapes: NetworkShapes
    x: torch.Tensor
    nets: list[GASNet] = field(default_factory=list)
    cell_keys: list[list[list[LatencyKey]]] = field(default_factory=list)


class Prefix(nn.Module):
    """The network up to part ``parts`` of :func:`part_kinds` (1: the stem alone; the last: the
    whole network): ``(N, 3, H, W) →`` that part's output. Shares the network's modules."""

    def __init__(self, net: GASNet, parts: int) -> None:
        super().__init__()
        self.net, self.parts = net, parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run(x, [None] * len(self.net.cells), parts=self.parts)


def part_kinds(layout: NetworkLayout) -> list[str]:
    """The kind of each part of a network, in order: stem, each cell's kind, head, classifier+resize."""
    cells = ["reduction" if layout.is_reduction(c) else "normal" for c in range(layout.num_cells)]
    return ["stem", *cells, "head", "classifier+resize"]


def part_keys(shapes: NetworkShapes, cells: list[list[LatencyKey]]) -> list[list[LatencyKey]]:
    """Each part's keys (:func:`part_kinds` order); the graph entry belongs to none."""
    return [list(shapes.stem), *cells, list(shapes.head[:1]), list(shapes.head[1:])]


def plan_runtime(runtime: Runtime, layout: NetworkLayout, size: tuple[int, int], genos: list[Genotype],
                 device: torch.device) -> Plan:
    shapes = cell_shapes(layout, size, runtime=runtime)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    p = Plan(runtime, shapes, x)
    for g in genos:
        p.nets.append(GASNet(g).eval().to(device))
        p.cell_keys.append([cell_keys(c, gc.edges, shapes) for c, gc in zip(shapes.structure.cells, g.cells,
                                                                             strict=True)])
    return p


def ready(p: Plan, module: nn.Module, args: tuple, device: torch.device) -> Callable[[], object]:
    """``module`` on ``args`` exported or compiled under the plan's runtime, to be timed now."""
    with torch.no_grad():
        return prepare(p.runtime, module, args, device)


def parts_in_network(p: Plan, net: GASNet, call_us: float, device: torch.device) -> list[float]:
    """Each part's cost inside its network, µs: the stem's prefix less the entry, then each
    prefix's paired marginal over the one before (they telescope to the whole graph)."""
    shorter = ready(p, Prefix(net, 1), (p.x,), device)
    costs = [timed(shorter, device) - call_us]
    for j in range(2, len(part_kinds(net.layout)) + 1):
        longer = ready(p, Prefix(net, j), (p.x,), device)
        with torch.inference_mode():
            costs.append(time_marginal(longer, shorter, 1, device, METHOD, "+part").median_us)
        shorter = longer
    return costs


def timed(fn: Callable[[], object], device: torch.device) -> float:
    with torch.inference_mode():
        return time_callable(fn, device, METHOD).median_us


def timed_key(key: LatencyKey, device: torch.device) -> float:
    """A key timed as the service times it (inside a graph when it is an in-graph key)."""
    return time_key(key, device, METHOD).median_us


def one_pass(p: Plan, device: torch.device) -> dict:
    """One pass of a runtime: per network, its whole-graph time around its cells, each cell's
    time around its keys, the two predictions, and its parts in the network. µs."""
    table: dict[str, float] = {}
    call_us = 0.0
    if p.shapes.call is not None:
        call_us = table[p.shapes.call.canonical] = timed_key(p.shapes.call, device)
    for k in [*p.shapes.stem, *p.shapes.head]:
        table[k.canonical] = timed_key(k, device)

    def cost(keys: list[LatencyKey]) -> float:  # what the table predicts these keys add to a network
        return sum(own_cost_us(k, table, p.shapes.call) for k in keys)

    fixed = call_us + cost([*p.shapes.stem, *p.shapes.head])
    nets = []
    for net, keys_per_cell in tqdm(list(zip(p.nets, p.cell_keys, strict=True)), desc=f"{p.runtime}: networks",
                                   leave=False):
        run_net = ready(p, net, (p.x,), device)
        before = timed(run_net, device)
        rows = []
        for cell, ins, keys in zip(net.cells, cell_inputs(net, p.x), keys_per_cell, strict=True):
            run_cell = ready(p, cell, ins, device)
            first = timed(run_cell, device)
            for k in dict.fromkeys(keys):
                table[k.canonical] = timed_key(k, device)
            cell_us = (first + timed(run_cell, device)) / 2 - call_us  # the cell's own cost in a network
            rows.append({"cell_us": cell_us, "keys_us": cost(keys)})
        measured = (before + timed(run_net, device)) / 2
        parts = zip(parts_in_network(p, net, call_us, device), part_keys(p.shapes, keys_per_cell), strict=True)
        nets.append({"measured_us": measured, "key_sum_us": fixed + sum(r["keys_us"] for r in rows),
                     "cell_sum_us": fixed + sum(r["cell_us"] for r in rows), "cells": rows,
                     "parts": [{"in_network_us": us, "keys_us": cost(keys)} for us, keys in parts]})
    return {"graph_call_us": call_us, "nets": nets}


def med_spread(values: list[float]) -> tuple[float, float]:
    m = statistics.median(values)
    return m, (max(values) - min(values)) / m * 100 if m else float("nan")


def combine(passes: list[dict], layout: NetworkLayout) -> dict:
    """Medians over passes, their spreads, per-cell gaps by cell kind, and both predictions'
    accuracy against the whole-network times."""
    n_nets = len(passes[0]["nets"])
    nets: list[dict] = []
    gaps: dict[str, list[float]] = {"normal": [], "reduction": []}
    for i in range(n_nets):
        row: dict = {}
        for k in ("measured_us", "key_sum_us", "cell_sum_us"):
            row[k], row[k.replace("_us", "_spread_pct")] = med_spread([p["nets"][i][k] for p in passes])
        cells = []
        for c in range(layout.num_cells):
            cell_us, spread = med_spread([p["nets"][i]["cells"][c]["cell_us"] for p in passes])
            keys_us = statistics.median(p["nets"][i]["cells"][c]["keys_us"] for p in passes)
            gap = (keys_us - cell_us) / cell_us * 100
            cells.append({"cell_us": cell_us, "cell_spread_pct": spread, "keys_us": keys_us, "gap_pct": gap})
            gaps["reduction" if layout.is_reduction(c) else "normal"].append(gap)
        row["cells"] = cells
        row["parts"] = combine_parts([p["nets"][i]["parts"] for p in passes], layout)
        row["parts_sum_us"] = sum(part["in_network_us"] for part in row["parts"])
        nets.append(row)
    meas = [n["measured_us"] for n in nets]
    return {
        "graph_call_us": med_spread([p["graph_call_us"] for p in passes]) if passes[0]["graph_call_us"] else None,
        "cell_gap_pct": {kind: {"median": statistics.median(v), "min": min(v), "max": max(v), "cells": len(v)}
                         for kind, v in gaps.items() if v},
        "part_gap": part_gaps(nets, layout),
        "key_sum": summary([n["key_sum_us"] for n in nets], meas),
        "cell_sum": summary([n["cell_sum_us"] for n in nets], meas),
        "nets": nets,
    }


def combine_parts(per_pass: list[list[dict]], layout: NetworkLayout) -> list[dict]:
    """One network's parts over passes: the median in-network cost and key sum of each, µs."""
    return [{"kind": kind, "in_network_us": statistics.median(ps[j]["in_network_us"] for ps in per_pass),
             "keys_us": statistics.median(ps[j]["keys_us"] for ps in per_pass)}
            for j, kind in enumerate(part_kinds(layout))]


def part_gaps(nets: list[dict], layout: NetworkLayout) -> dict[str, dict]:
    """Per part kind over every network: how far its keys are from its cost in the network
    (median and range of (keys − in network) / in network, %) and what it adds to the networks'
    total miss (Σ keys − Σ in network, µs, and that as a share of Σ in network of all parts)."""
    total = sum(part["in_network_us"] for n in nets for part in n["parts"])
    out = {}
    for kind in dict.fromkeys(part_kinds(layout)):
        parts = [part for n in nets for part in n["parts"] if part["kind"] == kind]
        gaps = [(pt["keys_us"] - pt["in_network_us"]) / pt["in_network_us"] * 100 for pt in parts
                if pt["in_network_us"] > 0]
        excess = sum(pt["keys_us"] - pt["in_network_us"] for pt in parts)
        out[kind] = {"median_gap_pct": statistics.median(gaps) if gaps else None,
                     "min_gap_pct": min(gaps, default=None), "max_gap_pct": max(gaps, default=None),
                     "parts": len(parts), "in_network_us": sum(pt["in_network_us"] for pt in parts),
                     "keys_us": sum(pt["keys_us"] for pt in parts), "excess_us": excess,
                     "excess_pct_of_networks": excess / total * 100 if total else None}
    return out


def plot(path: Path, results: dict[str, dict], title: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for name, r in results.items():
        for kind in dict.fromkeys(part["kind"] for n in r["nets"] for part in n.get("parts", [])):
            parts = [part for n in r["nets"] for part in n["parts"] if part["kind"] == kind]
            axes[2].scatter([pt["in_network_us"] for pt in parts], [pt["keys_us"] for pt in parts], s=12, alpha=0.7,
                            label=f"{name}: {kind}")
        cells = [c for n in r["nets"] for c in n["cells"]]
        axes[0].scatter([c["cell_us"] for c in cells], [c["keys_us"] for c in cells], s=10, alpha=0.6, label=name)
        meas = [n["measured_us"] / 1e3 for n in r["nets"]]
        axes[1].scatter(meas, [n["key_sum_us"] / 1e3 for n in r["nets"]], marker="o", label=f"{name}: key sum")
        axes[1].scatter(meas, [n["cell_sum_us"] / 1e3 for n in r["nets"]], marker="x", label=f"{name}: cell sum")
    for ax, unit, what in ((axes[0], "µs", "cell"), (axes[1], "ms", "network"), (axes[2], "µs", "part")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set_xlabel(f"{what} in its network (prefix marginal), {unit}" if what == "part"
                      else f"{what} timed as one graph, {unit}")
        ax.set_ylabel(f"predicted from its parts, {unit}")
        ax.legend(fontsize=7)
    axes[0].set_title("each cell: sum of its keys")
    axes[1].set_title("each network: per-key and per-cell sums")
    axes[2].set_title("each part of each network: sum of its keys")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", action="append", dest="runtimes", default=None,
                    help="runtime to measure (repeatable; default eager and onnxruntime)")
    ap.add_argument("--input-size", type=int, nargs=2, default=(128, 256), metavar=("H", "W"))
    ap.add_argument("--nets", type=int, default=6, help="derived networks, cheap to dear")
    ap.add_argument("--passes", type=int, default=3, help="repeats of the whole measurement, for the spread")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtimes" / "fusion_gap.json")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    device, size = torch.device(args.device), tuple(args.input_size)
    layout = NetworkLayout(num_classes=4)
    genos = nets_spanning(layout, args.nets)
    plans = [plan_runtime(r, layout, size, genos, device) for r in (args.runtimes or ["eager", "onnxruntime"])]
    passes: dict[str, list[dict]] = {p.runtime: [] for p in plans}
    for _ in tqdm(range(args.passes), desc="passes"):
        for p in plans:  # runtimes alternate within a pass, so each sees the host's every mode
            passes[p.runtime].append(one_pass(p, device))
    results = {r: combine(ps, layout) for r, ps in passes.items()}
    for r, res in results.items():
        gaps = ", ".join(f"{kind} {g['median']:+.1f} % ({g['min']:+.1f}…{g['max']:+.1f}, {g['cells']} cells)"
                         for kind, g in res["cell_gap_pct"].items())
        print(f"{r}: cell key-sum − cell-as-one-graph, median: {gaps}")
        for pred in ("key_sum", "cell_sum"):
            s = res[pred]
            print(f"  whole network from {pred}: median |err| {s['median_abs_err_pct']:.1f} %, max "
                  f"{s['max_abs_err_pct']:.1f} %, mean signed {s['mean_signed_err_pct']:+.1f} %, within ±10 % "
                  f"{s['within_10_pct']:.0%}, τ {s['kendall_tau'] if s['kendall_tau'] is None else round(s['kendall_tau'], 2)}")
        print("  each part in its network (keys − in network; its excess as a share of the networks' total):")
        for kind, g in res["part_gap"].items():
            if g["median_gap_pct"] is not None:
                print(f"    {kind:18s} median {g['median_gap_pct']:+6.1f} % ({g['min_gap_pct']:+.1f}…"
                      f"{g['max_gap_pct']:+.1f}, {g['parts']} parts), excess {g['excess_us']:+9.1f} µs = "
                      f"{g['excess_pct_of_networks']:+.1f} % of the networks")
        parts_off = [(n["parts_sum_us"] + (res["graph_call_us"][0] if res["graph_call_us"] else 0)) / n["measured_us"]
                     - 1 for n in res["nets"]]
        print(f"  parts + entry against the whole graph: median {statistics.median(parts_off):+.1%} (they telescope)")
        spreads = [n["measured_spread_pct"] for n in res["nets"]]
        print(f"  whole-network pass spread: median {statistics.median(spreads):.1f} %, max {max(spreads):.1f} %")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(args.out.with_suffix(".png"), results, f"{size[0]}×{size[1]}, batch 1, float32, {args.nets} nets, "
         f"{args.passes} passes")
    write_result("fusion_gap", {"config": {"input_size": size, "nets": args.nets, "passes": args.passes,
                                           "device": args.device, "method": vars(METHOD)},
                                "results": results}, args.out)


if __name__ == "__main__":
    main()
