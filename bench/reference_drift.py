"""Does the host-drift flag fire on a host that did not drift, and does it fire on one that did?

The service times a reference workload at a job's start, every ``GAS_REFERENCE_EVERY_S`` and at
its end, and flags the keys timed meanwhile when the reference moved (docs/timing.md, "Trusting
the figures"). On a shared 2-core VM the flag fired on 9 of 10 table jobs, because one
contiguous burst of the reference is one draw of a host that wanders ±20–60 % second to second.
This benchmark records that wander and judges three rules on it:

* ``before``: one contiguous burst (3 warm-up runs over 200 ms, then 10 samples) against the
  job's first point, the threshold alone: the service's rule before points had bursts;
* ``bursts``: the service's point now (:func:`latency_service.profiler.time_reference`, 8 bursts
  100 ms apart, summarised by the bursts' medians) against the median of the job's points
  (judged at its end), the threshold alone;
* ``bursts+z``: the same, beyond the threshold *and* ``--min-z`` times the job's wander
  (:class:`gas_core.quality.HostNoise`, the service's rule now).

Each point takes both timings, back to back. With ``--hog START END`` a competing process (one
torch thread multiplying matrices) runs in that window of seconds: a real change of the host.
Every run of ``--job-points`` consecutive points is judged as a job's points would be.
Reported: the share of hog-free runs with any point flagged (false alarms, per run and per
point) and, over runs that start before the hog and reach into it, the share flagged and the
share of points inside it that are flagged (detection; also over every pair of a hog-free first point before the hog and
a point inside it). Every point's raw bursts are kept in the JSON; ``--reanalyse JSON`` judges
a stored record again (other ``--min-z``, ``--threshold-pct``, ``--job-points``) without timing.

    python -m bench.reference_drift --seconds 90 --hog 30 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402
from gas_core.quality import HostNoise, ReferencePoint, quantile  # noqa: E402
from latency_service.profiler import REFERENCE_KEY, Method, prepare_key, time_case, time_reference  # noqa: E402

CONTIGUOUS = Method(warmup_runs=3, warmup_ms=200.0, samples=10, min_sample_ms=1.0)
"""The reference point before bursts (one contiguous burst)."""
HOG = "import time, torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


def record(seconds: float, hog: tuple[float, float] | None, pause_s: float) -> list[dict]:
    """Reference points for ``seconds``: each a contiguous burst and the service's bursts."""
    dev = torch.device("cpu")
    case = prepare_key(REFERENCE_KEY, dev)
    points: list[dict] = []
    proc: subprocess.Popen | None = None
    t0 = time.monotonic()
    bar = tqdm(total=int(seconds), unit="s", desc="reference points")
    try:
        while (t := time.monotonic() - t0) < seconds:
            if hog and proc is None and hog[0] <= t < hog[1]:
                proc = subprocess.Popen([sys.executable, "-c", HOG])
            if hog and proc is not None and t >= hog[1]:
                proc.kill()
                proc.wait()
                proc = None
            contiguous = time_case(REFERENCE_KEY, case, dev, CONTIGUOUS).samples_us
            bursts = [b.samples_us for b in time_reference(dev)]
            points.append({"t_s": round(t, 2), "hog": proc is not None, "contiguous_us": contiguous,
                           "bursts_us": bursts})
            bar.update(int(time.monotonic() - t0) - bar.n)
            time.sleep(pause_s)
    finally:
        bar.close()
        if proc is not None:
            proc.kill()
            proc.wait()
    return points


def as_points(raw: list[dict], kind: str) -> list[ReferencePoint]:
    """One rule's view of the points: a contiguous burst (no SE: the threshold alone) or bursts."""
    at = datetime.now(UTC)
    if kind == "contiguous":
        out = []
        for i, p in enumerate(raw):
            s = ReferencePoint.from_bursts(done=i, at=at, burst_medians_us=p["contiguous_us"])
            out.append(s.model_copy(update={"se_us": None}))
        return out
    return [ReferencePoint.from_bursts(done=i, at=at, burst_medians_us=[statistics.median(b) for b in p["bursts_us"]])
            for i, p in enumerate(raw)]


