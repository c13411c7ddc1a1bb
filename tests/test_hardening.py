"""The second hardening round: every row of the probe's table against a real server on loopback
(SQLite), plus the bounds that need a host without a running worker. Behaviour only: no
assertion depends on how fast this host is."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from gas_core.genotype import random_genotype
from gas_core.keys import MAX_US
from gas_core.latency import derived_keys
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.table import JSON_MAX_DEPTH, LatencyTable, compare_tables, environment_fingerprint
from gas_core.wire import ErrorBody, ProfileRequest
from latency_service.bounds import Overloaded
from latency_service.core.config import Settings
from latency_service.service import Host
from latency_service.testing import Server, stop_server, wait_job
from search_client.report import plot_compare
from search_client.table_cli import app as table_app
from tests.support import start_server

TINY = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=16, num_classes=4)
TINY_REQ = {"layout": TINY.model_dump(mode="json"), "input_size": [32, 48]}
H200_TABLE = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu" / "table.json"
BOUNDS = {"GAS_MAX_QUEUED_KEYS": "300", "GAS_HEADER_TIMEOUT_S": "1"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hardening")
    server = start_server(f"sqlite:///{tmp / 'h.db'}", tmp, BOUNDS)
    try:
        with server.client() as c:  # the host's own table, measured here
            wait_job(c, c.post("/profile", json=TINY_REQ).json()["id"])
        yield server
    finally:
        stop_server(server)


def _msg(r: httpx.Response) -> str:
    """The error's one line (every error has the shape :class:`ErrorBody`)."""
    return ErrorBody.model_validate(r.json()).message


def _db(server: Server) -> sqlite3.Connection:
    return sqlite3.connect(server.env["GAS_DATABASE_URL"].removeprefix("sqlite:///"))


def _export(c: httpx.Client) -> dict:
    slug = c.get("/device").json()["device"]["slug"]
    return c.get(f"/table/{slug}", params={"samples": True}).json()


def _as_device(table: dict, slug: str, info: dict | None = None, median: float | None = None) -> dict:
    """``table`` as another device's (optionally every sample, hence every statistic, = ``median``)."""
    out = json.loads(json.dumps(table))
    out["device"] = {**out["device"], "slug": slug}
    if info is not None:
        out["environment"] = {"fingerprint": environment_fingerprint(info), "info": info}
    if median is not None:
        for e in out["entries"]:
            e["samples_us"] = [median] * e["n_samples"]
            e.update(median_us=median, p10_us=median, p90_us=median, mean_us=median, std_us=0.0)
    return out


# ---------------------------------------------------------------- rows 1–4: no 500 from numbers


def test_row1_huge_stem_channels_are_a_422_naming_the_field(srv: Server) -> None:
    with srv.client() as c:
        for bad in (2**31, 2**63):
            r = c.post("/profile", json={"layout": {"num_cells": 3, "reduction_cells": [1],
                                                    "stem_channels": [bad, 8, 8]}, "input_size": [32, 48]})
            assert r.status_code == 422 and "stem_channels" in _msg(r), r.text
        r = c.post("/profile", json={"layout": {"num_cells": 40, "init_channels": 1024,
                                                "reduction_cells": list(range(30))}, "input_size": [32, 48]})
        assert r.status_code == 422 and "reduction_cells" in _msg(r)


def test_row2_deep_info_is_refused_and_one_stored_before_is_served_clipped(srv: Server) -> None:
    deep: dict = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    with srv.client() as c:
        body = {"device": {"slug": "deep", "kind": "cpu", "name": "x"},
                "environment": {"fingerprint": "0" * 16, "info": deep}, "entries": []}
        r = c.post("/table/import", json=body)
        assert r.status_code == 422 and "environment.info" in _msg(r) and "nested" in _msg(r)
        # a deep info stored before the bound (written straight into the database) no longer breaks reads
        ok = _as_device(_export(c), "legacy-deep", info={"torch": "x"})
        assert c.post("/table/import", json=ok).status_code == 200
        with _db(srv) as con:
            con.execute("UPDATE environment SET info = ? WHERE fingerprint = ?",
                        (json.dumps(deep), ok["environment"]["fingerprint"]))
        assert c.get("/devices").status_code == 200
        r = c.get("/table/legacy-deep")
        assert r.status_code == 200
        info, depth = r.json()["environment"]["info"], 1
        while isinstance(info, dict):
            info, depth = info.get("x"), depth + 1
        assert isinstance(info, str) and "clipped" in info and depth <= JSON_MAX_DEPTH + 1


