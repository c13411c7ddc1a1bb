"""Trust in the figures: row verdicts, re-timing, host-noise reference, prediction uncertainty.

Every behaviour here is driven by a deterministic noisy timer (injected into the device worker)
or by fixed tables; nothing depends on this host's real timing noise."""

from __future__ import annotations

import csv
import io
import itertools
import json
from array import array
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, text
from typer.testing import CliRunner

from gas_core.genotype import random_genotype
from gas_core.keys import LatencyKey
from gas_core.latency import derived_keys
from gas_core.quality import (
    HostNoise,
    Prediction,
    QualityPolicy,
    ReferencePoint,
    RowStat,
    agreement,
    assess,
    median_se,
    predict_with_uncertainty,
    sample_stats,
)
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.table import TABLE_KIND, LatencyTable
from latency_service import crud, db
from latency_service.api.convert import entry_public, job_public
from latency_service.jobs import Trust
from latency_service.models import Job, Measurement
from latency_service.profiler import Method, Timing
from latency_service.testing import Server
from search_client.report import Report, format_report
from search_client.table_cli import app as table_app
from tests.support import worker_rig

STABLE = [100.0, 101.0, 99.0, 100.0, 102.0, 98.0, 100.0, 101.0, 99.0, 100.0]
# the stored-but-useless stem_conv rows of issue 12: p10 = 0, std about the median
UNSTABLE = [0.0, 0.0, 50.0, 100.0, 150.0, 200.0, 0.0, 100.0, 300.0, 5.0]
TINY = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=16, num_classes=4)


def _timing(samples: list[float]) -> Timing:
    return Timing(samples_us=list(samples), iters_per_sample=1, timer="fake", timed_ns=0)


# ---------------------------------------------------------------- verdicts and uncertainty (pure)


def test_assess_flags_unstable_rows_and_spares_steady_and_tiny_ones() -> None:
    ok = assess(STABLE)
    assert not ok.flagged and ok.reasons == [] and ok.spread == pytest.approx(0.022, abs=0.01)
    bad = assess(UNSTABLE)
    assert bad.flagged and bad.nonpositive_share == pytest.approx(0.3)
    assert any("spread" in r for r in bad.reasons) and any("≤ 0" in r for r in bad.reasons)
    # paired differences of a real op, a third of them ≤ 0 but a narrow spread: flagged for the share
    third = [60.0, 62.0, 58.0, -1.0, 61.0, -2.0, 59.0, 60.0, -0.5, 60.0]
    q = assess(third, QualityPolicy(max_spread=100))
    assert q.flagged and q.reasons == ["30 % of samples ≤ 0 (limit 10 %)"]
    # an identity: ~0 µs ± the timer's resolution is not an unstable row
    assert not assess([0.4, -0.3, 0.9, 0.1, -0.8, 0.5, 0.0, 1.2, -0.2, 0.3]).flagged
    assert assess(STABLE, extra_reasons=["drift"]).flagged


def test_median_se_matches_its_definition() -> None:
    xs = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, MAD 1
    assert median_se(xs) == pytest.approx(1.2533 * 1.4826 * 1 / 5 ** 0.5)
    assert median_se([5.0]) == 0.0


def test_prediction_propagates_row_errors_with_multiplicity() -> None:
    shapes = cell_shapes(TINY, (32, 48))
    g = random_genotype(TINY, torch.Generator().manual_seed(0))
    keys = derived_keys(g, shapes)
    counts: dict[str, int] = {}
    for k in keys:
        counts[k.canonical] = counts.get(k.canonical, 0) + 1
    assert max(counts.values()) > 1  # the test needs a key the net runs more than once
    rows = {k.canonical: RowStat(10.0, 2.0, False) for k in shapes.all_keys()}
    flagged = keys[0].canonical
    rows[flagged] = RowStat(10.0, 2.0, True)
    p = predict_with_uncertainty(g, shapes, rows)
    assert p.predicted_us == pytest.approx(10.0 * len(keys))
    assert p.se_us == pytest.approx(sum((2.0 * n) ** 2 for n in counts.values()) ** 0.5)
    assert p.flagged_keys == [flagged]