def as_job(points: list[ReferencePoint], threshold_pct: float, min_z: float | None) -> list[bool]:
    """Whether each point after the first is flagged, as the service judges a job's points at its
    end (:meth:`HostNoise.shifts`); ``min_z`` None: the rule before, each against the first point
    by the threshold alone."""
    if min_z is None:
        return [abs(p.median_us / points[0].median_us - 1) * 100 > threshold_pct for p in points[1:]]
    noise = HostNoise(reference="bench", threshold_pct=threshold_pct, min_z=min_z, points=points)
    return [noise.beyond(sh) for sh in noise.shifts()]


def judge(raw: list[dict], points: list[ReferencePoint], *, threshold_pct: float, min_z: float | None,
          job_points: int) -> dict:
    """Slide a job of ``job_points`` points over the record; count flags as the service would."""
    false_runs = false_points = quiet_runs = quiet_points = caught = hog_points = hog_runs = hog_runs_flagged = 0
    for i in range(len(points) - job_points + 1):
        if raw[i]["hog"]:
            continue
        flags = as_job(points[i:i + job_points], threshold_pct, min_z)
        hogged = [raw[j]["hog"] for j in range(i + 1, i + job_points)]
        if not any(hogged):
            quiet_runs += 1
            false_runs += any(flags)
        else:
            hog_runs += 1
            hog_runs_flagged += any(flags)
        quiet_points += sum(not h for h in hogged)
        false_points += sum(f and not h for f, h in zip(flags, hogged, strict=True))
        hog_points += sum(hogged)
        caught += sum(f and h for f, h in zip(flags, hogged, strict=True))
    # every hog-free point before the hog as a job's first point, every point inside it as its
    # last, and the points between as the job's
    pairs = [(i, j) for i in range(len(points)) for j in range(i + 1, len(points)) if not raw[i]["hog"] and raw[j]["hog"]]
    beyond = sum(as_job(points[i:j + 1], threshold_pct, min_z)[-1] for i, j in pairs)
    return {"caught_pairs": len(pairs), "caught_pairs_pct": 100 * beyond / len(pairs) if pairs else None,
            "quiet_runs": quiet_runs, "false_alarm_runs_pct": 100 * false_runs / quiet_runs if quiet_runs else None,
            "false_alarm_points_pct": 100 * false_points / quiet_points if quiet_points else None,
            "hog_points": hog_points, "caught_pct": 100 * caught / hog_points if hog_points else None,
            "hog_runs": hog_runs, "hog_runs_flagged_pct": 100 * hog_runs_flagged / hog_runs if hog_runs else None}


def describe(raw: list[dict], points: list[ReferencePoint], job_points: int) -> dict:
    """How far the reference moves by itself (hog-free pairs up to ``job_points`` − 1 apart) and
    with the competing process (every (before, during) pair), %, and a point's relative SE."""
    def pct(a: ReferencePoint, b: ReferencePoint) -> float:
        return abs(b.median_us / a.median_us - 1) * 100

    quiet = [pct(points[i], points[j]) for i in range(len(points)) for j in range(i + 1, min(i + job_points, len(points)))
             if not raw[i]["hog"] and not raw[j]["hog"]]
    hog = [pct(points[i], points[j]) for i in range(len(points)) for j in range(i + 1, len(points))
           if not raw[i]["hog"] and raw[j]["hog"]]
    rel = [p.se_us / p.median_us * 100 for p, r in zip(points, raw, strict=True) if p.se_us is not None and not r["hog"]]
    return {"quiet_move_pct": {"median": quantile(quiet, 0.5), "p95": quantile(quiet, 0.95), "max": max(quiet)},
            "hog_move_pct": {"median": quantile(hog, 0.5), "p5": quantile(hog, 0.05)} if hog else None,
            "point_rel_se_pct_median": statistics.median(rel) if rel else None}


