"""Storage, migrations, device identity and the profiler, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import torch
from sqlalchemy import func, inspect, select
from sqlalchemy.exc import IntegrityError

from gas_core.devices import resolve_device
from gas_core.keys import LatencyKey
from gas_core.quality import assess, sample_stats
from latency_service import crud, db, device, job_state, profiler
from latency_service.jobs import DeviceWorker
from latency_service.models import Job, Measurement, as_stored
from latency_service.profiler import Method, Timing, context_case, resolved, time_callable, time_key

FAST = Method(warmup_runs=2, warmup_ms=1, samples=5, min_sample_ms=0.1)
KEY = LatencyKey(op="sep_conv_3x3", c_in=8, c_out=8, h=16, w=32, stride=1, batch=1)


def _session(url: str):
    db.migrate(url)
    engine = db.make_engine(url)
    return engine, db.session_factory(engine)


def _device_env(s):
    dev = crud.get_or_create_device(s, ident=device.cpu_identity())
    env = crud.get_or_create_environment(s, device=dev, ident=device.environment(torch.device("cpu"), 1, False))
    return dev, env


def test_migrations_upgrade_downgrade(db_url: str) -> None:
    db.migrate(db_url)
    engine = db.make_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    assert {"device", "environment", "measurement", "job", "e2e_measurement", "alembic_version"} <= tables
    uniques = {u["name"] for u in inspect(engine).get_unique_constraints("measurement")}
    assert "uq_measurement_key" in uniques
    db.downgrade(db_url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    db.migrate(db_url)
    assert "measurement" in inspect(engine).get_table_names()
    engine.dispose()


def test_a_rows_statistics_are_those_of_its_stored_samples(db_url: str) -> None:
    """Samples are stored as float32; a paired median near zero computed from the float64 samples
    would differ from the one an import recomputes from the stored samples (here by ~1e-7 µs, 2e-6
    of itself), and an exported table re-imported at 2× would not compare at exactly 2×."""
    engine, sessions = _session(db_url)
    samples = [-7.7, -3.3000001, 3.4000002, 10.1]  # median (−3.3000001 + 3.4000002) / 2, a difference
    assert sample_stats(samples)["median_us"] != sample_stats(as_stored(samples))["median_us"]
    timing = Timing(samples, 1, "perf_counter", 0)
    with sessions() as s:
        dev, env = _device_env(s)
        crud.put_measurement(s, device_id=dev.id, environment_id=env.id, key=KEY, timing=timing, method={},
                             telemetry={}, quality=assess(samples))
        s.commit()
        row = s.scalars(select(Measurement)).one()
        assert row.samples == as_stored(samples)
        for name in ("median_us", "p10_us", "p90_us", "mean_us", "std_us"):
            assert getattr(row, name) == sample_stats(row.samples)[name], name
    engine.dispose()


def test_measurement_unique_per_device_env_key(db_url: str) -> None:
    engine, sessions = _session(db_url)
    timing = time_key(KEY, torch.device("cpu"), FAST)
    with sessions() as s:
        dev, env = _device_env(s)
        crud.put_measurement(s, device_id=dev.id, environment_id=env.id, key=KEY, timing=timing, method={},
                             telemetry={}, quality=assess(timing.samples_us))
        s.commit()
        # put again: an update, not a second row
        crud.put_measurement(s, device_id=dev.id, environment_id=env.id, key=KEY, timing=timing, method={},
                             telemetry={}, quality=assess(timing.samples_us))
        s.commit()
        assert s.scalar(select(func.count()).select_from(Measurement)) == 1
        row = s.scalars(select(Measurement)).one()
        assert row.samples == pytest.approx(timing.samples_us, rel=1e-6)
        stats = crud.row_stats(s, device_id=dev.id, environment_id=env.id)
        assert {k: r.median_us for k, r in stats.items()} == {KEY.canonical: row.median_us}
        s.add(Measurement(device_id=dev.id, environment_id=env.id, key_hash=KEY.key_hash, key=KEY.canonical,
                          **KEY.model_dump(), **timing.summary(), method={}, samples=[]))
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        assert s.scalar(select(func.count()).select_from(Measurement)) == 1
    engine.dispose()


def test_one_active_job_per_request(db_url: str) -> None:
    engine, sessions = _session(db_url)
    with sessions() as s:
        dev, env = _device_env(s)
        a, created_a = job_state.create(s, device_id=dev.id, environment_id=env.id, request_hash="h", keys=[KEY],
                                       force=False)
        b, created_b = job_state.create(s, device_id=dev.id, environment_id=env.id, request_hash="h", keys=[KEY],
                                       force=False)
        assert created_a and not created_b and a.id == b.id
        # the partial unique index refuses a second active job even past the application check
        s.add(Job(id="x", device_id=dev.id, environment_id=env.id, request_hash="h", state="queued", keys=[],
                  total=0))
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        job_state.cancel(s, job=a)
        c, created_c = job_state.create(s, device_id=dev.id, environment_id=env.id, request_hash="h", keys=[KEY],
                                       force=False)
        assert created_c and c.id != a.id
    engine.dispose()


def test_jobs_are_claimed_once_and_taken_over_only_when_stale(db_url: str) -> None:
    """Two hosts of one device and environment share the queue; a third environment's worker never
    sees it. A running job moves to another host only after its heartbeat is stale."""
    engine, sessions = _session(db_url)
    with sessions() as s:
        dev, env = _device_env(s)
        other_env = crud.get_or_create_environment(
            s, device=dev, ident=device.environment(torch.device("cpu"), 2, False))
        job, _ = job_state.create(s, device_id=dev.id, environment_id=env.id, request_hash="h", keys=[KEY], force=False)
        now = datetime.now(UTC)

        def pick(owner: str, environment_id: int = env.id, at: datetime = now) -> Job | None:
            return job_state.next_job(s, device_id=dev.id, environment_id=environment_id, owner=owner,
                                 stale_before=at - timedelta(seconds=300))

        assert pick("host-a", other_env.id) is None  # timed where it was asked for
        seen_by_a = pick("host-a")
        with sessions() as s_b:  # host b, its own connection
            seen_by_b = job_state.next_job(s_b, device_id=dev.id, environment_id=env.id, owner="host-b",
                                      stale_before=now - timedelta(seconds=300))
            assert seen_by_a is not None and seen_by_b is not None and seen_by_a.id == seen_by_b.id == job.id
            s_b.commit()
            assert job_state.claim(s, job=seen_by_a, owner="host-a")
            assert not job_state.claim(s_b, job=seen_by_b, owner="host-b")  # b read it queued; a won
        s.refresh(job)
        assert job.state == "running" and job.owner == "host-a" and job.started_at is not None
        assert pick("host-b") is None  # a's heartbeat is fresh
        assert pick("host-a").id == job.id  # a restarted a resumes its own job at once
        later = now + timedelta(seconds=301)
        taken = pick("host-b", at=later)
        assert taken is not None and job_state.claim(s, job=taken, owner="host-b")
        s.refresh(job)
        assert job.owner == "host-b" and job.state == "running"

        # host a wakes from its stall with a key timed: its measurement and progress roll back
        timing = time_key(KEY, torch.device("cpu"), FAST)
        for owner, kept in (("host-a", False), ("host-b", True)):
            worker = DeviceWorker(sessions, torch.device("cpu"), dev.id, env.id, FAST, owner=owner)
            crud.put_measurement(s, device_id=dev.id, environment_id=env.id, key=KEY, timing=timing, method={},
                                 telemetry={}, quality=assess(timing.samples_us))
            assert worker._progress(s, job) is kept
            s.refresh(job)
            assert s.scalar(select(func.count()).select_from(Measurement)) == int(kept)
            assert job.done == int(kept) and job.heartbeat_at is not None
    engine.dispose()


def test_cpu_identity_when_nvml_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    class NVMLError(Exception):
        pass

    fake = types.ModuleType("pynvml")

    def init() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    fake.nvmlInit = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert device._nvml() is None
    assert device.gpu_telemetry(0) == {"gpu_clock_mhz": None, "gpu_temp_c": None}
    ident = device.identify(resolve_device("cpu", name="GAS_DEVICE"))
    assert ident.kind == "cpu" and ident.slug.startswith("cpu-") and ident.slug.endswith(f"-{device.host_cpus()}t")
    assert ident.info["threads"] == device.host_cpus()
    env = device.environment(torch.device("cpu"), 3, True)
    assert env.info["threads"] == 3 and env.fingerprint != device.environment(torch.device("cpu"), 2, True).fingerprint


def test_nvml_module_without_gpu_degrades() -> None:
    """The real nvidia-ml-py on a host without a driver must not raise."""
    pytest.importorskip("pynvml")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert device._nvml() is None
    assert device.gpu_telemetry(0) == {"gpu_clock_mhz": None, "gpu_temp_c": None}
    assert device.identify(resolve_device("auto", name="GAS_DEVICE")).kind == "cpu"


def test_asking_for_cuda_without_it_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="GAS_DEVICE cuda:0: no CUDA device is visible"):
        resolve_device("cuda:0", name="GAS_DEVICE")


def test_profiler_cpu_stats() -> None:
    t = time_key(KEY, torch.device("cpu"), FAST)
    s = t.summary()
    assert t.timer == "perf_counter_ns" and s["n_samples"] == 5 and len(t.samples_us) == 5
    assert s["p10_us"] <= s["median_us"] <= s["p90_us"]
    assert s["median_us"] > 0 and t.iters_per_sample >= 1
    assert t.timed_ns >= sum(t.samples_us) * t.iters_per_sample * 1e3 * 0.99


def test_iterations_per_sample_ignores_one_slow_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """n comes from the fastest of a few single runs, on an injected clock: a first run slowed 50×
    by the shared host no longer makes every sample 50× too short; runs that each already last
    ``min_ms`` stop the estimate after two."""
    now = [0]
    monkeypatch.setattr(profiler, "time", types.SimpleNamespace(perf_counter_ns=lambda: now[0]))
    durations = iter([50_000_000, 1_000_000, 1_100_000, 1_000_000, 990_000])  # ns: one hiccup, then ~1 ms

    def body() -> None:
        now[0] += next(durations)

    assert profiler.iterations_per_sample(body, lambda: None, min_ms=100, max_iters=10_000) == 102  # ⌈100/0.99⌉
    durations = iter([200_000_000, 150_000_000, 1])  # both ≥ min_ms: n = 1 without a third run
    assert profiler.iterations_per_sample(body, lambda: None, min_ms=100, max_iters=10_000) == 1
    assert next(durations) == 1
    durations = iter([1] * 5)
    assert profiler.iterations_per_sample(body, lambda: None, min_ms=100, max_iters=500) == 500


def test_unresolved_paired_medians_get_more_samples() -> None:
    """A paired median within twice its standard error of zero is not trusted: an op that costs
    nothing (here a no-op) is sampled in further batches, up to 4 × ``samples``; the statistic
    itself on fixed data."""
    assert resolved([10.0, 11.0, 9.0, 10.5, 9.5]) and not resolved([1.0, -1.0, 0.5, -0.5, 0.2])
    assert not resolved([5.0, 6.0]) and not resolved([0.0] * 9)
    method = Method(warmup_runs=2, warmup_ms=1, samples=5, min_sample_ms=0.2, context=True, flush_bytes=2**20)
    t = time_callable(lambda: None, torch.device("cpu"), method, context=context_case(
        torch.device("cpu"), "float32", "contiguous", 2**20))
    assert len(t.samples_us) in (5, 10, 15, 20) and (len(t.samples_us) == 20 or resolved(t.samples_us))


class FakeClock:
    """``time.perf_counter_ns`` / ``perf_counter`` for the profiler, advanced only by the work it
    times: the paired-timing arithmetic checked exactly, with no real timing."""

    def __init__(self) -> None:
        self.ns = 0

    def work(self, ns: int) -> Callable[[], None]:
        def run() -> None:
            self.ns += ns

        return run

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = types.SimpleNamespace(perf_counter_ns=lambda: self.ns, perf_counter=lambda: self.ns / 1e9)
        monkeypatch.setattr(profiler, "time", fake)


def test_paired_context_timing_counts_the_op_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """An op of 3 µs after a context of 5 µs: every paired sample is (n × 8 µs − n × 5 µs) / n =
    3 µs, the context's work never counted, and the isolated timing of the same op agrees."""
    clock = FakeClock()
    clock.install(monkeypatch)
    op, ctx = clock.work(3_000), clock.work(5_000)
    method = Method(warmup_runs=2, warmup_ms=0.05, samples=9, min_sample_ms=0.1, context=True, flush_bytes=2**20)
    paired = time_callable(op, torch.device("cpu"), method, context=ctx)
    isolated = time_callable(op, torch.device("cpu"), FAST)
    assert paired.timer == "perf_counter_ns+context" and isolated.timer == "perf_counter_ns"
    assert paired.samples_us == [3.0] * 9  # resolved at once: no further batches
    assert isolated.samples_us == [3.0] * FAST.samples
    assert paired.iters_per_sample == math.ceil(max(method.min_sample_ms, method.context_min_sample_ms) * 1e6 / 8_000)
    env_a = device.environment(torch.device("cpu"), 1, False, "isolated")
    env_b = device.environment(torch.device("cpu"), 1, False, "context+flush1048576")
    assert env_a.fingerprint != env_b.fingerprint  # tables of two methods never mix