def test_agreement_says_in_words_when_not_to_trust_an_error() -> None:
    quiet = agreement(Prediction(predicted_us=10_000, se_us=100), 10_300, 150)
    assert quiet.within_noise and quiet.warnings == [] and quiet.error_pct == pytest.approx(-2.91, abs=0.01)
    assert quiet.noise_pct == pytest.approx(2 * (100**2 + 150**2) ** 0.5 / 10_300 * 100)
    # issue 12's +1310 %: a table with flagged rows, a noisy host: never a bare finding
    wild = agreement(Prediction(predicted_us=141_000, se_us=30_000, flagged_keys=["a", "b", "c"]), 10_000, 100,
                     measured_spread=0.8, host_drift_pct=35.0, host_drift_beyond=True)
    assert not wild.within_noise and wild.flagged_keys == 3
    text_ = " ".join(wild.warnings)
    assert "3 flagged row(s)" in text_ and "35 % slower" in text_ and "measurement itself was noisy" in text_
    assert "larger than the timing noise explains" in text_
    report = Report(device="d", environment="e", input_size=(8, 8), batch=1, dtype="float32",
                    memory_format="contiguous", predicted_ms=141.0, measured_median_ms=10.0, measured_p90_ms=11.0,
                    fps=100.0, error_pct=wild.error_pct, search_lat_ms=1.0, val_miou=None, genotype="g.json",
                    agreement=wild)
    out = format_report(report)
    assert "141.000 ± 60.000 ms" in out and "beyond the timing noise" in out and out.count("WARNING:") == 4
    # the same 35 % within the host's own wander is reported, not warned about
    calm = agreement(Prediction(predicted_us=10_000, se_us=100), 10_300, 150, host_drift_pct=35.0)
    assert calm.host_drift_pct == 35.0 and calm.warnings == []


def test_host_noise_drift_and_spread() -> None:
    """Points stored without an SE are judged by the threshold alone (as before bursts), each
    after the first against the median of all the job's points."""
    now = datetime.now(UTC)
    n = HostNoise(reference="k", threshold_pct=10, points=[
        ReferencePoint(done=0, at=now, median_us=1000, p10_us=950, p90_us=1050),
        ReferencePoint(done=5, at=now, median_us=1080, p10_us=1000, p90_us=1200)])
    assert n.drift_pct == pytest.approx(1080 / 1040 * 100 - 100) and not n.exceeded
    assert n.spread_pct == pytest.approx(14.26, abs=0.01)
    n.points.append(ReferencePoint(done=9, at=now, median_us=1200, p10_us=1100, p90_us=1300))
    shifts = n.shifts()  # against the median, 1080
    assert [s.pct for s in shifts] == pytest.approx([0.0, 1200 / 1080 * 100 - 100]) and shifts[1].z is None
    assert n.beyond(shifts[1]) and n.exceeded
    assert HostNoise.model_validate(json.loads(n.model_dump_json())).drift_pct == pytest.approx(11.11, abs=0.01)


def _job(*bursts: list[float]) -> HostNoise:
    now = datetime.now(UTC)
    return HostNoise(reference="k", threshold_pct=10, points=[
        ReferencePoint.from_bursts(done=i, at=now, burst_medians_us=b) for i, b in enumerate(bursts)])


