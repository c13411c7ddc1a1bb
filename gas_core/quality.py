"""How far to trust a timing: a verdict per table row, the host's own noise, and an uncertainty
on every prediction (docs/timing.md, "Trusting the figures").

A latency table is only as good as the host was quiet while it was timed. On a shared 2-core VM
one key was stored with p10 = 0 and a standard deviation as large as its median, and the demo
then printed a +1310 % error as if it were a finding. Three things guard against that:

* :func:`assess` gives every row a verdict computed from its own samples (the service re-times an
  unstable key a bounded number of times, then stores it *flagged*);
* :class:`HostNoise` records a fixed reference workload timed at the start of a job, between its
  keys and at its end: if the host itself slowed down, the keys timed meanwhile are flagged;
* :func:`predict_with_uncertainty` and :func:`agreement` put an interval on both sides of a
  predicted-vs-measured comparison and say, in words, whether the difference is within the noise.

Pure maths over samples and pydantic wire models: the service stores and serves them, the search
client prints them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Final, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, computed_field

from gas_core.genotype import Genotype
from gas_core.keys import NO_NUL
from gas_core.latency import derived_keys, own_cost_us
from gas_core.search_space import NetworkShapes

# 1.2533 = √(π/2): the median's standard error relative to the mean's for normal samples;
# 1.4826 turns a MAD into a standard deviation.
_MEDIAN_SE: Final = 1.2533 * 1.4826
COVERAGE: Final = 2.0
"""Half-width of every interval in standard errors (≈ 95 % for normal errors)."""


def median_se(samples: Sequence[float]) -> float:
    """Standard error of the median from the MAD, robust to the outliers a shared host produces:
    1.2533 · 1.4826 · MAD / √n. 0 for fewer than two samples."""
    n = len(samples)
    if n < 2:
        return 0.0
    med = statistics.median(samples)
    mad = statistics.median(abs(x - med) for x in samples)
    return _MEDIAN_SE * mad / math.sqrt(n)


def quantile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), ``samples`` non-empty."""
    xs = sorted(samples)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sample_stats(samples_us: Sequence[float]) -> dict[str, float | int]:
    """A row's statistics from its raw samples, as the service stores them. Location statistics
    are floored at 0: a paired (context) difference below zero means the op costs less than the
    timing resolution (an identity skip), and a negative table entry would reward an op in the
    latency term. The raw samples keep their sign. ``samples_us`` non-empty."""
    xs = list(samples_us)
    return {
        "median_us": max(0.0, statistics.median(xs)),
        "p10_us": max(0.0, quantile(xs, 0.1)),
        "p90_us": max(0.0, quantile(xs, 0.9)),
        "mean_us": max(0.0, statistics.fmean(xs)),
        "std_us": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n_samples": len(xs),
    }


class QualityPolicy(BaseModel):
    """When a row's samples are too unstable to store unflagged. Defaults from the 2-core VMs
    this was built on (docs/timing.md): a typical key's p10–p90 width there is about its median,
    the stored-but-useless ``stem_conv`` rows had p10 = 0 and a width of twice the median."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_spread: float = Field(default=1.5, gt=0, description="largest (p90 − p10) / median")
    max_nonpositive: float = Field(default=0.1, ge=0, le=1, description="largest share of samples ≤ 0 (paired "
                                   "differences where the op did not show above the context's noise)")
    resolution_us: float = Field(default=5.0, ge=0, description="below this median a row is at the timer's "
                                 "resolution (identity, skip): its spread is judged in µs against this, not in %")


class RowQuality(BaseModel):
    """A row's verdict and the figures it rests on."""

    model_config = ConfigDict(extra="forbid")
    spread: float = Field(description="(p90 − p10) / max(median, resolution)")
    nonpositive_share: float = Field(ge=0, le=1, description="share of samples ≤ 0")
    median_se_us: float = Field(ge=0, description="standard error of the median, µs (MAD-based)")
    attempts: int = Field(default=1, ge=1, description="times the key was timed before it was stored")
    flagged: bool
    reasons: list[Annotated[str, Field(max_length=1000), NO_NUL]] = Field(
        default_factory=list, max_length=16, description="why it is flagged, in words (at most 16 of 1,000 "
        "characters: a file's reasons are served on every read)")


