"""Faults a shared latency service meets, each survived: an op that raises or runs out of memory,
a /measure queue flooded by clients that then leave, SIGTERM mid-job, PostgreSQL restarted
mid-job. Behaviour only: durations below are lower bounds set by the timing settings, never
assertions on how fast this host is."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import func, select

from gas_core.genotype import random_genotype
from gas_core.keys import LatencyKey
from gas_core.search_space import NetworkLayout
from gas_core.wire import MeasurePublic, MeasureRequest
from latency_service import db, job_state
from latency_service.jobs import DeviceWorker, QueueFull, Trust
from latency_service.models import E2EMeasurement, Measurement
from latency_service.profiler import Method, Timing
from latency_service.testing import PgCluster, pg_bin, running, stop_server, wait_job
from latency_service.worker_process import WorkerProcess
from tests.support import start_server, worker_rig

STEADY = [100.0, 101.0, 99.0, 100.0, 100.0]
TINY = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=16, num_classes=4)
KEYS = [{"op": "conv_3x3", "c_in": 8, "c_out": 8, "h": 16, "w": 16 + 8 * i, "stride": 1, "batch": 1} for i in range(8)]
SLOW_KEYS = {"GAS_SAMPLES": "100", "GAS_MIN_SAMPLE_MS": "5", "GAS_CONTEXT_MIN_SAMPLE_MS": "5"}
"""Every key takes at least 100 × 5 ms × 2 (paired) = 1 s, whatever the host: a job is mid-key
most of the time."""


def test_an_op_that_raises_or_runs_out_of_memory_fails_its_key_and_the_job_goes_on(db_url: str) -> None:
    keys = [LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8, w=8 * (i + 1), stride=1, batch=1) for i in range(4)]

    def timer(key: LatencyKey, dev: torch.device, method: Method) -> Timing:
        if key == keys[1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 52.00 GiB")
        if key == keys[2]:
            raise ValueError("unsupported on this device")
        return Timing(samples_us=STEADY, iters_per_sample=1, timer="fake", timed_ns=0)

    rig = worker_rig(db_url, keys, trust=Trust(), timer=timer, reference=lambda d: [Timing([1.0, 1.0, 1.0], 1, "fake", 0)])
    s, job, engine = rig.session, rig.job, rig.engine
    with s:
        rig.worker._job_step()
        s.refresh(job)
        assert job.state == "failed" and job.done == 4  # every key was tried
        assert [e.split(": ")[1] for e in job.errors] == ["OutOfMemoryError", "ValueError"]
        assert keys[1].canonical in job.errors[0] and "52.00 GiB" in job.errors[0]
        stored = set(s.scalars(select(Measurement.key)))
        assert stored == {keys[0].canonical, keys[3].canonical}
    engine.dispose()


def test_measure_queue_is_bounded_fair_and_forgets_cancelled_work() -> None:
    """Deterministic half of the queue rules, on a worker whose thread is not started."""
    worker = DeviceWorker(None, torch.device("cpu"), 1, 1, Method(), owner="me")  # type: ignore[arg-type]
    ran: list[str] = []
    a = worker.submit(lambda: ran.append("a"), limit=2)
    worker.submit(lambda: ran.append("b"), limit=2)
    with pytest.raises(QueueFull, match="2 measurements already queued"):
        worker.submit(lambda: ran.append("c"), limit=2)
    assert a.cancel()  # the client of a went away before it ran
    assert worker.queued() == 1
    worker.submit(lambda: ran.append("d"), limit=2)  # a's place is free again
    assert worker._run_tasks() and ran == ["b"]  # one task per call: a running job's keys alternate with them
    assert worker._run_tasks() and ran == ["b", "d"]
    assert not worker._run_tasks() and worker.queued() == 0


def test_worker_process_queue_hands_the_child_one_wanted_measurement_at_a_time() -> None:
    """The service's half of the worker-process protocol, on a handle whose child never starts:
    the queue stays with the service (a leaver's measurement is dropped before the child sees
    it), the child gets one measurement at a time, each answer resolves its own future and
    hands over the next, and the child's write reports reach the table caches."""
    wp = WorkerProcess(spec=None)
    child, wp._up = wp._child_conn, True  # as if launched: the test reads the child's end of the pipe
    written: list[LatencyKey | None] = []
    wp.on_write = written.append
    req = MeasureRequest.model_validate({"genotype": json.loads(random_genotype(TINY, torch.Generator().manual_seed(0))
                                                                .to_json()), "input_size": [32, 48]})
    first, leaver, third = (wp.submit_measure(req, limit=2) for _ in range(3))
    with pytest.raises(QueueFull, match="2 measurements already queued"):
        wp.submit_measure(req, limit=2)
    assert wp.measuring and wp.queued() == 2
    sent = child.recv()
    assert sent[:2] == ("measure", 0) and MeasureRequest.model_validate_json(sent[2]) == req
    assert leaver.cancel() and wp.queued() == 1  # its client went away: never sent
    result = MeasurePublic(device="d", environment="e", input_size=(32, 48), batch=1, dtype="float32",
                           memory_format="contiguous", median_ms=2.0, p90_ms=2.5, mean_ms=2.1, std_ms=0.1,
                           n_samples=5, fps=500.0, predicted_ms=None, error_pct=None)
    wp._handle(("result", 0, result.model_dump_json()))
    assert first.result(timeout=0) == result
    assert child.recv()[:2] == ("measure", 2) and not child.poll()  # the third; the leaver was skipped
    wp._handle(("error", 2, RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        third.result(timeout=0)
    assert not wp.measuring and wp.queued() == 0
    wp._handle(("wrote", LatencyKey(**KEYS[0]).canonical))
    wp._handle(("wrote", None))
    assert written == [LatencyKey(**KEYS[0]), None]
    handed, waiting = wp.submit_measure(req), wp.submit_measure(req)
    child.close()  # the child died (a crash, an OOM kill): the measurement it held fails, the next one waits
    wp._read()
    with pytest.raises(RuntimeError, match="exited before the measurement ended"):
        handed.result(timeout=0)
    assert not waiting.done() and wp.queued() == 1
    assert wp._after_death()  # restarted: the waiting one goes to the new child
    wp.RESTARTS = 1
    assert not wp._after_death()  # a second death within the window: down for good
    with pytest.raises(RuntimeError, match="device worker process is down"):
        waiting.result(timeout=0)
    with pytest.raises(QueueFull, match="device worker process is down"):
        wp.submit_measure(req)


@pytest.mark.slow
def test_measure_queue_sheds_load_and_drops_clients_that_left(tmp_path: Path) -> None:
    """Live: one measurement runs (≥ 6 s: 60 samples of ≥ 100 ms), one waits and its client
    hangs up, so it never runs; a third is refused with 503 while the queue is full; a fourth,
    sent after the second left, is accepted. Each step waits for the state /health reports, never
    for a time: the waiting client hangs up the moment /health shows it queued behind a running
    measurement (a client timeout would race the first measurement's length)."""
    slow = {"GAS_MEASURE_QUEUE": "1", "GAS_E2E_SAMPLES": "60", "GAS_MIN_SAMPLE_MS": "100"}
    srv = start_server(f"sqlite:///{tmp_path / 'q.db'}", tmp_path, slow)
    body = {"genotype": json.loads(random_genotype(TINY, torch.Generator().manual_seed(0)).to_json()),
            "input_size": [32, 48]}
    results: dict[str, int] = {}

    def post(name: str, timeout: float) -> None:
        with srv.client(timeout=timeout) as c:
            results[name] = c.post("/measure", json=body).status_code

    def post_then_hang_up(leave: threading.Event) -> None:
        """A client that sends its request and closes the connection when told, unanswered."""
        payload = json.dumps(body).encode()
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /measure HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json"
                         b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            leave.wait(120)
        results["leaver"] = -1

    try:
        first = threading.Thread(target=post, args=("first", 120))
        first.start()
        _await_health(srv, lambda h: h["measuring"])
        leave = threading.Event()
        leaver = threading.Thread(target=post_then_hang_up, args=(leave,))
        leaver.start()
        _await_health(srv, lambda h: h["measure_queue"] == 1)
        with srv.client() as c:
            refused = c.post("/measure", json=body)
            assert c.get("/health").json()["measuring"], "the first measurement ended before the leaver left"
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5", refused.text
        assert "already queued" in refused.json()["message"]
        leave.set()
        leaver.join()
        deadline = time.monotonic() + 10
        while "measure cancelled before it ran" not in srv.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        post("last", 120)
        first.join()
        assert results == {"first": 200, "leaver": -1, "last": 200}
        assert "measure cancelled before it ran" in srv.log.read_text()
    finally:
        stop_server(srv)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    with db.session_factory(engine)() as s:
        assert s.scalar(select(func.count()).select_from(E2EMeasurement)) == 2  # the leaver's never ran
    engine.dispose()


def _await_health(srv, ok, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with srv.client() as c:
            if ok(c.get("/health").json()):
                return
        time.sleep(0.05)
    raise TimeoutError("the service never reached the expected /health state")


def _rows(url: str) -> tuple[int, int]:
    engine = db.make_engine(url)
    with db.session_factory(engine)() as s:
        rows = s.scalar(select(func.count()).select_from(Measurement)) or 0
        distinct = s.scalar(select(func.count(func.distinct(Measurement.key_hash)))) or 0
    engine.dispose()
    return rows, distinct


def _start_job(srv, body: dict, at_least: int) -> str:  # type: ignore[no-untyped-def]
    with srv.client() as c:
        job_id = c.post("/profile", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/jobs/{job_id}").json()["done"] < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
    return job_id


@pytest.mark.slow
def test_a_worker_process_killed_mid_key_fails_that_key_is_restarted_and_the_job_goes_on(tmp_path: Path) -> None:
    """The kernel's OOM killer (here kill -9) takes the device worker mid-job: the service
    restarts it, the key it was timing is failed with the reason (so a key that kills the worker
    cannot do it forever), the job ends with every key accounted for, and the new worker
    measures. Reference points are rare here, so the kill almost surely lands inside a key; if
    it lands between two, no key is failed and the same accounting holds."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    srv = start_server(url, tmp_path, {**SLOW_KEYS, "GAS_REFERENCE_EVERY_S": "3600"})
    try:
        job_id = _start_job(srv, {"keys": KEYS}, 2)
        (worker,) = srv.worker_pids()
        os.kill(worker, signal.SIGKILL)
        with srv.client() as c:
            job = wait_job(c, job_id, timeout=300)
            assert job["done"] == len(KEYS) and job["state"] in ("done", "failed")
            assert all("WorkerDied" in e and "killed by SIGKILL" in e for e in job["errors"]) and len(job["errors"]) <= 1
            _await_health(srv, lambda h: h["worker"] and h["status"] == "ok")
            assert srv.worker_pids() != [worker]
            body = {"genotype": json.loads(random_genotype(TINY, torch.Generator().manual_seed(0)).to_json()),
                    "input_size": [32, 48]}
            assert c.post("/measure", json=body).status_code == 200
        log = srv.log.read_text()
        assert "device worker process was killed by SIGKILL" in log and "restarting the device worker" in log
    finally:
        stop_server(srv)
    rows, distinct = _rows(url)
    assert rows == distinct == len(KEYS) - len(job["errors"])  # each key stored once, or failed


@pytest.mark.slow
def test_sigterm_mid_job_exits_and_rolls_the_key_back(tmp_path: Path) -> None:
    """SIGTERM mid-job: the service exits on its own (the wait is a hang guard, not a figure),
    takes its device worker with it, and the key being timed is not half-stored."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    body, n = {"keys": KEYS}, len(KEYS)
    srv = start_server(url, tmp_path, SLOW_KEYS)
    try:
        job_id = _start_job(srv, body, 2)
        (worker,) = srv.worker_pids()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(120)
    finally:
        stop_server(srv)
    assert not running(worker), "the device worker process outlived its service"
    rows, _ = _rows(url)
    engine = db.make_engine(url)
    with db.session_factory(engine)() as s:
        job = job_state.get(s, job_id=job_id)
        assert job is not None and job.state == "running" and rows == job.done < n  # no row without its progress
    engine.dispose()
    srv = start_server(url, tmp_path)  # fast timing: finish the job
    try:
        with srv.client() as c:
            job_after = wait_job(c, job_id, timeout=120)
        assert job_after["state"] == "done" and job_after["done"] == n
    finally:
        stop_server(srv)
    assert _rows(url) == (n, n)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restarted_mid_job_the_job_carries_on(tmp_path: Path) -> None:
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb) not found")
    cluster = PgCluster(bindir).start()
    try:
        url = cluster.create_db()
        body, n = {"keys": KEYS}, len(KEYS)
        srv = start_server(url, tmp_path, SLOW_KEYS)
        try:
            job_id = _start_job(srv, body, 2)
            cluster.restart()
            deadline = time.monotonic() + 300
            while True:
                try:
                    with srv.client() as c:
                        job = c.get(f"/jobs/{job_id}").json()
                    if job["state"] not in ("queued", "running") or time.monotonic() > deadline:
                        break
                except (httpx.HTTPError, json.JSONDecodeError):
                    pass
                time.sleep(0.5)
            assert job["state"] == "done" and job["done"] == n and not job["errors"], job
        finally:
            stop_server(srv)
        assert "device worker step failed" in srv.log.read_text()  # it did see the database go away
        assert _rows(url) == (n, n)
    finally:
        cluster.stop()