def test_a_move_within_the_hosts_wander_is_not_drift() -> None:
    """A point is summarised by its bursts: median, p10/p90 and the median's SE. On a job whose
    points' bursts wander ±30 %, a point 25 % off the job's median is within the wander (< 6×)
    and flags nothing; a point 200 % off (a process that started competing) is drift, even when
    it is itself noisy. On a steady host 12 % is far beyond its wander, and the threshold decides.
    A slow first point has no keys before it and does not make every later point a move."""
    wandering = [700.0, 1000.0, 1300.0, 900.0, 1100.0, 1000.0, 800.0, 1200.0]
    first = ReferencePoint.from_bursts(done=0, at=datetime.now(UTC), burst_medians_us=wandering)
    assert first.median_us == 1000.0 and first.p10_us == pytest.approx(770.0) and first.p90_us == pytest.approx(1230.0)
    assert first.se_us == pytest.approx(1.2533 * 1.4826 * 150.0 / 8**0.5)
    up = [x * 1.25 for x in wandering]
    n = _job(wandering, wandering, up)
    (_, shift) = n.shifts()
    assert shift.pct == pytest.approx(25.0) and shift.z is not None and 0 < shift.z < 6
    assert not n.exceeded and n.describe().startswith("25.0 %, within the host's wander")
    hog = _job(wandering, wandering, wandering, [x * 3 for x in wandering])
    assert hog.shifts()[-1].pct == pytest.approx(200.0) and hog.exceeded
    assert hog.describe().startswith("200.0 %, beyond the host's wander")
    # a competing process also makes the point itself noisy: judged by the job's wander, not by
    # that point's own SE, it is still caught
    noisy = [1000.0, 3000.0, 5000.0, 2000.0, 6000.0, 3500.0, 4000.0, 1500.0]
    wild = _job(wandering, wandering, wandering, noisy)
    assert wild.points[-1].se_us is not None and wild.points[-1].se_us / wild.points[-1].median_us > 0.3
    assert wild.exceeded
    # min_z = 0: the threshold alone, as before
    assert _job(wandering, wandering, up).model_copy(update={"min_z": 0}).exceeded
    steady = [1000.0, 1005.0, 995.0, 1002.0, 998.0, 1001.0, 999.0, 1003.0]
    assert _job(steady, steady, [x * 1.12 for x in steady]).exceeded
    # two demo jobs: a slow first point, then 1145–1590 µs: nothing moved (against the first
    # point, or the points before each, later points had "moved" by 30–50 %)
    now = datetime.now(UTC)
    for job in ([(2277, 263), (1344, 12), (1590, 53), (1500, 69), (1303, 117)],
                [(2730, 30), (1366, 98), (1272, 83), (1145, 25), (1228, 58)]):
        demo = HostNoise(reference="k", threshold_pct=10, points=[
            ReferencePoint(done=i, at=now, median_us=m, p10_us=m, p90_us=m, se_us=se) for i, (m, se) in enumerate(job)])
        assert not demo.exceeded
    # against the whole job (a /measure's point): the median of its points, the wander of all
    vs_job = hog.shift_from_job(ReferencePoint.from_bursts(done=0, at=now, burst_medians_us=up))
    assert vs_job is not None and vs_job.pct == pytest.approx(25.0) and not hog.beyond(vs_job)


# ---------------------------------------------------------------- the worker with a noisy timer


def test_worker_retimes_flags_and_reports(db_url: str) -> None:
    """key 0 is unstable on every attempt (stored flagged after 1 + retime_max timings); key 1 only
    on its first (re-timed once, stored clean); keys 2 and 3 are steady, but the host's reference
    point after them is +40 % off the job's median, so both are flagged for the drift at the end."""
    keys = [LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8, w=8 * (i + 1), stride=1, batch=1) for i in range(4)]
    attempts: dict[str, int] = {}

    def noisy(key: LatencyKey, dev: torch.device, method: Method) -> Timing:
        i = keys.index(key)
        attempts[key.canonical] = attempts.get(key.canonical, 0) + 1
        unstable = i == 0 or (i == 1 and attempts[key.canonical] == 1)
        return _timing(UNSTABLE if unstable else STABLE)

    ref_medians = iter([1000.0, 1000.0, 1400.0, 1000.0])

    def reference(dev: torch.device) -> list[Timing]:
        m = next(ref_medians)
        return [_timing([b, b, b]) for b in (m * 0.98, m, m * 1.02)]

    tick = itertools.count()
    rig = worker_rig(db_url, keys, trust=Trust(retime_max=2, retime_pause_s=0, reference_every_s=2,
                                               reference_drift_pct=10),
                     timer=noisy, reference=reference, clock=lambda: float(next(tick)))
    s, job, worker, dev, env, engine = rig.session, rig.job, rig.worker, rig.device_row, rig.environment_row, rig.engine
    with s:
        for _ in range(10):
            worker._job_step()
            s.refresh(job)
            if job.state not in ("queued", "running"):
                break
        assert job.state == "done" and job.done == 4
        assert attempts == {keys[0].canonical: 3, keys[1].canonical: 2, keys[2].canonical: 1, keys[3].canonical: 1}
        assert job.flagged == 3 and job.retimed == 2
        rows = {r.key: entry_public(r) for r in s.scalars(select(Measurement))}
        q = [rows[k.canonical].quality for k in keys]
        assert all(x is not None for x in q)
        assert rows[keys[0].canonical].flagged and q[0].attempts == 3 and "spread" in q[0].reasons[0]  # type: ignore[union-attr]
        assert not rows[keys[1].canonical].flagged and q[1].attempts == 2  # type: ignore[union-attr]
        for k in keys[2:]:
            assert rows[k.canonical].flagged
            assert rows[k.canonical].quality.reasons == [  # type: ignore[union-attr]
                "timed while the host's reference workload was +40 % off the job's median "
                "(threshold 10 %, 13.2× the job's wander)"]
        public = job_public(job, dev.slug, env.fingerprint)
        noise = public.host_noise
        assert noise is not None and [p.done for p in noise.points] == [0, 2, 4, 4]
        assert noise.drift_pct == pytest.approx(40.0) and noise.exceeded
        assert len(public.warnings) == 2 and "3 key(s) stored flagged" in public.warnings[0]
        assert crud.latest_host_noise(s, device_id=dev.id, environment_id=env.id) == noise
    engine.dispose()