def assess(samples_us: Sequence[float], policy: QualityPolicy = QualityPolicy(), attempts: int = 1,
           extra_reasons: Sequence[str] = ()) -> RowQuality:
    """The verdict on one row from its raw samples (µs per run, paired differences may be ≤ 0).
    ``extra_reasons`` flag it for causes outside its samples (the host drifted while it ran)."""
    if not samples_us:
        raise ValueError("assess: no samples")
    med = max(0.0, statistics.median(samples_us))
    floor = max(med, policy.resolution_us)
    spread = (quantile(samples_us, 0.9) - quantile(samples_us, 0.1)) / floor if floor > 0 else 0.0
    nonpos = sum(x <= 0 for x in samples_us) / len(samples_us)
    reasons = []
    if spread > policy.max_spread:
        reasons.append(f"p10–p90 spread {spread * 100:.0f} % of the median (limit {policy.max_spread * 100:.0f} %)")
    if med > policy.resolution_us and nonpos > policy.max_nonpositive:
        reasons.append(f"{nonpos * 100:.0f} % of samples ≤ 0 (limit {policy.max_nonpositive * 100:.0f} %)")
    reasons += list(extra_reasons)
    return RowQuality(spread=spread, nonpositive_share=nonpos, median_se_us=median_se(samples_us),
                      attempts=attempts, flagged=bool(reasons), reasons=reasons)


# ---------------------------------------------------------------- host noise


class ReferencePoint(BaseModel):
    """One timing of the reference workload, after ``done`` keys of the job: short bursts spread
    over about a second (:func:`latency_service.profiler.time_reference`), summarised by the
    bursts' medians. ``se_us`` is how far the point itself is from the host's speed at that time:
    on an idle 2-core Xeon VM one contiguous burst of the reference took 0.9 to 3.4 ms from one
    second to the next (``bench/reference_drift.py``), so one burst is one draw of that and says
    little about a trend."""

    done: int = Field(ge=0)
    at: datetime
    median_us: float = Field(ge=0, description="median of the bursts' medians")
    p10_us: float = Field(ge=0)
    p90_us: float = Field(ge=0)
    se_us: float | None = Field(default=None, ge=0, description="standard error of ``median_us`` from the "
                                "bursts' spread (MAD); None for a point stored before points had bursts, "
                                "which is judged by the threshold alone")

    @classmethod
    def from_bursts(cls, *, done: int, at: datetime, burst_medians_us: Sequence[float]) -> ReferencePoint:
        """A point from its bursts' medians (≥ 1): their median, p10, p90 and the median's SE."""
        b = list(burst_medians_us)
        return cls(done=done, at=at, median_us=statistics.median(b), p10_us=quantile(b, 0.1),
                   p90_us=quantile(b, 0.9), se_us=median_se(b))


class Shift(NamedTuple):
    """A reference point against a baseline: signed % (+ = the host got slower) and that move in
    units of the job's point-to-point wander (None where a point has no SE)."""

    pct: float
    z: float | None


