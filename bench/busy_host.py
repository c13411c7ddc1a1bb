"""What a busy host does to a latency table, and a method that holds up (docs/timing.md, "A
busy host").

The demo's keys (the synthetic layout at 96×192) are timed in this process, on this host, quiet
and then while ``N`` competing processes run (``--hogs 0 1 2``: each a torch matmul loop on 2
threads, what another user's job or a second service does to a shared VM). Per condition:

* the **paired** method the service used on CPUs until now (``n × [context, op] − n × [context]``,
  samples of ≥ 5 ms; under load on the ``--paired-keys`` cheapest-to-dearest subset, each key
  capped at ``--paired-budget-s``);
* **direct** timings: ``--runs`` single runs of the op, each right after its context, between
  two timer readings (no difference); the candidate statistics are computed from the same runs:
  their median, their 10th percentile, and the median of the fastest of each block of 5
  (``min5``: ``timeit``'s "fastest repeat", on blocks);
* the thread count's part: a few keys timed directly with torch on 1 thread and on all;
* the host as the service sees it: the reference workload (median and p90 of its bursts), the
  load average and the cores other processes used (:func:`latency_service.host.host_load`).

Quiet, ``--nets`` uniform genotypes are measured end to end, ``--passes`` interleaved passes
(median of passes). Reported: per key and condition the inflation against quiet, each
statistic's Kendall τ against its own quiet table and against the quiet paired table, the
whole-network prediction of the 10 nets against their quiet measurement with the prediction's
stated uncertainty (2 SE of the row medians), the flags the service's policy would raise, and
the wall time per key. ``python -m bench.busy_host [--hogs 0 1 2] [--out
bench/results/busy_host.json]``; ``--reanalyse JSON`` recomputes the summaries without timing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from gas_core.genotype import Genotype, random_genotype  # noqa: E402
from gas_core.latency import constant_output  # noqa: E402
from gas_core.network import GASNet  # noqa: E402
from gas_core.progress import progress  # noqa: E402
from gas_core.quality import RowStat, assess, median_se, predict_with_uncertainty, quantile  # noqa: E402
from gas_core.search_space import NetworkLayout, cell_shapes  # noqa: E402
from gas_core.table import kendall_tau  # noqa: E402
from latency_service.device import host_load  # noqa: E402
from latency_service.profiler import (  # noqa: E402
    Method,
    context_case,
    default_flush_bytes,
    prepare_key,
    time_callable,
    time_network,
    time_reference,
)

LAYOUT = NetworkLayout(num_classes=4)  # the demo's synthetic data
SIZE = (96, 192)
PAIRED = Method(context=True)  # the service's CPU default until now (settings' defaults)
HOG = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\n"
       "while True:\n    b = a @ a\n")
THREAD_KEYS = 6
STATS = ("median", "p10", "min5")
CAPPED = "min5_1thread"
"""min5 of the runs on one thread (``--add-capped``), where a condition has them."""


def statistic(runs_us: list[float], name: str) -> float:
    """One candidate figure from a key's single runs (in time order)."""
    if name == "median":
        return statistics.median(runs_us)
    if name == "p10":
        return quantile(runs_us, 0.1)
    return statistics.median(blocks(runs_us))


def blocks(runs_us: list[float], size: int = 5) -> list[float]:
    """The fastest of each consecutive block of ``size`` runs."""
    return [min(runs_us[i:i + size]) for i in range(0, len(runs_us) - size + 1, size)]


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]


