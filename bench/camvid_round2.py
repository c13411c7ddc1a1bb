"""The CamVid study's second-round report sections, from the finished runs: the interleaved
measurement (table against measured), Table 3 on measured-latency-and-size partners (paired), the
latency-target groups and the front they draw, and the trained networks scored both ways.

Called by :func:`bench.camvid_report.write_report`; every section says so when its runs are not
finished yet instead of showing a figure.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats  # noqa: E402

MEASURE_RUN = "measure-r2"


def floor_of(timing: dict) -> float:
    """A timing's floor (fastest round), also for runs stored before the field existed."""
    return float(timing.get("floor_ms") or min(timing["rounds_ms"]))


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def measurement_lines(runs: dict[str, dict]) -> list[str]:
    """Every network of the measuring sitting: measured median [95 % interval], both tables."""
    m = runs.get(MEASURE_RUN)
    if m is None:
        return ["Not run yet."]
    params = m["params"]
    lines = [f"{m['rounds']} interleaved rounds of `POST /measure` over {len(m['networks'])} networks in one "
             f"sitting ({m['measure_wall_s'] / 60:.0f} min, after re-profiling the study's keys into a fresh "
             f"database in {m['profile_wall_s'] / 60:.1f} min). Host: {m['machine']['cpu']}, {m['machine']['when']}.",
             "", "| table against measured | Kendall τ, all networks | median ratio table / measured, all | "
             "τ, uniform probe | ratio, probe |", "|---|---|---|---|---|"]
    for label, what in (("pinned", "the study's table (table-r2, searched on)"),
                        ("sitting", "re-profiled in the same sitting")):
        for stat, how in (("", "median of rounds"), ("_floor", "floor (fastest round)")):
            lines.append(f"| {what}, {how} | {_f(m.get(f'tau_{label}_all{stat}'), '.2f')} | "
                         f"{_f(m.get(f'ratio_{label}_all{stat}'), '.2f')} | {_f(m.get(f'tau_{label}_probe{stat}'), '.2f')} | "
                         f"{_f(m.get(f'ratio_{label}_probe{stat}'), '.2f')} |")
    halves = m.get("split_half", {})
    lines += ["", "How each statistic reproduces itself within the sitting (even rounds against odd rounds): "
              + "; ".join(f"{k}: Kendall τ {_f(v['tau'], '.2f')}, median difference {v['median_diff_pct']:.1f} %"
                          for k, v in halves.items()) + ".",
              "", "| network | floor ms | median ms [95 % interval] | ± % | table-r2 ms | sitting table ms | params |",
              "|---|---|---|---|---|---|---|"]
    for n in sorted(m["networks"], key=floor_of):
        lo, hi = n["ci95_ms"]
        half = 50 * (hi - lo) / n["median_ms"]
        lines.append(f"| {n['name']} | {floor_of(n):.2f} | {n['median_ms']:.2f} [{lo:.2f}, {hi:.2f}] | {half:.1f} | "
                     f"{_f(n['predicted_ms'], '.2f')} | {_f(m['sitting_table_ms'].get(n['name']), '.2f')} | "
                     f"{params[n['name']]:,} |")
    return lines


def input_eval(runs: dict[str, dict], train_run: str) -> tuple[dict, str]:
    """A trained net's val scores with labels at the input size, as round 1 reported them: its own
    ``eval`` unless that was scored at native resolution (gas-eval's default since round 2), then
    its ``evalboth-`` run's; a mark when only the native one exists yet."""
    ev = runs[train_run]["eval"]
    if ev.get("label_resolution", "input") == "input":
        return ev, ""
    both = runs.get(f"evalboth-{train_run}")
    return (both["input"], "") if both else (ev, " (native labels)")


def _miou(runs: dict[str, dict], train_run: str) -> float | None:
    """Val mIoU with labels at the input size (round 1's convention); None until trained, or
    while only the native-resolution score exists."""
    if train_run not in runs:
        return None
    ev, mark = input_eval(runs, train_run)
    return None if mark else ev["miou"]