class HostNoise(BaseModel):
    """The reference workload timed through a job: how much the host itself moved.

    A point has *moved* when it differs from the median of all the job's points by more than
    ``threshold_pct`` **and** by more than ``min_z`` times the job's wander: √2 × the median over
    the job's points of a point's relative SE (each from its own bursts). The service judges at
    the job's end and flags the keys timed just before each point that moved.

    * The wander: on a quiet GPU it is ~1 % and the threshold decides; on a shared VM whose
      reference moves ±12 % (median) between points seconds apart with nothing else running,
      only a move beyond that (a process that starts competing, a clock that drops) flags keys.
      It is pooled over the job's points because one point's 8 bursts estimate it roughly, and
      a competing process makes the point it slows noisy too.
    * The job's median, at its end: the job's first point is often the odd one (in two demo
      runs 2277 and 2730 µs, then 1145–1590 µs), and against it, or against the points before
      each point, the later points had "moved" and their keys were flagged. Against the median
      of the whole job, 0–8 % of hog-free simulated jobs were flagged where the points before
      each flagged 5–32 % (``bench/reference_drift.py``, docs/timing.md). A change that lasts
      half the job or more makes the other part the odd one: the flag then says the job ran at
      two speeds, not which was right.

    ``drift_pct`` and ``spread_pct`` describe; ``exceeded`` judges.
    (No ``extra="forbid"``: it is stored and read back with its computed fields.)"""

    reference: str = Field(description="canonical latency key of the reference workload")
    threshold_pct: float = Field(gt=0, description="drift beyond which the keys timed meanwhile are flagged")
    min_z: float = Field(default=6.0, ge=0, description="...and beyond this many times the job's point-to-point "
                         "wander (√2 × its points' median relative SE); 0 = the threshold alone")
    points: list[ReferencePoint] = Field(default_factory=list)
    checks: list[HostCheck] = Field(default_factory=list, description="the host judged busy or quiet at the job's "
                                    "start and at every later point (against the environment's quiet calibration, "
                                    "the load and the free cores), and what the job did")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def busy(self) -> bool:
        """Whether any check found the host busy."""
        return any(c.busy for c in self.checks)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def drift_pct(self) -> float | None:
        """Largest |move| of a point after the first against the median of the job's points, %."""
        moves = self.shifts()
        return max(abs(m.pct) for m in moves) if moves else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def spread_pct(self) -> float | None:
        """Median over the points of their (p90 − p10) / median, %."""
        rel = [(p.p90_us - p.p10_us) / p.median_us * 100 for p in self.points if p.median_us > 0]
        return statistics.median(rel) if rel else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exceeded(self) -> bool:
        """Whether a point after the first moved (keys were timed before it)."""
        return any(self.beyond(s) for s in self.shifts())

    def describe(self) -> str:
        """One phrase for a log line: the largest drift, whether it counted, and the spread."""
        if self.drift_pct is None:
            return "n/a"
        verdict = "beyond" if self.exceeded else "within"
        return f"{self.drift_pct:.1f} %, {verdict} the host's wander (spread {self.spread_pct or 0:.0f} %)"

    def shifts(self) -> list[Shift]:
        """Each point after the first against the median of all the job's points (the first has
        no keys before it). Empty below two points."""
        if len(self.points) < 2:
            return []
        base, wander = self._median(), _wander(self.points)
        return [s for p in self.points[1:] if (s := _shift(p.median_us, base, wander)) is not None]

    def shift_from_job(self, point: ReferencePoint) -> Shift | None:
        """``point`` (timed later, e.g. before a ``/measure``) against the whole job: the median of
        its points, with the wander over its points and this one."""
        if not self.points:
            return None
        return _shift(point.median_us, self._median(), _wander([*self.points, point]))

    def _median(self) -> float:
        """The job's speed: the median of its points' medians (≥ 1 point)."""
        return statistics.median(p.median_us for p in self.points)

    def beyond(self, shift: Shift) -> bool:
        """Beyond the threshold and (where every point has an SE) beyond ``min_z`` wanders."""
        return abs(shift.pct) > self.threshold_pct and (shift.z is None or abs(shift.z) > self.min_z)


def _wander(points: Sequence[ReferencePoint]) -> float | None:
    """One point-to-point difference's relative SE: √2 × the median of the points' se / median.
    None when a point has no SE (stored before points had bursts)."""
    rel = [p.se_us / p.median_us for p in points if p.se_us is not None and p.median_us > 0]
    if not rel or len(rel) < len(points):
        return None
    return math.sqrt(2) * statistics.median(rel)