def test_profiler_times_a_real_key_with_context() -> None:
    """The real path end to end (no figures asserted: they are real timings): the sample count
    grows only in whole batches and only while the paired median is unresolved."""
    method = Method(warmup_runs=2, warmup_ms=1, samples=9, min_sample_ms=0.5, context=True, flush_bytes=2**20)
    t = time_key(KEY, torch.device("cpu"), method)
    assert t.timer == "perf_counter_ns+context" and len(t.samples_us) in (9, 18, 27, 36)
    assert resolved(t.samples_us) or len(t.samples_us) == 36


def test_default_flush_is_twice_the_cache_read_from_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 × L2 by default, 2 × the last level with ``llc``, 2 × L3 where no L2 is reported, 4 MiB
    when the host reports nothing, and the real sysfs reading positive and whole KiB."""
    from latency_service.profiler import default_flush_bytes

    cpu = torch.device("cpu")
    real = default_flush_bytes(cpu)
    assert real >= 2**20 and real % 1024 == 0
    for caches, l2, llc in (({1: 32 * 2**10, 2: 2**19, 3: 2**25}, 2**20, 2**26), ({1: 2**15, 3: 2**25}, 2**26, 2**26),
                            ({}, 4 * 2**20, 4 * 2**20)):
        monkeypatch.setattr(profiler, "cpu_caches", lambda c=caches: c)
        assert (default_flush_bytes(cpu), default_flush_bytes(cpu, "llc")) == (l2, llc), caches


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA-event timing, NVML identity)")
def test_cuda_event_timing_and_nvml_identity() -> None:
    dev = torch.device("cuda:0")
    t = time_key(KEY, dev, FAST)
    assert t.timer == "cuda_event" and t.median_us > 0
    ident = device.identify(dev)
    assert ident.kind == "cuda" and ident.slug.startswith("nvidia-")
    assert device.gpu_telemetry(0)["gpu_temp_c"] is not None


@pytest.mark.slow
def test_installed_wheel_carries_its_migrations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A non-editable install (wheel) finds the Alembic tree as latency_service/migrations."""
    import shutil
    import subprocess
    from pathlib import Path

    root, src = Path(__file__).resolve().parent.parent, tmp_path / "src"  # build a copy: no build/ in the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "gas_core", "latency_service", "search_client", "migrations"):
        if (root / name).is_dir():
            shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "whl"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "whl").glob("gas_nas-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from latency_service import db; from sqlalchemy import inspect;"
        "assert db.MIGRATIONS.is_relative_to(sys.argv[1]), db.MIGRATIONS;"
        "db.migrate(sys.argv[2]); e = db.make_engine(sys.argv[2]);"
        "print(sorted(inspect(e).get_table_names()))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target), f"sqlite:///{tmp_path / 'w.db'}"], cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout
    assert "'job'" in out and "'measurement'" in out


def test_a_row_timed_otherwise_than_its_key_is_timed_now_is_timed_again(db_url: str) -> None:
    """A one-graph runtime's key stored as its own graph (before in-graph keys) is not counted as
    stored, so a profile job times it again; eager rows and own-graph keys' rows count as before,
    and nothing is deleted by asking."""
    engine, sessions = _session(db_url)
    ort = {"runtime": "onnxruntime"}
    strided = KEY.model_copy(update={"stride": 2, **ort})
    concat = LatencyKey(op="concat", c_in=8, c_out=16, h=16, w=32, stride=1, n_inputs=2, batch=1, runtime="onnxruntime")
    rows = {  # key → (timer, counts as stored)
        KEY: ("perf_counter_ns+context", True),  # eager, context method
        KEY.model_copy(update=ort): ("perf_counter_ns", False),  # chain key timed as its own graph: stale
        KEY.model_copy(update={"h": 8, **ort}): ("perf_counter_ns+chain", True),
        strided: ("perf_counter_ns+chain", False),  # a fan-out key under the wrong form
        strided.model_copy(update={"h": 8}): ("perf_counter_ns+fan_out", True),
        concat: ("perf_counter_ns", True),  # no in-graph form: its own graph is how it is timed
    }
    with sessions() as s:
        dev, env = _device_env(s)
        for key, (timer, _) in rows.items():
            timing = Timing([5.0, 6.0, 7.0], 1, timer, 0)
            crud.put_measurement(s, device_id=dev.id, environment_id=env.id, key=key, timing=timing, method={},
                                 telemetry={}, quality=assess(timing.samples_us))
        s.commit()
        stored = crud.stored_hashes(s, device_id=dev.id, environment_id=env.id, keys=list(rows))
        assert stored == {k.key_hash for k, (_, fresh) in rows.items() if fresh}
        assert s.scalar(select(func.count()).select_from(Measurement)) == len(rows)
    engine.dispose()
