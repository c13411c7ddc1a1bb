"""Does the lookup table predict real latency? Against live services on loopback:

1. services on this host, one timing keys in isolation (``GAS_TIMING_CONTEXT=false``), one per
   ``--flush`` timing them after a context of other kernels (the default), each profiling every
   key of the layout at the input size;
2. ``--eval`` random genotypes (seeded, spanning cheap to expensive) plus one searched genotype,
   and a separate ``--calib`` set of random genotypes (other seeds), each timed end to end by
   ``POST /measure`` on the context service;
3. per network: the plain table sums (isolated, context) and a calibrated prediction — an
   :class:`gas_core.latency.OverheadModel` fitted on the calibration set only, never on the
   evaluated nets.

With ``--flush`` given more than once, one context table per flush size is profiled (each by its
own service) and every table predicts the same measurements: the experiment that asks how large
the cache flush between two timed runs must be on this host (``l2`` = twice the per-core L2,
``llc`` = the last cache level; see docs/timing.md).

Prints and writes median and max |predicted − measured| / measured, the share of networks within
±10 % (nn-Meter's headline figure) and Kendall τ, each against every network's fastest pass and
(``vs_median_pass``) its median pass, and a scatter plot (predicted vs measured with y = x, each
network at its median pass with a bar over its passes). Usage: ``python -m
bench.prediction_accuracy [--input-size 256 512] [--eval 20] [--calib 12] [--device cuda:0]
[--flush l2 --flush llc] [--runtime onnxruntime]``.

Which part misses: every prediction is split into what α chooses (the candidate ops on the
edges, the only part the search's latency term sees) and the network's fixed components (stem,
preprocesses, node sums, concats, head, classifier, resize, graph entry), and
``results.choice_fit`` fits measured = a + b · chosen over all nets: b is how the table prices
the choices the search makes (1 = right), a is what the fixed components cost in the networks,
beside what the table charges for them. An ``all-skip`` network (``skip_connect`` on every
edge, reported apart as ``results.all_skip``) measures the fixed components directly. Neither
figure steers the search: its loss is β · log of the chosen part alone, so a factor common to
every op cancels in its gradient and the fixed part is not in it. They say where a predicted
FPS goes wrong; only a misprice that differs between ops moves the search. ``--reanalyse
JSON`` recomputes the split and the fit in a stored results file without timing anything.

``--runtime R`` profiles R's tables (each component exported or compiled at its shape, as its
own graph or, where it can, as one more copy of itself inside a graph) and measures every
network under R (the whole network as one graph): where R fuses across key boundaries (a ReLU
into the conv before it, BN into a conv), the per-key sum misses by what the fusion saves, and
this is where that shows. Each row carries its genotype and the prediction split by how its keys
were timed. Results go to ``bench/results/runtimes/prediction_accuracy_R.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from gas_core.genotype import Genotype, derive, random_genotype  # noqa: E402
from gas_core.keys import RUNTIMES, LatencyKey, Runtime  # noqa: E402
from gas_core.latency import (  # noqa: E402
    LatencyTerm,
    OverheadModel,
    constant_output,
    derived_keys,
    own_cost_us,
    predict_latency_us,
)
from gas_core.ops import OPS  # noqa: E402
from gas_core.runtimes import in_graph  # noqa: E402
from gas_core.search_space import NetworkLayout, NetworkShapes, cell_shapes  # noqa: E402
from gas_core.table import kendall_tau  # noqa: E402
from latency_service.profiler import cpu_caches, default_flush_bytes  # noqa: E402
from latency_service.testing import QUICK_TIMING, Server, start_server, stop_server, wait_job  # noqa: E402
from search_client.data import build_datasets  # noqa: E402
from search_client.runtime import ComputeConfig  # noqa: E402
from search_client.search import SearchConfig, search  # noqa: E402

# op mixtures from cheap (none / pool / skip) to expensive (convs); order of gas_core.ops.PRIMITIVES
CHEAP = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.05, 0.05, 0.05, 0.05])
DEAR = torch.tensor([0.0, 0.0, 0.02, 1.0, 1.0, 1.0, 1.0, 1.0])
LAYOUT = NetworkLayout(num_classes=4)
"""The layout every run times (the synthetic dataset's classes, so the searched net fits) and a
reanalysis rebuilds its keys from."""
SLOW_TIMING = {"GAS_SAMPLES": "30", "GAS_WARMUP_RUNS": "10", "GAS_WARMUP_MS": "50", "GAS_MIN_SAMPLE_MS": "1",
               "GAS_E2E_SAMPLES": "60", "GAS_E2E_WARMUP_RUNS": "10", "GAS_CPU_THREADS": "0"}


def spanning(layout: NetworkLayout, n: int, seed0: int, shapes, table: dict[str, float], pool: int = 400) -> list[Genotype]:
    """``n`` genotypes evenly spread from cheap to expensive: draw ``pool`` candidates with op
    mixtures from cheap to dear, then take the ones whose *table* prediction is nearest to ``n``
    evenly spaced values between the cheapest and the dearest (no measurement is used to
    choose), so neighbours differ by more than the measurement noise. A candidate whose output
    does not depend on its input (:func:`gas_core.latency.constant_output`: its last cell fed by
    no live edge) is not a segmentation network and is never drawn; ONNX Runtime runs one as a
    single copy of a constant."""
    cands = []
    for i in range(pool):
        t = i / (pool - 1)
        g = random_genotype(layout, torch.Generator().manual_seed(seed0 + i), CHEAP * (1 - t) + DEAR * t)
        if not constant_output(g, shapes):
            cands.append((predict_latency_us(g, shapes, table), g))
    lo, hi = min(c[0] for c in cands), max(c[0] for c in cands)
    picked: list[Genotype] = []
    for j in range(n):
        target = lo + (hi - lo) * j / max(1, n - 1)
        best = min((c for c in cands if c[1] not in picked), key=lambda c: abs(c[0] - target))
        picked.append(best[1])
    return picked


def all_skip(layout: NetworkLayout) -> Genotype:
    """The network of ``layout`` with ``skip_connect`` on every edge: an identity at stride 1, a
    factorized reduce at stride 2. Almost all of its time is the fixed components (stem,
    preprocesses, node sums, concats, head, classifier, resize), so measured against its
    prediction it says directly whether the table charges them right (:func:`probe_fixed`)."""
    alpha = torch.zeros(layout.alpha_shape)
    alpha[..., OPS.names().index("skip_connect")] = 1.0
    return derive(alpha, layout)


def summary(pred: list[float], meas: list[float]) -> dict:
    err = [abs(p - m) / m * 100 for p, m in zip(pred, meas, strict=True)]
    signed = [(p - m) / m * 100 for p, m in zip(pred, meas, strict=True)]
    return {"median_abs_err_pct": statistics.median(err), "max_abs_err_pct": max(err),
            "within_10_pct": sum(e <= 10 for e in err) / len(err),
            "mean_signed_err_pct": statistics.fmean(signed), "kendall_tau": kendall_tau(pred, meas)}


def profile_table(layout: NetworkLayout, size: tuple[int, int], tmp: Path, name: str, extra: dict, dtype: str,
                  runtime: str = "eager") -> tuple[Server, dict, dict[str, float], dict]:
    """A service profiling one table: (the service, still up; its /device; key → median µs; the
    job's record: keys timed, flagged, re-timed, its span and the reference workload through it)."""
    srv = start_server(f"sqlite:///{tmp}/table-{name}.db", tmp, {**QUICK_TIMING, **SLOW_TIMING, **extra})
    if srv.client().get("/device").json()["device"]["kind"] != ("cuda" if extra["GAS_DEVICE"].startswith("cuda")
                                                               else "cpu"):
        raise RuntimeError(f"the service did not take GAS_DEVICE={extra['GAS_DEVICE']}")
    with srv.client() as c:
        body = {"layout": layout.model_dump(mode="json"), "input_size": list(size), "dtypes": [dtype],
                "runtimes": [runtime]}
        r = c.post("/profile", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"POST /profile: {r.status_code} {r.json().get('message')}")
        with tqdm(desc=f"profiling the {name} table", unit="key") as bar:
            def progress(job: dict) -> None:
                bar.total, bar.n = job["total"], job["done"]
                bar.refresh()

            job = wait_job(c, r.json()["id"], timeout=3 * 3600, poll_s=0.5, on_poll=progress)
        host = c.get("/device").json()
        table = c.get(f"/table/{host['device']['slug']}", params={
            "environment": host["environment"]["fingerprint"], "dtype": dtype, "runtime": runtime}).json()
    record = {k: job.get(k) for k in ("done", "flagged", "retimed", "started_at", "finished_at", "host_noise")}
    return srv, host, {e["key"]: e["median_us"] for e in table["entries"]}, record


def quick_search(layout: NetworkLayout, size: tuple[int, int], table: dict[str, float], out: Path,
                 device: str, runtime: Runtime = "eager") -> Genotype:
    """A short real search on the synthetic data against this table (β = 0.005)."""
    term = LatencyTerm.from_table(cell_shapes(layout, size, runtime=runtime), table)
    train, val = build_datasets("synthetic", None, size, 0, (32, 8))
    cfg = SearchConfig(epochs=3, warmup_epochs=1, batch=8, max_steps=4, beta=0.005, seed=0)
    return search(cfg, layout, train, val, term, out, progress=False, compute=ComputeConfig(device=device)).genotype


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, nargs=2, default=(256, 512))
    ap.add_argument("--eval", type=int, default=20)
    ap.add_argument("--calib", type=int, default=12)
    ap.add_argument("--passes", type=int, default=5,
                    help="measurement passes over all nets; each net is compared at its fastest and at its median pass")
    ap.add_argument("--device", default="cpu", help="device the services time on (GAS_DEVICE): cpu or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--flush", action="append", choices=["l2", "llc"],
                    help="cache level the context table's flush is sized from (repeat to compare; the first "
                    "one's table is calibrated and searched against); default l2, the service's default")
    ap.add_argument("--runtime", default="eager", choices=list(RUNTIMES),
                    help="time the tables' components and the whole networks under this runtime")
    ap.add_argument("--out", type=Path, default=None, help="results JSON; default bench/results/prediction_accuracy"
                    ".json, or bench/results/runtimes/prediction_accuracy_RUNTIME.json under --runtime")
    ap.add_argument("--plot", type=Path, default=None, help="default: the JSON's path with .png")
    ap.add_argument("--reanalyse", type=Path, default=None, metavar="JSON",
                    help="time nothing: recompute the split of every net's prediction by what decides it and its "
                    "fit (results.choice_fit) in this results file from its rows and tables, and write it back")
    args = ap.parse_args()
    args.name = "prediction_accuracy" + ("" if args.runtime == "eager" else f"_{args.runtime}")
    args.out = args.out or (RESULTS if args.runtime == "eager" else RESULTS / "runtimes") / f"{args.name}.json"
    args.plot = args.plot or args.out.with_suffix(".png")
    args.flush = list(dict.fromkeys(args.flush or ["l2"]))
    args.size = tuple(args.input_size)
    return args


def profile_tables(args: argparse.Namespace, layout: NetworkLayout, tmp: Path,
                   flush: dict[str, int]) -> tuple[Server, dict, dict[str, dict[str, float]], str, dict[str, dict]]:
    """The isolated table, then one context table per flush size, each by its own service; the
    service of the first flush size stays up (returned) to measure the networks."""
    dev = {"GAS_DEVICE": args.device}

    def context(level: str) -> dict[str, str]:
        return {"GAS_TIMING_CONTEXT": "true", "GAS_TIMING_FLUSH_BYTES": str(flush[level]), **dev}

    tables: dict[str, dict[str, float]] = {}
    jobs: dict[str, dict] = {}
    srv, _, tables["isolated"], jobs["isolated"] = profile_table(
        layout, args.size, tmp, "isolated", {"GAS_TIMING_CONTEXT": "false", **dev}, args.dtype, args.runtime)
    for level in args.flush[1:]:  # extra flush sizes first: the service of the first one measures the nets
        stop_server(srv)
        srv, _, tables[f"context_{level}"], jobs[f"context_{level}"] = profile_table(
            layout, args.size, tmp, level, context(level), args.dtype, args.runtime)
    stop_server(srv)
    primary = f"context_{args.flush[0]}"
    srv, host, tables[primary], jobs[primary] = profile_table(
        layout, args.size, tmp, args.flush[0], context(args.flush[0]), args.dtype, args.runtime)
    return srv, host, tables, primary, jobs


def key_costs(g: Genotype, shapes: NetworkShapes, table: dict[str, float]) -> list[tuple[LatencyKey, float]]:
    """Each key ``g``'s derived network runs, with what the table charges for it (µs)."""
    return [(k, own_cost_us(k, table, shapes.call)) for k in derived_keys(g, shapes)]


def by_timing(g: Genotype, shapes: NetworkShapes, table: dict[str, float]) -> dict[str, float]:
    """The table's prediction of ``g`` split by how its keys were timed: inside a graph (in-graph
    keys), as their own graph (less the entry), and the graph entry itself; µs."""
    costs = key_costs(g, shapes, table)
    return {"in_graph_us": math.fsum(c for k, c in costs if in_graph(k)),
            "own_graph_us": math.fsum(c for k, c in costs if not in_graph(k) and k != shapes.call),
            "entry_us": math.fsum(c for k, c in costs if k == shapes.call)}


def by_choice(g: Genotype, shapes: NetworkShapes, table: dict[str, float]) -> dict[str, float]:
    """The table's prediction of ``g`` split by what decides it, µs: the candidate ops on its
    edges (``chosen_us``: what α chooses, the only part the search's latency term sees) and the
    network's fixed components (``components_us``: stem, preprocesses, node sums, concats, head,
    classifier, resize, the graph entry; they vary with the genotype only through dead code and
    a node's arity)."""
    costs = key_costs(g, shapes, table)
    return {"chosen_us": math.fsum(c for k, c in costs if k.op in OPS),
            "components_us": math.fsum(c for k, c in costs if k.op not in OPS)}


def choice_fit(rows: list[dict]) -> dict:
    """Which part of the prediction misses: measured = a + b · ``chosen_us`` by least squares over
    every net (evaluated and calibration; a diagnostic that reads the measurements, never a
    prediction), against each net's median pass and its fastest pass. b is how the table prices
    what the search chooses (1: right); a is what the fixed components cost in the networks,
    against what the table charges for them (their median over the nets). Both say where a
    predicted FPS goes wrong, neither whether the search is steered wrong: its loss, β · log of
    the chosen part, is blind to a common factor and to the fixed part."""
    x = [r["chosen_us"] for r in rows]
    charged = statistics.median(r["components_us"] for r in rows)
    out: dict[str, Any] = {"nets": len(rows), "table_components_us": charged,
                           "chosen_us_range": [min(x), max(x)]}
    for name, field in (("median_pass", "measured_median_us"), ("fastest_pass", "measured_us")):
        fit = stats.linregress(x, [r[field] for r in rows])
        out[name] = {"slope": fit.slope, "slope_se": fit.stderr, "intercept_us": fit.intercept,
                     "intercept_se_us": fit.intercept_stderr, "r": fit.rvalue,
                     "components_excess_pct": (charged / fit.intercept - 1) * 100 if fit.intercept > 0 else None}
    return out


def probe_fixed(row: dict, fit: dict) -> dict:
    """The all-skip network (:func:`all_skip`) measured against its prediction, split as
    :func:`by_choice` splits it, beside the fixed components' cost that :func:`choice_fit`
    extrapolated from the other networks (median pass)."""
    pred = row["chosen_us"] + row["components_us"]
    out = {"measured_median_us": row["measured_median_us"], "measured_fastest_us": row["measured_us"],
           "predicted_us": pred, "chosen_us": row["chosen_us"], "components_us": row["components_us"],
           "err_vs_median_pass_pct": (pred / row["measured_median_us"] - 1) * 100,
           "err_vs_fastest_pass_pct": (pred / row["measured_us"] - 1) * 100,
           "fit_intercept_us": fit["median_pass"]["intercept_us"]}
    print(f"all-skip network: measured {row['measured_median_us']:.0f} µs (median pass; fastest "
          f"{row['measured_us']:.0f}), predicted {pred:.0f} µs ({out['err_vs_median_pass_pct']:+.1f} %): fixed "
          f"components {row['components_us']:.0f} µs, skips {row['chosen_us']:.0f} µs; the fit put the fixed "
          f"components at {out['fit_intercept_us']:.0f} µs")
    return out


def print_choice_fit(fit: dict) -> None:
    for name in ("median_pass", "fastest_pass"):
        f = fit[name]
        excess = "n/a" if f["components_excess_pct"] is None else f"{f['components_excess_pct']:+.0f} %"
        print(f"against the {name.replace('_', ' ')} ({fit['nets']} nets): what α chooses priced at slope "
              f"{f['slope']:.3f} ± {f['slope_se']:.3f}; the fixed components cost {f['intercept_us']:.0f} ± "
              f"{f['intercept_se_us']:.0f} µs in the networks, the table charges {fit['table_components_us']:.0f} "
              f"µs ({excess})")


def measure_nets(args: argparse.Namespace, srv: Server, nets: dict[str, list[Genotype]], shapes: NetworkShapes,
                 tables: dict[str, dict[str, float]], searched: Genotype) -> dict[str, list[dict]]:
    """Every net measured in ``--passes`` separate passes over all nets. A net has two figures:
    its fastest pass (interference from the rest of the host only ever adds time) and its median
    pass. Each table key's median was taken within a fraction of a second, at whatever speed the
    host had then, so a sum of ~100 keys lands somewhere in the host's range; on a host whose
    speed wanders between passes the fastest pass sits below the typical speed by up to the
    spread. Both are reported (:func:`evaluate`; docs/timing.md, "Known pitfalls"); the spread
    between passes is the measurement's own noise."""
    passes: dict[str, list[list[float]]] = {s: [[] for _ in g] for s, g in nets.items()}
    drift: dict[str, list[list[float | None]]] = {s: [[] for _ in g] for s, g in nets.items()}
    bar = tqdm(total=args.passes * sum(len(g) for g in nets.values()), desc=f"measuring under {args.runtime}",
               unit="net")
    with srv.client(timeout=600) as c, bar:
        for _ in range(args.passes):
            for split, genos in nets.items():
                for i, g in enumerate(genos):
                    bar.update()
                    m = c.post("/measure", json={"genotype": json.loads(g.to_json()), "input_size": list(args.size),
                                                 "dtype": args.dtype, "runtime": args.runtime})
                    if m.status_code != 200:
                        tail = [ln for ln in srv.log.read_text().splitlines() if "Warning" not in ln][-40:]
                        raise RuntimeError(f"POST /measure of {split}-{i}: {m.status_code} {m.text[:2000]}\n"
                                           "service log:\n" + "\n".join(tail))
                    passes[split][i].append(m.json()["median_ms"] * 1e3)
                    drift[split][i].append((m.json().get("agreement") or {}).get("host_drift_pct"))
    rows: dict[str, list[dict]] = {split: [] for split in nets}
    for split, genos in nets.items():
        for i, g in enumerate(genos):
            ms = passes[split][i]
            name = "searched" if g is searched else "all-skip" if split == "probe" else f"{split}-{i}"
            r: dict[str, Any] = {"net": name, "measured_us": min(ms),
                 "measured_median_us": statistics.median(ms), "pass_medians_us": ms,
                 "pass_spread_pct": (max(ms) - min(ms)) / min(ms) * 100, "pass_host_drift_pct": drift[split][i],
                 **{f"{t}_sum_us": predict_latency_us(g, shapes, tab) for t, tab in tables.items()},
                 "calls": len(derived_keys(g, shapes)), **by_timing(g, shapes, tables[f"context_{args.flush[0]}"]),
                 **by_choice(g, shapes, tables[f"context_{args.flush[0]}"]),
                 "genotype": json.loads(g.to_json())}
            rows[split].append(r)
            sums = "  ".join(f"{t} {r[f'{t}_sum_us'] / 1e3:7.3f}" for t in tables)
            print(f"{r['net']:>10}: measured {r['measured_us'] / 1e3:7.3f} ms fastest pass, "
                  f"{r['measured_median_us'] / 1e3:7.3f} median pass (spread "
                  f"{r['pass_spread_pct']:4.1f} %)  {sums}  calls {r['calls']}")
    return rows


def evaluate(rows: dict[str, list[dict]], kinds: list[str], primary: str) -> tuple[dict, OverheadModel]:
    """Each table's sums and the calibrated prediction against the evaluated nets' fastest pass
    (the figure of earlier runs) and, under ``vs_median_pass``, against their median pass; the
    overhead model is fitted on the calibration nets' fastest pass only."""
    cal, ev = rows["calib"], rows["eval"]
    model = OverheadModel.fit([r[f"{primary}_sum_us"] for r in cal], [r["measured_us"] for r in cal])
    for r in ev:
        r["calibrated_us"] = model.predict_us(r[f"{primary}_sum_us"])
    meas = [r["measured_us"] for r in ev]
    results = {k: summary([r[f"{k}_us"] for r in ev], meas) for k in kinds}
    for k, s in results.items():
        print(f"{k:>18}: median |err| {s['median_abs_err_pct']:5.2f} %  max {s['max_abs_err_pct']:5.2f} %  "
              f"within ±10 % {s['within_10_pct'] * 100:3.0f} %  mean signed {s['mean_signed_err_pct']:+6.2f} %  "
              f"Kendall τ {s['kendall_tau']:.3f}")
    typical = [r["measured_median_us"] for r in ev]
    results["vs_median_pass"] = {k: summary([r[f"{k}_us"] for r in ev], typical) for k in kinds}
    for k, s in results["vs_median_pass"].items():
        print(f"{k:>18} against each net's median pass: median |err| {s['median_abs_err_pct']:5.2f} %  max "
              f"{s['max_abs_err_pct']:5.2f} %  within ±10 % {s['within_10_pct'] * 100:3.0f} %  mean signed "
              f"{s['mean_signed_err_pct']:+6.2f} %  Kendall τ {s['kendall_tau']:.3f}")
    spread = [r["pass_spread_pct"] for r in ev]
    print(f"measurement noise: spread between passes median {statistics.median(spread):.2f} %, max {max(spread):.2f} %")
    results["measurement_pass_spread_pct"] = {"median": statistics.median(spread), "max": max(spread)}
    print(f"overhead model (fitted on {model.fitted_on} other nets): scale {model.scale:.4f}, "
          f"calibration residual {model.residual_pct:.2f} %")
    results["choice_fit"] = choice_fit(ev + cal)
    print_choice_fit(results["choice_fit"])
    for r in rows.get("probe", []):
        results["all_skip"] = probe_fixed(r, results["choice_fit"])
    return results, model


def plot(path: Path, ev: list[dict], kinds: list[str], results: dict, title: str) -> None:
    """Predicted against measured latency of the evaluated nets, one marker per prediction kind:
    each at the net's median pass, with a bar from its fastest to its slowest pass (the host's
    noise, which the fastest-pass figures sit at the left end of)."""
    meas = [r["measured_median_us"] for r in ev]
    lo_err = [(r["measured_median_us"] - min(r["pass_medians_us"])) / 1e3 for r in ev]
    hi_err = [(max(r["pass_medians_us"]) - r["measured_median_us"]) / 1e3 for r in ev]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    lo, hi = min(meas) * 0.6 / 1e3, max(max(r["pass_medians_us"]) for r in ev) * 1.1 / 1e3
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="y = x")
    for k, mk in zip(kinds, "xo^Ds", strict=False):
        typical, fastest = results["vs_median_pass"][k]["median_abs_err_pct"], results[k]["median_abs_err_pct"]
        ax.errorbar([m / 1e3 for m in meas], [r[f"{k}_us"] / 1e3 for r in ev], xerr=[lo_err, hi_err], fmt=mk,
                    ms=4, elinewidth=0.6, capsize=0,
                    label=f"{k} (median |err| {typical:.1f} % vs median pass, {fastest:.1f} % vs fastest)")
    ax.set(xlabel="measured latency (ms): median pass, bar = fastest…slowest pass", ylabel="predicted latency (ms)",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def reanalyse(path: Path) -> None:
    """Recompute ``by_choice`` for every row of a results file from its genotype and primary
    table, and ``results.choice_fit`` (and ``results.all_skip`` where the file has the probe)
    from them; everything else in the file stays as timed."""
    doc = json.loads(path.read_text())
    cfg = doc["config"]
    if "runtime" not in cfg or any("genotype" not in r for r in doc["eval"] + doc["calib"]):
        raise SystemExit(f"{path}: its rows carry no genotype (written before 12-01), so their predictions "
                         "cannot be split; re-run the benchmark instead")
    layout = LAYOUT
    shapes = cell_shapes(layout, tuple(cfg["input_size"]), cfg["batch"], cfg["dtype"], runtime=cfg["runtime"])
    table = doc["tables"][cfg["primary_table"]]
    for r in doc["eval"] + doc["calib"] + doc.get("probe", []):
        r.update(by_choice(Genotype.model_validate(r["genotype"]), shapes, table))
    doc["results"]["choice_fit"] = choice_fit(doc["eval"] + doc["calib"])
    print_choice_fit(doc["results"]["choice_fit"])
    for r in doc.get("probe", []):
        doc["results"]["all_skip"] = probe_fixed(r, doc["results"]["choice_fit"])
    path.write_text(json.dumps(doc, indent=2))
    print(f"rewrote {path}")


def main() -> None:
    args = parse_args()
    if args.reanalyse is not None:
        reanalyse(args.reanalyse)
        return
    flush = {level: default_flush_bytes(torch.device(args.device), level) for level in args.flush}
    layout = LAYOUT
    shapes = cell_shapes(layout, args.size, 1, args.dtype, runtime=args.runtime)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        srv, host, tables, primary, jobs = profile_tables(args, layout, tmp, flush)
        try:
            searched = quick_search(layout, args.size, tables[primary], tmp / "search", args.device, args.runtime)
            nets = {"eval": spanning(layout, args.eval, 0, shapes, tables[primary]) + [searched],
                    "calib": spanning(layout, args.calib, 100_000, shapes, tables[primary]),
                    "probe": [all_skip(layout)]}
            rows = measure_nets(args, srv, nets, shapes, tables, searched)
        finally:
            stop_server(srv)
    kinds = [*(f"{t}_sum" for t in tables), "calibrated"]
    results, model = evaluate(rows, kinds, primary)
    plot(args.plot, rows["eval"], kinds, results,
         f"{host['device']['slug']}, {args.size[0]}×{args.size[1]}, batch 1, {args.dtype}, {args.runtime}")
    write_result(args.name, {
        "config": {"input_size": args.size, "eval_nets": len(rows["eval"]), "calib_nets": len(rows["calib"]),
                   "batch": 1, "dtype": args.dtype, "runtime": args.runtime, "timing": SLOW_TIMING,
                   "passes": args.passes, "flush_bytes": flush, "primary_table": primary,
                   "cpu_caches": cpu_caches() if args.device == "cpu" else None},
        "device": host["device"], "environment": host["environment"], "table_jobs": jobs,
        "results": results,
        "overhead_model": model.model_dump(), "eval": rows["eval"], "calib": rows["calib"], "probe": rows["probe"],
        "tables": tables,  # key → median µs of every table: per-op comparisons across runtimes read them
    }, args.out)


if __name__ == "__main__":
    main()