def _shift(median_us: float, base_us: float, wander: float | None) -> Shift | None:
    if base_us <= 0:
        return None
    rel = median_us / base_us - 1
    z = None if wander is None else (rel / wander if wander > 0 else math.copysign(math.inf, rel) if rel else 0.0)
    return Shift(pct=rel * 100, z=z)


# ---------------------------------------------------------------- predictions with uncertainty


class RowStat(NamedTuple):
    median_us: float
    se_us: float
    flagged: bool


class Prediction(BaseModel):
    """A table's prediction of a network with the uncertainty its rows carry."""

    predicted_us: float
    se_us: float = Field(description="standard error of the sum: each distinct key's median SE times its count, "
                         "added in quadrature (keys timed separately, their sampling errors independent)")
    flagged_keys: list[str] = Field(default_factory=list, description="flagged rows the network uses")


def predict_with_uncertainty(genotype: Genotype, shapes: NetworkShapes, rows: Mapping[str, RowStat]) -> Prediction:
    """:func:`gas_core.latency.predict_latency_us` and its standard error. A key the network
    runs k times contributes k·se (the same row, so the same error); under a one-graph runtime
    the ``graph_call`` row is subtracted from every other key, so its error enters once per key
    less the one the network pays. Raises ``KeyError`` for a key the table lacks; callers check
    with the plain prediction first."""
    keys = derived_keys(genotype, shapes)
    counts: dict[str, int] = {}
    for k in keys:
        counts[k.canonical] = counts.get(k.canonical, 0) + 1
    medians = {k: r.median_us for k, r in rows.items()}
    total = math.fsum(own_cost_us(k, medians, shapes.call) for k in keys)
    weights = {k: float(n) for k, n in counts.items()}
    if shapes.call is not None:
        weights[shapes.call.canonical] = 1.0 - (len(keys) - 1)
    se = math.sqrt(math.fsum((rows[k].se_us * n) ** 2 for k, n in weights.items()))
    return Prediction(predicted_us=total, se_us=se, flagged_keys=sorted(k for k in counts if rows[k].flagged))


class Agreement(BaseModel):
    """Predicted against measured, each ± ``COVERAGE`` standard errors, and what to make of it."""

    predicted_ms: float
    predicted_pm_ms: float = Field(description="half-width of the prediction's interval")
    measured_ms: float
    measured_pm_ms: float = Field(description="half-width of the measured median's interval")
    error_pct: float = Field(description="(predicted − measured) / measured × 100")
    noise_pct: float = Field(description="the error the noise alone could explain, ± %")
    within_noise: bool
    flagged_keys: int = Field(ge=0)
    host_drift_pct: float | None = Field(default=None, description="the reference workload now against while the "
                                         "table was timed, % (+ = slower now)")
    host_vs_quiet_pct: float | None = Field(default=None, description="the reference workload now against the "
                                            "host's quiet calibration, % (+ = slower now)")
    warnings: list[str] = Field(default_factory=list, description="plain-words reasons to distrust the figures")