def test_migration_gives_stored_rows_a_verdict(tmp_path: Path) -> None:
    """Rows written before revision 0003 get their verdict from their stored samples."""
    url = f"sqlite:///{tmp_path}/old.db"
    db.migrate(url, "0002")
    engine = db.make_engine(url)
    key = LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8, w=8, stride=1, batch=1)
    with engine.begin() as c:
        c.execute(text("INSERT INTO device (slug, kind, name, info, created_at) VALUES ('d', 'cpu', 'd', '{}', "
                       "'2026-01-01')"))
        c.execute(text("INSERT INTO environment (device_id, fingerprint, info, created_at) VALUES (1, 'f', '{}', "
                       "'2026-01-01')"))
        for i, samples in enumerate((STABLE, UNSTABLE)):
            k = key.model_copy(update={"w": 8 + i})
            c.execute(text(
                "INSERT INTO measurement (device_id, environment_id, key_hash, key, op, c_in, c_out, h, w, stride, "
                "n_inputs, batch, dtype, memory_format, runtime, median_us, p10_us, p90_us, mean_us, std_us, "
                "n_samples, iters_per_sample, timer, method, samples, created_at) VALUES (1, 1, :h, :k, 'conv_3x3', "
                "4, 4, 8, :w, 1, 1, 1, 'float32', 'contiguous', 'eager', 1, 1, 1, 1, 1, 10, 1, 't', '{}', :s, "
                "'2026-01-01')"), {"h": k.key_hash, "k": k.canonical, "w": k.w, "s": array("f", samples).tobytes()})
    engine.dispose()
    db.migrate(url)
    engine = db.make_engine(url)
    with db.session_factory(engine)() as s:
        rows = sorted(s.scalars(select(Measurement)), key=lambda r: r.w)
        assert [r.flagged for r in rows] == [False, True]
        assert rows[1].quality is not None and rows[1].quality["nonpositive_share"] == pytest.approx(0.3)
        assert s.scalar(select(Job).limit(1)) is None
    engine.dispose()


# ---------------------------------------------------------------- served, shown, exported, predicted


def _own_table(host: dict, unstable_op: str) -> dict:
    """Every key of TINY at 32×48 on the server's own device and environment, ``unstable_op``'s
    rows with issue 12's samples, the rest steady."""
    now = datetime.now(UTC).isoformat()
    entries = []
    for k in cell_shapes(TINY, (32, 48)).all_keys():
        samples = UNSTABLE if k.op == unstable_op else STABLE
        entries.append({  # statistics consistent with the samples: an import recomputes and checks them
            "key": k.canonical, "key_hash": k.key_hash, **k.model_dump(), **sample_stats(samples),
            "iters_per_sample": 1, "timer": "fixed", "created_at": now, "samples_us": samples,
        })
    return {"schema_version": 1, "kind": TABLE_KIND, "device": host["device"],
            "environment": {"fingerprint": host["environment"]["fingerprint"], "info": host["environment"]["info"]},
            "entries": entries}


