"""A busy host (docs/timing.md, "A busy host"): the verdict at a job's start, the three policies,
the time budgets, the quiet calibration kept per environment, and the robust method's flags.

Everything is driven by an injected clock, load probe, reference and key timer: no test depends
on this host's real load or timing."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from gas_core.keys import LatencyKey
from gas_core.quality import BusyPolicy, Calibration, HostLoad, ReferencePoint, interrupted, judge_host
from latency_service import crud
from latency_service.api.convert import entry_public, job_public
from latency_service.device import host_load
from latency_service.jobs import Trust
from latency_service.models import Environment, Job, Measurement
from latency_service.profiler import Method, Timing, time_callable
from tests.support import worker_rig

NOW = datetime(2026, 12, 7, tzinfo=UTC)
STEADY = [100.0, 101.0, 99.0, 100.0, 102.0, 98.0, 100.0, 101.0, 99.0, 100.0]
QUIET_LOAD = HostLoad(cpus=2, others_busy=0.05, load1=0.2, sample_s=0.5)
BUSY_LOAD = HostLoad(cpus=2, others_busy=2.0, load1=4.1, sample_s=0.5)
KEYS = [LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8, w=8 * (i + 1), stride=1, batch=1) for i in range(4)]


def _point(median: float, p90: float | None = None) -> ReferencePoint:
    return ReferencePoint(done=0, at=NOW, median_us=median, p10_us=median * 0.95, p90_us=p90 or median * 1.05)


def _cal(us: float) -> Calibration:
    return Calibration(reference="ref", points_us=[us], updated_at=NOW)


# ---------------------------------------------------------------- the verdict (pure)


def test_judge_host_names_the_figure_that_showed_it() -> None:
    quiet = judge_host(_point(1000), QUIET_LOAD, _cal(950), threads=2)
    assert not quiet.busy and quiet.action == "go" and quiet.vs_quiet_pct == pytest.approx(5.26, abs=0.01)
    # the reference of a quiet 2-core VM sat at 1.1 or 2.3 ms: a doubling alone is not busy
    assert not judge_host(_point(2300), QUIET_LOAD, _cal(1100), threads=2).busy
    slow = judge_host(_point(2600), QUIET_LOAD, _cal(1000), threads=2)
    assert slow.busy and slow.reasons == ["reference +160 % over its quiet calibration (limit +150 %)"]
    # issue 35: the median looked normal while the p90 reached 45 ms
    tail = judge_host(_point(1100, p90=45_000), QUIET_LOAD, _cal(1000), threads=2)
    assert tail.busy and "p90 45.0× its quiet median" in tail.reasons[0]
    cores = judge_host(_point(1000), BUSY_LOAD, None, threads=2, action_if_busy="stop")
    assert cores.busy and cores.action == "stop" and cores.quiet_us is None
    assert cores.reasons == ["0.0 free cores for 2 timing threads"]
    line = cores.describe()
    assert line.startswith("host busy: reference 1.00 ms") and "load average 4.1" in line and "no quiet" in line
    # one thread on a GPU host needs one free core, not two
    assert not judge_host(_point(1000), HostLoad(cpus=2, others_busy=0.9, load1=1, sample_s=0.5), None, 1).busy
    assert judge_host(_point(1000), HostLoad(cpus=2, others_busy=0.9, load1=1, sample_s=0.5), None, 2,
                      BusyPolicy(spare_cores=0.5)).busy


def test_interrupted_flags_direct_rows_whose_median_is_far_above_their_fastest_run() -> None:
    assert interrupted(STEADY) is None
    contended = [50.0, 30_000.0, 28_000.0, 31_000.0, 60.0, 29_500.0]
    why = interrupted(contended)
    assert why is not None and why.startswith("median 575.0× its fastest run")
    assert interrupted([-5.0, 30_000.0, 28_000.0]) is None  # paired differences: the minimum is no run
    assert interrupted([0.4, 1.5, 1.6, 1.4, 1.5]) is None  # an identity: the timer's jitter, not contention


def test_host_load_counts_other_processes_and_steal_but_not_itself(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    cpus = sorted(__import__("os").sched_getaffinity(0))

    def write(busy: int, idle: int) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{c} {busy} 0 0 {idle} 0 0 0 {busy // 10} 0 0" for c in cpus]
        stat.write_text("\n".join(lines) + "\n")

    write(1000, 1000)
    load = host_load(sample_s=0.5, sleep=lambda s: write(1000 + 90, 1000 + 1), stat=stat)
    # per CPU: 99 busy (90 user + 9 steal) of 100 jiffies → ~0.99 of each core busy
    assert load.cpus == len(cpus) and load.others_busy == pytest.approx(0.99 * len(cpus), abs=0.05)
    assert load.free_cores == pytest.approx(0.01 * len(cpus), abs=0.05)
    unreadable = host_load(stat=tmp_path / "missing")
    assert unreadable.sample_s == 0.0 and unreadable.cpus == len(cpus)


# ---------------------------------------------------------------- the robust method (real, untimed)


def test_direct_timing_keeps_single_runs_and_a_budget_cuts_it_short() -> None:
    runs = itertools.count()

    def op() -> None:
        next(runs)

    t = time_callable(op, torch.device("cpu"), Method(samples=7, warmup_runs=1, warmup_ms=0, direct=True, block=3))
    assert len(t.samples_us) == 7 and all(x > 0 for x in t.samples_us) and t.timer == "perf_counter_ns+min3"
    assert not t.budget_spent
    cut = time_callable(op, torch.device("cpu"), Method(samples=1000, warmup_runs=1, warmup_ms=0, direct=True,
                                                        key_budget_s=0.0))
    assert len(cut.samples_us) == 3 and cut.budget_spent and cut.timer == "perf_counter_ns+direct"
    paired = time_callable(op, torch.device("cpu"), Method(samples=1000, warmup_runs=1, warmup_ms=0, min_sample_ms=0.01,
                                                           context=True, key_budget_s=0.0), context=lambda: None)
    assert len(paired.samples_us) == 3 and paired.budget_spent


# ---------------------------------------------------------------- the worker, with an injected clock


class Rig:
    """A worker over one job of :data:`KEYS` whose clock advances ``per_key_s`` per key timed."""

    def __init__(self, db_url: str, trust: Trust, loads: Iterator[HostLoad], refs: Iterator[float],
                 per_key_s: float = 1.0, timer: Callable[[LatencyKey, torch.device, Method], Timing] | None = None,
                 keys: list[LatencyKey] = KEYS) -> None:
        self.now = 0.0
        self.methods: list[Method] = []
        self.checks_when_first_key: int | None = None
        self.per_key_s = per_key_s

        def timed(key: LatencyKey, dev: torch.device, method: Method) -> Timing:
            if self.checks_when_first_key is None:
                self.rig.session.refresh(self.rig.job)
                self.checks_when_first_key = len((self.rig.job.host_noise or {}).get("checks", []))
            self.methods.append(method)
            self.now += self.per_key_s
            return timer(key, dev, method) if timer else Timing(list(STEADY), 1, "fake", 0)

        def reference(dev: torch.device) -> list[Timing]:
            m = next(refs)
            return [Timing([b] * 3, 1, "fake", 0) for b in (m * 0.98, m, m * 1.02)]

        self.rig = worker_rig(db_url, keys, trust=trust, timer=timed, reference=reference,
                              clock=lambda: self.now, load_probe=lambda: next(loads))

    def close(self) -> None:
        self.rig.session.close()
        self.rig.engine.dispose()

    def step(self) -> bool:
        return bool(self.rig.worker._job_step())

    def run(self, steps: int = 20) -> Job:
        for _ in range(steps):
            self.step()
            self.rig.session.refresh(self.rig.job)
            if self.rig.job.state not in ("queued", "running"):
                break
        return self.rig.job


def test_busy_host_robust_policy_says_so_before_the_first_key_and_flags_every_row(db_url: str) -> None:
    rig = Rig(db_url, Trust(on_busy="robust", busy_block=5, reference_every_s=1e9),
              loads=itertools.repeat(BUSY_LOAD), refs=itertools.repeat(1000.0))
    job = rig.run()
    assert job.state == "done" and job.done == 4 and job.flagged == 4
    assert rig.checks_when_first_key == 1  # the verdict was recorded before any key was timed
    assert all(m.direct and m.block == 5 for m in rig.methods)
    public = job_public(job, rig.rig.device_row.slug, rig.rig.environment_row.fingerprint)
    check = public.host_noise.checks[0]  # type: ignore[union-attr]
    assert check.busy and check.action == "robust" and check.done == 0 and check.load == BUSY_LOAD
    assert any("host was busy" in w and "GAS_BUSY_POLICY=robust" in w for w in public.warnings)
    for row in rig.rig.session.scalars(select(Measurement)):
        e = entry_public(row)
        assert e.flagged and e.quality is not None
        assert e.quality.reasons[0].startswith("timed on a busy host (0.0 free cores for 2 timing threads)")
        assert row.method["direct"] is True and row.method["block"] == 5
    # a busy host never becomes the quiet calibration
    assert crud.get_calibration(rig.rig.session, environment_id=rig.rig.environment_row.id) is None
    rig.close()


def test_busy_host_stop_policy_fails_the_job_at_once_with_the_figures(db_url: str) -> None:
    rig = Rig(db_url, Trust(on_busy="stop"), loads=itertools.repeat(BUSY_LOAD), refs=itertools.repeat(1000.0))
    job = rig.run()
    assert job.state == "failed" and job.done == 0 and rig.methods == []
    reason = job.errors[-1]
    assert reason.startswith("stopped: host busy: reference 1.00 ms") and "GAS_BUSY_POLICY=stop" in reason
    assert "load average 4.1, other processes busy on 2.0 of 2 cores" in reason
    rig.close()


def test_busy_host_wait_policy_rechecks_then_resumes_or_gives_up(db_url: str, tmp_path: Path) -> None:
    trust = Trust(on_busy="wait", busy_recheck_s=30, busy_wait_s=100, reference_every_s=1e9)
    loads = itertools.chain([BUSY_LOAD, BUSY_LOAD], itertools.repeat(QUIET_LOAD))
    rig = Rig(db_url, trust, loads=loads, refs=itertools.repeat(1000.0))
    assert rig.step() is False  # busy: nothing timed, the worker idles (measurements may still run)
    assert rig.step() is False and rig.methods == []  # not yet due for a re-check
    rig.rig.session.refresh(rig.rig.job)
    beat = rig.rig.job.heartbeat_at
    rig.now += 30
    assert rig.step() is False  # re-checked: still busy
    rig.rig.session.refresh(rig.rig.job)
    assert rig.rig.job.heartbeat_at > beat  # a waiting job stays its host's in a fleet
    rig.now += 30
    job = rig.run()  # quiet now: timing resumes with the normal method
    assert job.state == "done" and job.done == 4 and not any(m.direct for m in rig.methods)
    noise = job_public(job, "d", "e").host_noise
    assert noise is not None and [c.busy for c in noise.checks] == [True, True, False]
    rig.close()

    url = f"sqlite:///{tmp_path}/gave-up.db"
    rig = Rig(url, trust, loads=itertools.repeat(BUSY_LOAD), refs=itertools.repeat(1000.0))
    for _ in range(5):
        rig.step()
        rig.now += 30
    rig.rig.session.refresh(rig.rig.job)
    assert rig.rig.job.state == "failed" and rig.methods == []
    assert rig.rig.job.errors[-1].startswith("stopped: still busy after waiting 120 s (GAS_BUSY_WAIT_S)")
    rig.close()


def test_quiet_calibration_is_kept_per_environment_and_judges_a_later_job(db_url: str) -> None:
    rig = Rig(db_url, Trust(reference_every_s=1e9), loads=itertools.repeat(QUIET_LOAD),
              refs=iter([1000.0, 1010.0]))
    assert rig.run().state == "done"
    s, env_id = rig.rig.session, rig.rig.environment_row.id
    cal = crud.get_calibration(s, environment_id=env_id)
    assert cal is not None and cal.points_us == [1000.0] and cal.median_us == 1000.0
    raw = s.scalar(select(Environment.calibration).where(Environment.id == env_id))
    assert raw["schema_version"] == 1  # stored as the artefact, read back by a new process below
    rig.close()

    # a second worker (a restarted service) on the same database: the host's reference now runs
    # 3× its quiet speed while the load probe sees nothing (another VM on the same machine)
    later = Rig(db_url, Trust(on_busy="stop"), loads=itertools.repeat(QUIET_LOAD), refs=itertools.repeat(3000.0),
                keys=[k.model_copy(update={"c_in": 8}) for k in KEYS])
    job = later.run()
    assert job.state == "failed" and "+200 % over its quiet calibration" in job.errors[-1]
    assert crud.get_calibration(later.rig.session, environment_id=env_id).points_us == [1000.0]  # type: ignore[union-attr]
    later.close()


def test_a_keys_time_budget_bounds_its_retimes_and_flags_a_cut_row(db_url: str) -> None:
    unstable = [0.0, 0.0, 50.0, 100.0, 150.0, 200.0, 0.0, 100.0, 300.0, 5.0]

    def timer(key: LatencyKey, dev: torch.device, method: Method) -> Timing:
        return Timing(list(unstable), 1, "fake", 0, budget_spent=True)

    rig = Rig(db_url, Trust(retime_max=5, retime_pause_s=0, key_budget_s=10, reference_every_s=1e9),
              loads=itertools.repeat(QUIET_LOAD), refs=itertools.repeat(1000.0), per_key_s=6.0, timer=timer,
              keys=KEYS[:1])
    job = rig.run()
    assert job.state == "done" and len(rig.methods) == 2  # 6 s + 6 s passes the 10 s budget: no third try
    assert all(m.key_budget_s == 10 for m in rig.methods)
    row = entry_public(rig.rig.session.scalars(select(Measurement)).one())
    assert row.flagged and any("time budget of 10 s ran out after 10 samples" in r for r in row.quality.reasons)  # type: ignore[union-attr]
    rig.close()


def test_a_jobs_time_budget_stops_it_and_keeps_what_it_timed(db_url: str) -> None:
    rig = Rig(db_url, Trust(job_budget_s=250, reference_every_s=1e9), loads=itertools.repeat(QUIET_LOAD),
              refs=itertools.repeat(1000.0), per_key_s=100.0)
    job = rig.run()
    assert job.state == "failed" and job.done == 3 and len(rig.methods) == 3
    assert job.errors[-1] == ("stopped: over its time budget of 250 s after 3 of 4 keys (GAS_JOB_BUDGET_S); the keys "
                              "timed so far are stored")
    assert len(rig.rig.session.scalars(select(Measurement)).all()) == 3
    assert Trust(key_budget_s=10).job_budget(58) == pytest.approx(193.3, abs=0.1)
    assert Trust(key_budget_s=10).job_budget(3) == 120.0 and Trust().job_budget(58) is None
    rig.close()


def test_an_unstable_paired_key_is_retimed_directly_and_stored_clean(db_url: str) -> None:
    """Issue 35: skip_connect and node_sum were flagged on every quiet table, their paired
    differences straddling zero; re-timed directly they are single runs, never ≤ 0."""
    straddling = [3.0, -2.0, 8.0, -5.0, 4.0, 0.0, 6.0, -1.0, 2.0, 9.0]

    def timer(key: LatencyKey, dev: torch.device, method: Method) -> Timing:
        return Timing(list(STEADY) if method.direct else list(straddling), 1, "fake", 0)

    rig = Rig(db_url, Trust(retime_max=2, retime_pause_s=0, reference_every_s=1e9),
              loads=itertools.repeat(QUIET_LOAD), refs=itertools.repeat(1000.0), timer=timer, keys=KEYS[:1])
    rig.rig.worker.method = Method(context=True)
    job = rig.run()
    assert job.state == "done" and job.flagged == 0 and job.retimed == 1
    assert [m.direct for m in rig.methods] == [False, True]
    row = rig.rig.session.scalars(select(Measurement)).one()
    assert not row.flagged and row.method["direct"] is True and row.quality["attempts"] == 2
    rig.close()