def agreement(pred: Prediction, measured_us: float, measured_se_us: float, *, measured_spread: float | None = None,
              host_drift_pct: float | None = None, host_drift_beyond: bool = False,
              host: HostCheck | None = None) -> Agreement:
    """Is the prediction's error within the noise of both sides? ``measured_spread`` is the
    measurement's (p90 − p10) / median, ``host_drift_pct`` the reference now against while the
    table was timed and ``host_drift_beyond`` whether that is beyond the threshold and the host's
    wander (:meth:`HostNoise.beyond`), ``host`` the host check right before the measurement
    (against its quiet calibration and the other processes' load). Every reason to distrust the
    figures becomes one plain sentence."""
    err = (pred.predicted_us - measured_us) / measured_us * 100
    pm_p, pm_m = COVERAGE * pred.se_us, COVERAGE * measured_se_us
    noise = math.hypot(pm_p, pm_m) / measured_us * 100
    within = abs(err) <= noise
    warnings = []
    if pred.flagged_keys:
        warnings.append(f"the table holds {len(pred.flagged_keys)} flagged row(s) this network uses: they were "
                        "unstable when timed, so the prediction is unreliable; re-profile them on a quiet host "
                        "(POST /profile with force=true)")
    if host_drift_pct is not None and host_drift_beyond:
        warnings.append(f"this host runs the reference workload {abs(host_drift_pct):.0f} % "
                        f"{'slower' if host_drift_pct > 0 else 'faster'} now than while the table was timed: "
                        "the host changed (load, frequency), so table and measurement are not comparable")
    if host is not None and host.busy:
        warnings.append(f"the host is busy now ({'; '.join(host.reasons)}): the measurement includes other "
                        "processes' interference; measure again on a quiet host")
    if measured_spread is not None and measured_spread > 0.5:
        warnings.append(f"the measurement itself was noisy (p10–p90 spread {measured_spread * 100:.0f} % of its "
                        "median): another process was probably competing for this host")
    if not within:
        warnings.append(f"the error of {err:+.1f} % is larger than the timing noise explains (±{noise:.1f} %): "
                        "either the host changed between profiling and measuring, or the table's method does not "
                        "match how this network runs here (docs/timing.md)")
    return Agreement(predicted_ms=pred.predicted_us / 1e3, predicted_pm_ms=pm_p / 1e3, measured_ms=measured_us / 1e3,
                     measured_pm_ms=pm_m / 1e3, error_pct=err, noise_pct=noise, within_noise=within,
                     flagged_keys=len(pred.flagged_keys), host_drift_pct=host_drift_pct,
                     host_vs_quiet_pct=None if host is None else host.vs_quiet_pct, warnings=warnings)


# ---------------------------------------------------------------- a busy host


class HostLoad(BaseModel):
    """What the operating system says about the rest of the host, sampled while this process
    sleeps: the cores other processes kept busy (steal included) and the load average. (No
    ``extra="forbid"``: it is stored and read back with its computed field.)"""

    cpus: int = Field(ge=1, description="CPUs this process may run on")
    others_busy: float = Field(ge=0, description="cores' worth of CPU time other processes (and the hypervisor's "
                               "steal) used over the sample")
    load1: float = Field(ge=0, description="1-minute load average")
    sample_s: float = Field(ge=0, description="how long the sample lasted")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def free_cores(self) -> float:
        return max(0.0, self.cpus - self.others_busy)