def test_row3_4_extreme_medians_are_refused_and_legacy_ones_never_raise(srv: Server) -> None:
    with srv.client() as c:
        base = _export(c)
        r = c.post("/table/import", json=_as_device(base, "huge", median=1e308))
        assert r.status_code == 422 and "median_us" in _msg(r)
        assert c.post("/table/import", json=_as_device(base, "at-bound", median=MAX_US)).status_code == 200
        assert c.post("/table/import", json=_as_device(base, "tiny", median=1e-300)).status_code == 200
        for pair in ("at-bound,tiny", "tiny,at-bound"):
            r = c.get("/compare", params={"devices": pair})
            assert r.status_code == 200, r.text
            p = r.json()["pairs"][0]
            assert p["geomean_ratio"] is None and all(k["ratio"] is None for k in p["keys"])  # 1e-300 < 1 ns
        # rows stored before the bound: 1e308 in this host's own table; /measure and /compare answer
        slug, env = c.get("/device").json()["device"]["slug"], c.get("/device").json()["environment"]["fingerprint"]
        with _db(srv) as con:
            con.execute("UPDATE measurement SET median_us = 1e308 WHERE environment_id = "
                        "(SELECT id FROM environment WHERE fingerprint = ?) AND op = 'stem_conv'", (env,))
        assert c.get("/compare", params={"devices": f"{slug},at-bound"}).status_code == 200
        served = c.get(f"/table/{slug}", params={"op": "stem_conv"}).json()["entries"]
        assert served and all(e["median_us"] == MAX_US and e["flagged"] for e in served)
        g = random_genotype(TINY, torch.Generator().manual_seed(0))
        r = c.post("/measure", json={"genotype": json.loads(g.to_json()), "input_size": [32, 48]})
        assert r.status_code == 200, r.text
        stems = {k.canonical for k in derived_keys(g, cell_shapes(TINY, (32, 48))) if k.op == "stem_conv"}
        assert r.json()["predicted_ms"] is None and stems <= set(r.json()["missing_keys"])
        with _db(srv) as con:  # put the host's table back for the other tests
            con.execute("UPDATE measurement SET median_us = p10_us WHERE median_us > 1e300")


# ---------------------------------------------------------------- rows 5–6: bounded work


def test_row5_queued_work_is_bounded_before_anything_is_stored(srv: Server) -> None:
    with srv.client() as c:
        n_jobs = len(c.get("/jobs").json())
        body = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": [64, 128],
                "batches": list(range(1, 58)), "dtypes": ["float32", "float16", "bfloat16"],
                "memory_formats": ["contiguous", "channels_last"]}
        r = c.post("/profile", json=body)  # the probe's 369-byte body: 19,836 keys
        assert r.status_code == 422 and "GAS_MAX_KEYS_PER_JOB=5000" in _msg(r)
        body = {**TINY_REQ, "input_size": [40, 56], "batches": list(range(1, 11))}  # 10 × 38 keys > 300 queued
        r = c.post("/profile", json=body)
        assert r.status_code == 503 and "GAS_MAX_QUEUED_KEYS=300" in _msg(r)
        assert int(r.headers["retry-after"]) > 0
        assert len(c.get("/jobs").json()) == n_jobs  # nothing was stored