def paired_lines(runs: dict[str, dict], prefix: str = "search-gas-") -> tuple[list[str], list[dict]]:
    """Each searched network beside its partner: mIoU, measured latency in the partner's sitting,
    parameters; the paired difference with a 95 % t-interval, Welch's test, and the same over the
    pairs whose parameter counts lie within ±5 %."""
    pairs = []
    for name, p in runs.items():
        source = p.get("source", "")
        if not name.startswith("partner-") or not source.startswith(prefix):
            continue
        a, b = _miou(runs, f"train-{source}"), _miou(runs, f"train-{name}")
        pairs.append({"searched": source, "partner": name, "miou_searched": a, "miou_partner": b,
                      "ms_searched": floor_of(p["source_measured"]), "ms_partner": floor_of(p["measured"]),
                      "params_searched": p["source_params"], "params_partner": p["params"], "draw": p["draw"],
                      "batches": p["batches"]})
    if not pairs:
        return ["No partner drawn yet."], []
    lines = ["| searched | val mIoU | floor ms | params | partner (draw) | val mIoU | floor ms | params | Δ mIoU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for q in pairs:
        d = None if q["miou_searched"] is None or q["miou_partner"] is None else q["miou_searched"] - q["miou_partner"]
        lines.append(f"| {q['searched']} | {_f(q['miou_searched'], '.4f')} | {q['ms_searched']:.2f} | "
                     f"{q['params_searched']:,} | {q['partner']} (#{q['draw']}) | {_f(q['miou_partner'], '.4f')} | "
                     f"{q['ms_partner']:.2f} | {q['params_partner']:,} | {_f(d, '+.4f')} |")
    done = [q for q in pairs if q["miou_searched"] is not None and q["miou_partner"] is not None]
    lines += ["", paired_verdict(done, "all pairs"),
              paired_verdict([q for q in done if abs(q["params_partner"] / q["params_searched"] - 1) <= 0.05],
                             "pairs within ±5 % parameters")]
    return lines, pairs


def paired_verdict(pairs: list[dict], what: str) -> str:
    """Mean paired difference with a 95 % t-interval, and Welch's test on the two groups."""
    if len(pairs) < 2:
        return f"{what}: {len(pairs)} trained pair(s), too few to compare."
    d = [q["miou_searched"] - q["miou_partner"] for q in pairs]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    half = float(stats.t.ppf(0.975, len(d) - 1)) * sd / len(d) ** 0.5
    welch = stats.ttest_ind([q["miou_searched"] for q in pairs], [q["miou_partner"] for q in pairs], equal_var=False)
    side = "excludes" if abs(mean) > half else "includes"
    return (f"{what} (n = {len(d)}): searched − partner = {mean:+.4f} mIoU, 95 % interval "
            f"[{mean - half:+.4f}, {mean + half:+.4f}] ({side} 0); Welch p = {float(welch.pvalue):.3f}.")


def network_points(runs: dict[str, dict]) -> list[dict[str, Any]]:
    """Every trained network with a measured latency: (group, name, measured ms, interval, mIoU)."""
    m = runs.get(MEASURE_RUN)
    timed = {n["name"]: n for n in m["networks"]} if m else {}
    for name, p in runs.items():  # networks the measuring sitting did not see: their partner sitting's figure
        if name.startswith("partner-"):
            timed.setdefault(p["source"], p["source_measured"])
            timed.setdefault(name, p["measured"])
    out = []
    for name, r in runs.items():
        if not name.startswith("train-") or r.get("kind") != "train":
            continue
        src = r["source"]
        t, miou = timed.get(src), _miou(runs, name)
        if t is None or miou is None:
            continue
        group = "GAS" if src.startswith("search-") else "random"
        out.append({"group": group, "name": src, "ms": floor_of(t), "ci": (floor_of(t), t["median_ms"]), "miou": miou})
    return out


def front(points: list[dict]) -> list[dict]:
    """The Pareto front: no other point is both faster and more accurate."""
    pts = sorted(points, key=lambda p: (p["ms"], -p["miou"]))
    best, out = -1.0, []
    for p in pts:
        if p["miou"] > best:
            out.append(p)
            best = p["miou"]
    return out


def plot_front(points: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, colour in (("GAS", "tab:blue"), ("random", "tab:orange")):
        pts = [p for p in points if p["group"] == group]
        if not pts:
            continue
        ax.errorbar([p["ms"] for p in pts], [p["miou"] for p in pts],
                    xerr=[[p["ms"] - p["ci"][0] for p in pts], [p["ci"][1] - p["ms"] for p in pts]], fmt="o",
                    color=colour, label=f"{group}: fastest round, bar to the median of rounds", capsize=2)
        f = front(pts)
        ax.step([p["ms"] for p in f], [p["miou"] for p in f], where="post", color=colour, alpha=0.6,
                label=f"{group} front")
    ax.set(xlabel="measured latency, ms (fastest of the interleaved rounds)", ylabel="val mIoU (labels at the input size)",
           title="CamVid 180×240: every trained network")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def target_lines(runs: dict[str, dict]) -> list[str]:
    """The target searches: T, where the derived network landed in the table and measured."""
    rows = [(n, r) for n, r in runs.items() if n.startswith("search-t") and r.get("kind") == "search"]
    if not rows:
        return ["No target search finished yet."]
    lines = ["| search | T (table) ms | argmax ms | derived ms (table) | swaps | floor ms | partner floor ms |",
             "|---|---|---|---|---|---|---|"]
    for n, r in sorted(rows):
        fit = r["fit"]
        p = runs.get("partner-" + n.removeprefix("search-"))
        lines.append(f"| {n} | {fit['target_ms']:.2f} | {fit['argmax_ms']:.2f} | {fit['fitted_ms']:.2f} | "
                     f"{len(fit['swaps'])} | {_f(floor_of(p['source_measured']) if p else None, '.2f')} | "
                     f"{_f(floor_of(p['measured']) if p else None, '.2f')} |")
    return lines


def eval_both_lines(runs: dict[str, dict]) -> list[str]:
    rows = [(n.removeprefix("evalboth-train-"), r) for n, r in sorted(runs.items()) if n.startswith("evalboth-")]
    if not rows:
        return ["Not run yet."]
    lines = ["| network | mIoU, labels at the input size | mIoU, native labels | pixel acc. (native) | class acc. (native) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['input']['miou']:.4f} | {r['native']['miou']:.4f} | {r['native']['pixel_accuracy']:.4f} | "
              f"{r['native']['mean_class_accuracy']:.4f} |" for n, r in rows]
    return lines


def round2_sections(runs: dict[str, dict], out: Path) -> list[str]:
    points = network_points(runs)
    if points:
        plot_front(points, out / "front.png")
    paired, _ = paired_lines(runs)
    return ["## Round 2: measured latency, interleaved", "", *measurement_lines(runs), "",
            "## Round 2: Table 3 on partners matched by measured latency (±3 %) and parameters (±10 %)", "",
            *paired, "", "## Round 2: GAS at latency targets", "", *target_lines(runs), "",
            *(["![measured latency against val mIoU](front.png)", ""] if points else []),
            "## Round 2: scored at the labels' native resolution", "", *eval_both_lines(runs), ""]