class BusyPolicy(BaseModel):
    """When the host is too busy to time on (settings ``GAS_BUSY_*``). Defaults from a 2-core
    EPYC VM (docs/timing.md, "A busy host"): quiet, the reference workload's median sat at
    either about 1.1 or 2.3 ms from one minute to the next, so only a move beyond 2.5× counts;
    two competing processes put it at 11.4 ms (p90 72 ms); one competing 2-thread process left it
    at 1.1 ms but took both cores, which only the load shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    slow_pct: float = Field(default=150.0, gt=0, description="reference median this far above its quiet calibration")
    tail_factor: float = Field(default=6.0, gt=1, description="reference p90 this many times its quiet calibration")
    spare_cores: float = Field(default=0.5, ge=0, description="busy when others leave fewer than (threads − this) "
                               "cores free")


class Calibration(BaseModel):
    """The host's quiet speed, kept per environment: the reference workload's medians at the last
    points timed while no other process competed (newest last, at most :data:`CALIBRATION_POINTS`).
    A busy verdict compares a job's reference with this, not only with the job's own points,
    which a job that starts busy never sees quiet."""

    schema_version: Literal[1] = 1
    reference: str = Field(description="canonical latency key of the reference workload")
    points_us: list[float] = Field(min_length=1, max_length=64)
    updated_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def median_us(self) -> float:
        return statistics.median(self.points_us)

    def add(self, us: float, at: datetime) -> Calibration:
        return self.model_copy(update={"points_us": [*self.points_us, us][-CALIBRATION_POINTS:], "updated_at": at})


CALIBRATION_POINTS: Final = 9


class HostCheck(BaseModel):
    """One look at the host before (and during) a job or a measurement: the figures and the
    verdict, so a user sees why a job went on, waited or stopped."""

    at: datetime
    done: int = Field(ge=0, description="keys of the job done when it was taken")
    reference_us: float = Field(ge=0, description="median of the reference workload's bursts")
    reference_p90_us: float = Field(ge=0)
    quiet_us: float | None = Field(default=None, description="the environment's quiet calibration, if any")
    vs_quiet_pct: float | None = Field(default=None, description="reference against the quiet calibration, %")
    load: HostLoad | None = None
    threads: int = Field(ge=1, description="threads the timing uses")
    busy: bool
    reasons: list[str] = Field(default_factory=list)
    action: str = Field(description="what followed: go (quiet), robust, wait, stop")

    def describe(self) -> str:
        """One line with the figures that decided it."""
        ref = f"reference {self.reference_us / 1e3:.2f} ms (p90 {self.reference_p90_us / 1e3:.2f})"
        if self.quiet_us is not None and self.vs_quiet_pct is not None:
            ref += f", {self.vs_quiet_pct:+.0f} % against its quiet {self.quiet_us / 1e3:.2f} ms"
        else:
            ref += ", no quiet calibration yet"
        load = "" if self.load is None else (f"; load average {self.load.load1:.1f}, other processes busy on "
                                             f"{self.load.others_busy:.1f} of {self.load.cpus} cores")
        head = "host busy" if self.busy else "host quiet"
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return f"{head}: {ref}{load}{why}"


def judge_host(point: ReferencePoint, load: HostLoad | None, quiet: Calibration | None, threads: int,
               policy: BusyPolicy = BusyPolicy(), *, done: int = 0, action_if_busy: str = "robust") -> HostCheck:
    """Is the host busy now? Busy when the reference is ``slow_pct`` over its quiet calibration,
    when its p90 is ``tail_factor`` times it (a median can look normal while one burst in five
    is interrupted), or when other processes leave fewer cores free than the timing's threads
    need. Without a calibration only the cores decide."""
    reasons: list[str] = []
    vs = None
    if quiet is not None and quiet.median_us > 0:
        vs = (point.median_us / quiet.median_us - 1) * 100
        if vs > policy.slow_pct:
            reasons.append(f"reference {vs:+.0f} % over its quiet calibration (limit +{policy.slow_pct:.0f} %)")
        tail = point.p90_us / quiet.median_us
        if tail > policy.tail_factor:
            reasons.append(f"reference p90 {tail:.1f}× its quiet median (limit {policy.tail_factor:g}×): other work "
                           "interrupts it")
    if load is not None and load.free_cores < threads - policy.spare_cores:
        reasons.append(f"{load.free_cores:.1f} free cores for {threads} timing threads")
    busy = bool(reasons)
    return HostCheck(at=point.at, done=done, reference_us=point.median_us, reference_p90_us=point.p90_us,
                     quiet_us=None if quiet is None else quiet.median_us, vs_quiet_pct=vs, load=load,
                     threads=threads, busy=busy, reasons=reasons, action=action_if_busy if busy else "go")


def interrupted(samples_us: Sequence[float], factor: float = 3.0, resolution_us: float = 5.0) -> str | None:
    """A reason to flag a row of direct single-run samples whose median is ``factor`` times its
    fastest run: most runs were interrupted, so its median is the host's contention, not the op
    (on a busy 2-core VM stored rows reached hundreds of times their quiet value). None when not,
    when a sample is ≤ 0 (paired differences: their minimum is not a run), or when the median is
    below ``resolution_us`` (an identity's runs are the timer's own jitter)."""
    if not samples_us or min(samples_us) <= 0 or statistics.median(samples_us) < resolution_us:
        return None
    ratio = statistics.median(samples_us) / min(samples_us)
    if ratio < factor:
        return None
    return f"median {ratio:.1f}× its fastest run (limit {factor:g}×): most runs were interrupted by other work"


HostNoise.model_rebuild()  # its checks name HostCheck, defined after it