def test_row5_6_jobs_per_client_and_the_plan_cache_in_bytes(tmp_path: Path) -> None:
    """On a host whose worker never runs (jobs stay queued): the third job of one client is a
    429; the plan cache holds bytes, not entries, and a cancelled job frees its plan."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'q.db'}", device="cpu", max_jobs_per_client=2,
                        plan_cache_bytes=100 * 1400)  # room for 100 planned keys; TINY has 38 per size
    host = Host.start(settings, run_worker=False)
    try:
        reqs = [ProfileRequest(layout=TINY, input_size=(32, 48 + 8 * i)) for i in range(3)]
        jobs = [host.submit_profile(r, client="token:abc")[0] for r in reqs[:2]]
        with pytest.raises(Overloaded) as err:
            host.submit_profile(reqs[2], client="token:abc")
        assert err.value.status == 429 and "GAS_MAX_JOBS_PER_CLIENT=2" in str(err.value)
        assert host.submit_profile(reqs[0], client="token:abc")[0].id == jobs[0].id  # a resend is no new job
        host.submit_profile(reqs[2], client="addr:10.0.0.1")  # another client is not held back
        assert len(host.plans) == 2 and host.plans.weight == 2 * 38 * 1400  # three plans do not fit: LRU dropped
        big = ProfileRequest(layout=TINY, input_size=(64, 64), batches=[1, 2, 3])  # 114 keys: never fits
        host.submit_profile(big, client="addr:10.0.0.2")
        assert host.plans.get(big.model_dump_json()) is None and host.plans.weight <= settings.plan_cache_bytes
        one = ProfileRequest(layout=TINY, input_size=(64, 96))
        job, _ = host.submit_profile(one, client="addr:10.0.0.3")
        assert host.plans.get(one.model_dump_json())[1] == job.request_hash
        host.job_ended(job.request_hash)  # cancelled or done: its plan goes, the others stay
        assert host.plans.get(one.model_dump_json()) is None and len(host.plans) == 1
    finally:
        host.close()


# ---------------------------------------------------------------- row 7: untrusted import


def test_row7_import_never_replaces_the_hosts_table_and_is_checked(srv: Server) -> None:
    with srv.client() as c:
        own = _export(c)
        slug, env = own["device"]["slug"], own["environment"]["fingerprint"]
        forged = json.loads(json.dumps(own))
        # the dearest row: a cheap key's paired (context) median can be 0 µs, and 3 × 0 is still its median
        forged["entries"] = [max(forged["entries"], key=lambda e: e["median_us"])]
        assert forged["entries"][0]["median_us"] > 1.0
        forged["environment"] = {"fingerprint": environment_fingerprint({"forged": 1}), "info": {"forged": 1}}
        forged["entries"][0]["created_at"] = "9999-01-01T00:00:00+00:00"
        r = c.post("/table/import", json=forged)
        assert r.status_code == 422 and "entries[0].created_at" in _msg(r)
        forged["entries"][0]["created_at"] = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
        forged["entries"][0]["median_us"] *= 3  # not the median of its samples
        r = c.post("/table/import", json=forged)
        assert r.status_code == 422 and "entries[0].median_us" in _msg(r)
        forged["entries"][0]["median_us"] /= 3
        forged["entries"][0]["p90_us"] = 123456.0  # recomputed from the samples, not trusted
        assert c.post("/table/import", json=forged).status_code == 200
        served = c.get(f"/table/{slug}").json()
        assert served["environment"]["fingerprint"] == env and served["environment"]["origin"] == "measured"
        picked = c.get(f"/table/{slug}", params={"environment": forged["environment"]["fingerprint"]}).json()
        assert picked["environment"]["origin"] == "imported" and picked["entries"][0]["p90_us"] != 123456.0


# ---------------------------------------------------------------- rows 8–13


def test_row8_keys_with_input_size_is_a_422(srv: Server) -> None:
    key = {"op": "conv_3x3", "c_in": 8, "c_out": 8, "h": 16, "w": 16, "stride": 1, "batch": 1}
    with srv.client() as c:
        r = c.post("/profile", json={"keys": [key], "input_size": [32, 48]})
        assert r.status_code == 422 and "input_size" in _msg(r)


@pytest.mark.parametrize("headers", [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                                     {}])
def test_row9_a_wrong_content_type_is_a_415_naming_json(srv: Server, headers: dict) -> None:
    body = json.dumps(TINY_REQ).encode()
    for path in ("/profile", "/measure", "/table/import"):
        r = httpx.post(srv.url + path, content=body, headers=headers)
        assert r.status_code == 415 and "application/json" in _msg(r), (path, r.text)


def test_row11_query_string_tokens_never_reach_the_access_log(srv: Server) -> None:
    with srv.client() as c:
        c.get("/device", params={"access_token": "s3cr3t-one"})
        c.get("/device", params={"token": "s3cr3t-two", "x": "1"})
    time.sleep(0.5)  # the log line is written after the response
    log = srv.log.read_text()
    assert "s3cr3t" not in log and "access_token=***" in log and "token=***&x=1" in log


def test_row12_a_slow_request_head_is_cut_off(srv: Server) -> None:
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never ends the head
        s.settimeout(30)
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server (the setting is 1 s here)
        assert time.monotonic() - t0 < 30
    with srv.client() as c:  # a complete request on a fresh connection is unaffected
        assert c.get("/health").status_code == 200


def test_row13_table_import_answers_the_methods_the_schema_declares(srv: Server) -> None:
    r = httpx.request("OPTIONS", srv.url + "/table/import")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    schema = httpx.get(srv.url + "/openapi.json").json()
    assert set(schema["paths"]["/table/import"]) == {"post"}
    assert "415" in schema["paths"]["/profile"]["post"]["responses"]


@pytest.mark.slow
def test_row10_a_worker_that_stays_down_fails_its_job_and_refuses_profiles(tmp_path: Path) -> None:
    slow = {"GAS_SAMPLES": "100", "GAS_MIN_SAMPLE_MS": "5", "GAS_CONTEXT_MIN_SAMPLE_MS": "5",
            "GAS_REFERENCE_EVERY_S": "3600"}
    server = start_server(f"sqlite:///{tmp_path / 'w.db'}", tmp_path, slow)
    keys = [{"op": "conv_3x3", "c_in": 8, "c_out": 8, "h": 16, "w": 16 + 8 * i, "stride": 1, "batch": 1}
            for i in range(16)]
    try:
        with server.client() as c:
            job_id = c.post("/profile", json={"keys": keys}).json()["id"]
            deadline = time.monotonic() + 120
            while c.get(f"/jobs/{job_id}").json()["state"] != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(4):  # more than 3 deaths in 10 min: it stays down
                deadline = time.monotonic() + 120
                while not server.worker_pids() and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(server.worker_pids()[0], signal.SIGKILL)
                time.sleep(0.2)
            deadline = time.monotonic() + 60
            while c.get(f"/jobs/{job_id}").json()["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            job = c.get(f"/jobs/{job_id}").json()
            assert job["state"] == "failed" and any("WorkerDown" in e for e in job["errors"])
            r = c.post("/profile", json={"keys": keys[:1]})
            assert r.status_code == 503 and "worker is down" in _msg(r) and r.headers["retry-after"]
            assert c.get("/health").json()["status"] == "degraded"
    finally:
        stop_server(server)


# ---------------------------------------------------------------- row 14 and the CLIs


def test_row14_compare_plot_with_one_key_ops_draws(tmp_path: Path) -> None:
    a = {"k1": ("stem", 3.0), "k2": ("conv_3x3", 7.0), "k3": ("conv_3x3", 9.0)}
    b = {"k1": ("stem", 3.0 * 0.1234567), "k2": ("conv_3x3", 1.0), "k3": ("conv_3x3", 2.0)}
    plot_compare(compare_tables(a, b), "a", "b", tmp_path / "c.png")  # raised on a negative whisker
    assert (tmp_path / "c.png").stat().st_size > 0


def test_row14_gas_table_compare_cpu_against_the_committed_h200_table(srv: Server, tmp_path: Path) -> None:
    h200 = LatencyTable.model_validate_json(H200_TABLE.read_text())
    f32 = sorted((e for e in h200.entries if e.dtype == "float32"), key=lambda e: e.c_in * e.h * e.w)[:6]
    runner = CliRunner()
    url = ["--latency-url", srv.url]
    r = runner.invoke(table_app, ["import", str(H200_TABLE), *url])
    assert r.exit_code == 0, r.output
    with srv.client() as c:
        keys = [e.latency_key().model_dump(mode="json") for e in f32]
        wait_job(c, c.post("/profile", json={"keys": keys}).json()["id"])
        slug = c.get("/device").json()["device"]["slug"]
    plot = tmp_path / "compare.png"
    r = runner.invoke(table_app, ["compare", slug, h200.device.slug, "--dtype", "float32", "--plot", str(plot), *url])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "common" in r.output and plot.stat().st_size > 0


DEAD_URL = "http://127.0.0.1:9"  # the discard port: connection refused


def _bad_invocations(tmp: Path) -> list[tuple[str, object, list[str]]]:
    from latency_service.cli import app as service_app
    from search_client.cli import app as search_app
    from search_client.train_cli import eval_app, export_app, train_app

    junk = tmp / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 8)
    bad_json = tmp / "bad.json"
    bad_json.write_text("{")
    db = f"sqlite:///{tmp / 'cli.db'}"
    return [
        ("gas-service serve", service_app, ["serve", "--database-url", "mysql://nope"]),
        ("gas-service profile", service_app, ["profile", "--database-url", db, "--device", "cpu", "--dtype", "float64"]),
        ("gas-service profile layout", service_app, ["profile", "--database-url", db, "--device", "cpu", "--layout",
                                                     str(bad_json)]),
        ("gas-service measure", service_app, ["measure", str(tmp / "missing.json"), "--database-url", db]),
        ("gas-search", search_app, ["--latency-url", DEAD_URL, "--dataset", "synthetic", "--epochs", "1"]),
        ("gas-search data", search_app, ["--latency-url", DEAD_URL, "--dataset", "camvid", "--data-root",
                                         str(tmp / "nowhere")]),
        ("gas-table devices", table_app, ["devices", "--latency-url", DEAD_URL]),
        ("gas-table show", table_app, ["show", "nope", "--latency-url", DEAD_URL]),
        ("gas-table compare", table_app, ["compare", "a", "b", "--latency-url", DEAD_URL]),
        ("gas-table export", table_app, ["export", "nope", "--out", str(tmp / "t.json"), "--latency-url", DEAD_URL]),
        ("gas-table import", table_app, ["import", str(bad_json), "--latency-url", DEAD_URL]),
        ("gas-train", train_app, [str(bad_json)]),
        ("gas-eval", eval_app, [str(junk)]),
        ("gas-export", export_app, [str(junk), "--input-size", "8", "8"]),
    ]


@pytest.mark.slow
def test_every_cli_command_fails_on_bad_input_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAS_CLIENT_RETRIES", "0")  # a dead URL fails at once (retries: test_client_retries_*)
    runner = CliRunner()
    for name, cli, args in _bad_invocations(tmp_path):
        r = runner.invoke(cli, args)  # type: ignore[arg-type]
        assert r.exit_code not in (0, None), (name, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (name, repr(r.exception))
        assert "Traceback" not in r.output, (name, r.output)
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert lines and any("error" in ln.lower() or "invalid" in ln.lower() for ln in lines), (name, r.output)


def test_every_error_has_one_shape_and_the_schema_says_so(srv: Server) -> None:
    """A route's refusal, the router's 404 and 405, a validation 422, a 415 from the middleware:
    all ``{message, detail}`` (:class:`ErrorBody`), with the router's ``Allow`` header kept; the
    OpenAPI schema documents that shape as every route's 4XX and 5XX."""
    with srv.client() as c:
        answers = {
            "route 404": c.get("/jobs/no-such-job"),
            "router 404": c.get("/no/such/route"),
            "405": c.delete("/health"),
            "422": c.post("/profile", json={"keys": "not a list"}),
            "415": c.post("/profile", content=b"{}", headers={"Content-Type": "text/plain"}),
        }
        schema = c.get("/openapi.json").json()
    for what, r in answers.items():
        assert 400 <= r.status_code < 500, (what, r.status_code)
        body = ErrorBody.model_validate(r.json())
        assert set(r.json()) == {"schema_version", "message", "detail"} and body.message, (what, r.text)
    assert [d.field for d in ErrorBody.model_validate(answers["422"].json()).detail] == ["body.keys"]
    assert "GET" in answers["405"].headers["allow"]
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
            assert {"4XX", "5XX"} <= set(errors), (path, method)
            for code, r in errors.items():
                assert r["content"]["application/json"]["schema"] == ref, (path, method, code)
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # no second, FastAPI-default shape