def plot(raw: list[dict], rules: dict[str, list[ReferencePoint]], path: Path) -> None:
    """Each kind of point's median over time (log scale), the bursts' p10–p90, the hog shaded."""
    fig, ax = plt.subplots(figsize=(9, 4))
    t = [p["t_s"] for p in raw]
    for name, pts in rules.items():
        ax.plot(t, [p.median_us / 1e3 for p in pts], marker=".", label=f"{name}: point median")
    b = rules["bursts"]
    ax.fill_between(t, [p.p10_us / 1e3 for p in b], [p.p90_us / 1e3 for p in b], alpha=0.2, label="bursts p10–p90")
    hog_t = [p["t_s"] for p in raw if p["hog"]]
    if hog_t:
        ax.axvspan(min(hog_t), max(hog_t), color="red", alpha=0.08, label="competing process")
    ax.set_xlabel("s")
    ax.set_yscale("log")
    ax.set_ylabel("reference conv, ms (log)")
    ax.set_title("The host's reference workload, point by point")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0, help="how long to record (default 90)")
    ap.add_argument("--hog", type=float, nargs=2, metavar=("START", "END"), default=None,
                    help="run a competing process from START to END seconds (default: none)")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between points (default 0.2)")
    ap.add_argument("--threshold-pct", type=float, default=10.0, help="GAS_REFERENCE_DRIFT_PCT (default 10)")
    ap.add_argument("--min-z", type=float, default=6.0, help="GAS_REFERENCE_DRIFT_Z (default 6)")
    ap.add_argument("--job-points", type=int, default=4, help="points per simulated job (default 4: start, "
                    "two between, end)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=RESULTS / "reference_drift.json", help="results JSON (and a PNG "
                    "beside it)")
    ap.add_argument("--reanalyse", type=Path, default=None, metavar="JSON", help="judge the points stored in JSON "
                    "again, without timing, and write --out")
    a = ap.parse_args(argv)
    if a.job_points < 2:
        ap.error("--job-points must be at least 2")
    if a.reanalyse is not None:
        try:
            stored = json.loads(a.reanalyse.read_text())
            raw = stored["points"]
            recorded = {k: stored["args"][k] for k in ("seconds", "hog", "pause", "threads")}
        except (OSError, ValueError, KeyError, TypeError) as err:
            ap.error(f"--reanalyse {a.reanalyse}: not a reference_drift results file ({err})")
        a.seconds, a.hog, a.pause, a.threads = (recorded[k] for k in ("seconds", "hog", "pause", "threads"))
    else:
        torch.set_num_threads(a.threads)
        raw = record(a.seconds, tuple(a.hog) if a.hog else None, a.pause)
    bursts = as_points(raw, "bursts")
    rules: dict[str, tuple[list[ReferencePoint], float | None]] = {
        "before": (as_points(raw, "contiguous"), None), "bursts": (bursts, 0.0), "bursts+z": (bursts, a.min_z)}
    results = {name: judge(raw, pts, threshold_pct=a.threshold_pct, min_z=z, job_points=a.job_points)
               for name, (pts, z) in rules.items()}
    moves = describe(raw, bursts, a.job_points)
    q = moves["quiet_move_pct"]
    print(f"the reference by itself moved {q['median']:.0f} % (median; p95 {q['p95']:.0f} %, max {q['max']:.0f} %) "
          f"between points ≤ {a.job_points - 1} apart; a point's relative SE {moves['point_rel_se_pct_median']:.1f} %"
          + ("" if moves["hog_move_pct"] is None else
             f"; the competing process moved it {moves['hog_move_pct']['median']:.0f} % (median over pairs)"))
    for name, r in results.items():
        print(f"{name:11s} false alarms: {r['false_alarm_runs_pct']:.0f} % of {r['quiet_runs']} hog-free jobs, "
              f"{r['false_alarm_points_pct']:.0f} % of their points; caught: "
              + ("n/a" if r["caught_pct"] is None else f"{r['hog_runs_flagged_pct']:.0f} % of {r['hog_runs']} jobs it "
                 f"ran through, {r['caught_pct']:.0f} % of {r['hog_points']} hogged points, "
                 f"{r['caught_pairs_pct']:.0f} % of {r['caught_pairs']} (before, inside) pairs"))
    write_result("reference_drift", {"args": {k: v for k, v in vars(a).items() if k not in ("out", "reanalyse")},
                                     "results": results, "moves": moves, "points": raw}, a.out)
    plot(raw, {"one contiguous burst": rules["before"][0], "bursts": bursts}, a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