def time_condition(keys: list, cases: dict, paired_keys: set[str], args: argparse.Namespace,
                   label: str) -> dict:
    """Every key timed directly (and the paired subset the old way) under the current load."""
    device = torch.device("cpu")
    flush = default_flush_bytes(device)
    direct = Method(context=True, direct=True, samples=args.runs, warmup_runs=3, warmup_ms=20.0)
    paired = Method(context=True, key_budget_s=args.paired_budget_s)
    load = host_load()
    ref = [b.median_us for b in time_reference(device)]
    rows: dict[str, dict] = {}
    bar = progress(total=len(keys), desc=f"{label}: keys", unit="key")
    for key in keys:
        case = cases[key.canonical]
        ctx = context_case(device, key.dtype, key.memory_format, flush, case.args)
        row: dict = {}
        with torch.inference_mode():
            t0 = time.perf_counter()
            d = time_callable(case.run, device, direct, ctx)
            row["direct_s"] = time.perf_counter() - t0
            row["runs_us"] = d.samples_us
            if key.canonical in paired_keys:
                t0 = time.perf_counter()
                p = time_callable(case.run, device, paired, ctx)
                row["paired_s"] = time.perf_counter() - t0
                row["paired_us"] = p.samples_us
                row["paired_cut"] = p.budget_spent
        rows[key.canonical] = row
        bar.update(1)
    bar.close()
    threads = thread_check(keys[:: max(1, len(keys) // THREAD_KEYS)][:THREAD_KEYS], cases, direct, flush)
    return {"load": load.model_dump(), "reference_bursts_us": ref, "rows": rows, "threads": threads,
            "load_after": host_load().model_dump()}


def thread_check(keys: list, cases: dict, method: Method, flush: int) -> dict:
    """Median and p10 of single runs on 1 thread and on all: does oversubscription inflate them?"""
    device = torch.device("cpu")
    out: dict[str, dict] = {}
    full = torch.get_num_threads()
    for key in keys:
        case = cases[key.canonical]
        ctx = context_case(device, key.dtype, key.memory_format, flush, case.args)
        out[key.canonical] = {}
        for n in sorted({1, full}):
            torch.set_num_threads(n)
            with torch.inference_mode():
                runs = time_callable(case.run, device, method, ctx).samples_us
            out[key.canonical][str(n)] = {"median_us": statistics.median(runs), "p10_us": quantile(runs, 0.1)}
        torch.set_num_threads(full)
    return out


def capped_runs(keys: list, cases: dict, runs: int, label: str) -> dict[str, list[float]]:
    """Every key timed directly on one thread (the cores a competing process leaves free on a
    2-core host): is a thread-capped table the robust one?"""
    device = torch.device("cpu")
    flush = default_flush_bytes(device)
    method = Method(context=True, direct=True, samples=runs, warmup_runs=3, warmup_ms=20.0)
    full = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for key in progress(keys, desc=f"{label}: keys on 1 thread", unit="key"):
            case = cases[key.canonical]
            ctx = context_case(device, key.dtype, key.memory_format, flush, case.args)
            with torch.inference_mode():
                out[key.canonical] = time_callable(case.run, device, method, ctx).samples_us
    finally:
        torch.set_num_threads(full)
    return out


def nets(n: int) -> list[Genotype]:
    """``n`` uniform genotypes (seeded), none whose output is constant."""
    shapes = cell_shapes(LAYOUT, SIZE)
    out: list[Genotype] = []
    seed = 0
    while len(out) < n:
        g = random_genotype(LAYOUT, torch.Generator().manual_seed(7000 + seed))
        seed += 1
        if not constant_output(g, shapes):
            out.append(g)
    return out


def measure_nets(genotypes: list[Genotype], passes: int) -> list[dict]:
    """Each net end to end, ``passes`` interleaved passes; its figure is the median of passes."""
    method = Method(warmup_runs=5, samples=20)
    models = [GASNet(g) for g in genotypes]
    per: list[list[float]] = [[] for _ in genotypes]
    for p in range(passes):
        for i in range(len(models)):
            j = (i + p) % len(models)
            per[j].append(time_network(models[j], SIZE, 1, "float32", "contiguous", torch.device("cpu"),
                                       method).median_us)
    return [{"genotype": g.model_dump(mode="json"), "passes_us": xs, "median_us": statistics.median(xs)}
            for g, xs in zip(genotypes, per, strict=True)]


# ---------------------------------------------------------------- analysis


def figures(cond: dict) -> dict[str, dict[str, float]]:
    """Per statistic (and ``paired`` where timed), key → µs."""
    out: dict[str, dict[str, float]] = {s: {k: statistic(r["runs_us"], s) for k, r in cond["rows"].items()}
                                        for s in STATS}
    out["paired"] = {k: max(0.0, statistics.median(r["paired_us"])) for k, r in cond["rows"].items()
                     if "paired_us" in r}
    out[CAPPED] = {k: statistic(r["runs_1thread_us"], "min5") for k, r in cond["rows"].items()
                   if "runs_1thread_us" in r}
    return out


def row_stats(cond: dict, stat: str) -> dict[str, RowStat]:
    """Each key's figure with its standard error (of the median of what the statistic keeps)."""
    out = {}
    for k, r in cond["rows"].items():
        if stat == CAPPED:
            if "runs_1thread_us" not in r:
                continue
            out[k] = RowStat(median_us=statistic(r["runs_1thread_us"], "min5"),
                             se_us=median_se(blocks(r["runs_1thread_us"])), flagged=False)
            continue
        if stat == "paired":
            if "paired_us" not in r:
                continue
            xs = r["paired_us"]
        else:
            xs = blocks(r["runs_us"]) if stat == "min5" else r["runs_us"]
        se = median_se(xs) if stat != "p10" else median_se(r["runs_us"])
        out[k] = RowStat(median_us=max(0.0, statistic(r["runs_us"], stat)) if stat != "paired"
                         else max(0.0, statistics.median(xs)), se_us=se, flagged=False)
    return out


def flags(cond: dict) -> dict[str, int]:
    """Rows the service's policy flags: the paired samples as stored until now, and the direct
    runs (their spread, and a median ≥ 3× the fastest run: most runs interrupted)."""
    paired = sum(assess(r["paired_us"]).flagged for r in cond["rows"].values() if "paired_us" in r)
    direct = sum(assess(r["runs_us"]).flagged for r in cond["rows"].values())
    interrupted = sum(statistics.median(r["runs_us"]) >= 3 * min(r["runs_us"]) for r in cond["rows"].values())
    return {"paired_flagged": paired, "paired_timed": sum("paired_us" in r for r in cond["rows"].values()),
            "direct_flagged": direct, "direct_interrupted": interrupted, "keys": len(cond["rows"])}


def predictions(cond: dict, stat: str, measured: list[dict]) -> dict:
    """The nets predicted from this condition's table under ``stat`` against their quiet
    measurement: signed errors, and whether 2 SE of the prediction covers each."""
    rows = row_stats(cond, stat)
    shapes = cell_shapes(LAYOUT, SIZE)
    errs, covered = [], []
    for m in measured:
        g = Genotype.model_validate(m["genotype"])
        try:
            pred = predict_with_uncertainty(g, shapes, rows)
        except KeyError:
            return {"errors_pct": None}
        err = (pred.predicted_us - m["median_us"]) / m["median_us"] * 100
        errs.append(err)
        covered.append(abs(pred.predicted_us - m["median_us"]) <= 2 * pred.se_us)
    return {"errors_pct": errs, "median_abs_pct": statistics.median(abs(e) for e in errs),
            "max_abs_pct": max(abs(e) for e in errs), "within_25_pct": sum(abs(e) <= 25 for e in errs),
            "covered_by_2se": sum(covered)}


def analyse(data: dict) -> dict:
    conds = data["conditions"]
    quiet = figures(conds["0"])
    summary: dict = {}
    for hogs, cond in conds.items():
        figs = figures(cond)
        entry: dict = {"flags": flags(cond), "wall_direct_s": sum(r["direct_s"] for r in cond["rows"].values()),
                       "wall_paired_s": sum(r.get("paired_s", 0.0) for r in cond["rows"].values()),
                       "load": cond["load"], "reference_median_us": statistics.median(cond["reference_bursts_us"]),
                       "reference_p90_us": quantile(cond["reference_bursts_us"], 0.9)}
        for stat, fig in figs.items():
            if not fig:
                continue
            entry.setdefault("vs_quiet_min5", {})[stat] = kendall_tau(
                [quiet["min5"][k] for k in fig], list(fig.values())) if stat == CAPPED else None
            common = [k for k in fig if k in quiet[stat]]
            infl = [fig[k] / quiet[stat][k] for k in common if quiet[stat][k] > 0]
            entry[stat] = {
                "keys": len(common),
                "tau_vs_own_quiet": kendall_tau([quiet[stat][k] for k in common], [fig[k] for k in common]),
                "tau_vs_quiet_paired": kendall_tau([quiet["paired"][k] for k in common if k in quiet["paired"]],
                                                   [fig[k] for k in common if k in quiet["paired"]]),
                "inflation_median": statistics.median(infl) if infl else None,
                "inflation_max": max(infl) if infl else None,
                "sum_us": sum(fig.values()),
                "prediction": predictions(cond, stat, data["nets"]) if len(fig) == len(cond["rows"]) else None,
            }
        summary[hogs] = entry
    return summary


def plot(data: dict, path: Path) -> None:
    conds = data["conditions"]
    quiet = figures(conds["0"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, stat in zip(axes, ("paired", "min5"), strict=True):
        for hogs, cond in conds.items():
            if hogs == "0":
                continue
            f = figures(cond)[stat]
            ks = [k for k in f if quiet[stat].get(k, 0) > 0]
            xs = [quiet[stat][k] for k in ks]
            ax.scatter(xs, [f[k] / quiet[stat][k] for k in ks], s=14, label=f"{hogs} competing")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xlabel(f"quiet {stat} (µs)")
        ax.set_title(f"{stat}: figure under load / quiet figure")
        ax.legend()
    axes[0].set_ylabel("inflation (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def add_capped(args: argparse.Namespace) -> None:
    """``--add-capped``: the thread-capped runs of every condition of a stored results file."""
    data = json.loads(args.out.read_text())
    keys = cell_shapes(LAYOUT, SIZE).all_keys()
    cases = {k.canonical: prepare_key(k, torch.device("cpu")) for k in keys}
    for hogs in args.hogs:
        procs = start_hogs(hogs)
        try:
            if hogs:
                time.sleep(5.0)
            capped = capped_runs(keys, cases, args.runs, f"{hogs} competing")
        finally:
            for p in procs:
                p.kill()
                p.wait()
        for k, runs in capped.items():
            data["conditions"][str(hogs)]["rows"][k]["runs_1thread_us"] = runs
    data["summary"] = analyse(data)
    write_result("busy_host", data, args.out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2], help="competing processes per condition "
                    "(0 first: the quiet reference)")
    ap.add_argument("--runs", type=int, default=100, help="single runs per key, direct method")
    ap.add_argument("--paired-keys", type=int, default=15, help="keys timed with the paired method under load "
                    "(every key when quiet)")
    ap.add_argument("--paired-budget-s", type=float, default=15.0, help="cap on one paired key's timing")
    ap.add_argument("--nets", type=int, default=10, help="uniform genotypes measured quiet")
    ap.add_argument("--passes", type=int, default=3, help="interleaved measuring passes over the nets")
    ap.add_argument("--out", type=Path, default=RESULTS / "busy_host.json")
    ap.add_argument("--add-capped", action="store_true", help="time nothing else: add to --out's conditions every "
                    "key timed directly on 1 thread under the same number of competing processes")
    ap.add_argument("--reanalyse", type=Path, default=None, metavar="JSON", help="time nothing: recompute the "
                    "summary of a stored results file")
    args = ap.parse_args(argv)
    if args.reanalyse is not None:
        stored = json.loads(args.reanalyse.read_text())
        stored["summary"] = analyse(stored)
        args.reanalyse.write_text(json.dumps(stored, indent=2))
        plot(stored, args.reanalyse.with_suffix(".png"))
        print(json.dumps(stored["summary"], indent=1)[:4000])
        return
    if args.add_capped:
        add_capped(args)
        return
    if args.hogs[0] != 0:
        ap.error("--hogs must start with 0 (the quiet reference)")
    keys = cell_shapes(LAYOUT, SIZE).all_keys()
    device = torch.device("cpu")
    cases = {k.canonical: prepare_key(k, device) for k in keys}
    # the paired subset under load: spread from cheap to dear by the quiet direct median
    data: dict = {"size": list(SIZE), "keys": len(keys), "runs": args.runs, "conditions": {}}
    paired_all = {k.canonical for k in keys}
    paired_sub: set[str] = set()
    for hogs in args.hogs:
        procs = start_hogs(hogs)
        try:
            if hogs:
                time.sleep(5.0)  # let the hogs import torch and reach their loop
            t0 = time.perf_counter()
            cond = time_condition(keys, cases, paired_all if hogs == 0 else paired_sub, args, f"{hogs} competing")
            cond["wall_s"] = time.perf_counter() - t0
        finally:
            for p in procs:
                p.kill()
                p.wait()
        data["conditions"][str(hogs)] = cond
        if hogs == 0:
            order = sorted(cond["rows"], key=lambda k: statistics.median(cond["rows"][k]["runs_us"]))
            step = max(1, math.ceil(len(order) / args.paired_keys))
            paired_sub = set(order[::step])
            data["nets"] = measure_nets(nets(args.nets), args.passes)
        data["summary"] = analyse(data)
        write_result("busy_host", data, args.out)  # after every condition: a cut run keeps what it has
    plot(data, args.out.with_suffix(".png"))
    print(json.dumps(data["summary"], indent=1)[:6000])


if __name__ == "__main__":
    main()