def test_flags_are_served_shown_exported_and_warned_about(server: Server, tmp_path: Path) -> None:
    with server.client(timeout=120) as c:
        host = c.get("/device").json()
        r = c.post("/table/import", json=_own_table(host, "stem_conv"))
        assert r.status_code == 200, r.text
        slug, env = host["device"]["slug"], host["environment"]["fingerprint"]
        table = LatencyTable.model_validate(c.get(f"/table/{slug}", params={"environment": env}).json())
        flagged = [e for e in table.entries if e.flagged]
        assert flagged and all(e.op == "stem_conv" for e in flagged)
        assert all(e.quality is not None and e.quality.reasons for e in flagged)
        csv_rows = list(csv.DictReader(io.StringIO(c.get(f"/table/{slug}", params={"environment": env,
                                                                                       "format": "csv"}).text)))
        assert sorted(r["key"] for r in csv_rows if r["flagged"] == "True") == sorted(e.key for e in flagged)
        g = random_genotype(TINY, torch.Generator().manual_seed(1))
        m = c.post("/measure", json={"genotype": json.loads(g.to_json()), "input_size": [32, 48]})
        assert m.status_code == 200, m.text
        agree = m.json()["agreement"]
        assert agree["flagged_keys"] == len(flagged)  # the stem runs in every network
        assert any("flagged row(s)" in w for w in agree["warnings"])
        assert agree["predicted_pm_ms"] > 0 and agree["measured_pm_ms"] >= 0
    out = CliRunner().invoke(table_app, ["show", f"{slug}@{env}", "--latency-url", server.url])
    assert out.exit_code == 0, out.output
    assert f"{len(flagged)} of {len(table.entries)} rows flagged" in out.output and "⚑" in out.output


# ---------------------------------------------------------------- the method adapts to the host


def test_flush_is_sized_from_the_caches_the_host_reports(tmp_path: Path) -> None:
    from latency_service.profiler import cpu_caches

    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K"),
                                             (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert cpu_caches(tmp_path) == {1: 32 * 2**10, 2: 512 * 2**10, 3: 32 * 2**20}
    assert cpu_caches(tmp_path / "absent") == {}


@pytest.mark.slow
def test_cpu_affinity_is_applied_and_part_of_the_environment(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from latency_service.testing import stop_server
    from tests.support import start_server

    cpu = min(os.sched_getaffinity(0))
    srv = start_server(f"sqlite:///{tmp_path / 'a.db'}", tmp_path, {"GAS_CPU_AFFINITY": str(cpu)})
    try:
        with srv.client() as c:
            pinned = c.get("/device").json()["environment"]
    finally:
        stop_server(srv)
    srv = start_server(f"sqlite:///{tmp_path / 'a.db'}", tmp_path)
    try:
        with srv.client() as c:
            free = c.get("/device").json()["environment"]
    finally:
        stop_server(srv)
    assert pinned["info"]["cpu_affinity"] == str(cpu) and "cpu_affinity" not in free["info"]
    assert pinned["fingerprint"] != free["fingerprint"]
    bad = subprocess.run([sys.executable, "-m", "latency_service.cli", "serve"], capture_output=True, text=True,
                         env={**os.environ, "GAS_CPU_AFFINITY": "4000", "GAS_DATABASE_URL": f"sqlite:///{tmp_path}/b.db"},
                         timeout=120)
    assert bad.returncode == 2 and "GAS_CPU_AFFINITY=4000" in bad.stderr and "Traceback" not in bad.stderr


def test_timing_method_defaults_by_device_and_the_setting_wins() -> None:
    """Unset, the method is the one measured best on each kind of device (docs/timing.md):
    context timing on a CPU, isolated on a GPU. GAS_TIMING_CONTEXT overrides it either way."""
    from latency_service.core.config import Settings

    assert Settings().context_timing("cpu") is True
    assert Settings().context_timing("cuda") is False
    assert Settings(timing_context=True).context_timing("cuda") is True
    assert Settings(timing_context=False).context_timing("cpu") is False
