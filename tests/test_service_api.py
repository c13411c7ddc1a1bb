"""The HTTP API against a real uvicorn server on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import func, select

from gas_core.genotype import random_genotype
from gas_core.keys import LatencyKey
from gas_core.search_space import NetworkLayout, cell_shapes
from latency_service import db
from latency_service.models import Measurement
from latency_service.testing import Server, running, stop_server, wait_job
from tests.support import start_server

REPO = Path(__file__).resolve().parent.parent

TINY = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=16, num_classes=4)
TINY_REQ = {"layout": TINY.model_dump(mode="json"), "input_size": [32, 48]}
KEY = {"op": "conv_3x3", "c_in": 8, "c_out": 8, "h": 16, "w": 16, "stride": 1, "batch": 1}


def dev_env_timing(c: httpx.Client) -> str:
    return c.get("/device").json()["environment"]["info"]["timing"]


def _n_keys(layout: NetworkLayout, hw: tuple[int, int]) -> int:
    return len(cell_shapes(layout, hw).all_keys())


def test_health_device_openapi(shared_server: Server) -> None:
    with shared_server.client() as c:
        assert c.get("/health").json() == {"schema_version": 1, "status": "ok", "database": True, "worker": True,
                                            "measuring": False, "measure_queue": 0}
        dev = c.get("/device").json()
        assert dev["device"]["kind"] == "cpu" and dev["device"]["slug"].startswith("cpu-")
        assert dev["environment"]["info"]["threads"] == 1
        spec = c.get("/openapi.json").json()
        assert {"/health", "/device", "/profile", "/jobs", "/jobs/{job_id}", "/table/{device}", "/devices",
                "/compare", "/measure", "/table/import"} <= set(spec["paths"])
        assert set(spec["paths"]["/table/import"]["post"]["responses"]) >= {"200", "409", "422"}
        assert "202" in spec["paths"]["/profile"]["post"]["responses"]


@pytest.mark.slow
def test_profile_table_measure_roundtrip(server: Server) -> None:
    with server.client() as c:
        r = c.post("/profile", json=TINY_REQ)
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        n = _n_keys(TINY, (32, 48))
        assert job["state"] == "done" and job["total"] == n and job["done"] == n and job["skipped"] == 0
        slug = c.get("/device").json()["device"]["slug"]

        t = c.get(f"/table/{slug}")
        assert t.status_code == 200
        body = t.json()
        assert len(body["entries"]) == n and body["schema_version"] == 1
        e = body["entries"][0]
        # context timing: 5 samples, or up to 4 batches of 5 when the paired median is not resolved
        assert e["p10_us"] <= e["median_us"] <= e["p90_us"] and e["n_samples"] in (5, 10, 15, 20)
        assert e["timer"] == "perf_counter_ns+context"  # the default method: paired, after a context
        assert dev_env_timing(c).startswith("context+flush")
        assert LatencyKey.from_canonical(e["key"]).key_hash == e["key_hash"]
        # ETag: unchanged table → 304
        assert c.get(f"/table/{slug}", headers={"If-None-Match": t.headers["etag"]}).status_code == 304
        # gzip when the client accepts it, the same table once decoded
        z = c.get(f"/table/{slug}", headers={"Accept-Encoding": "gzip"})
        assert z.headers.get("content-encoding") == "gzip" and z.json() == body
        assert "content-encoding" not in c.get(f"/table/{slug}", headers={"Accept-Encoding": "identity"}).headers
        # filters and CSV
        convs = c.get(f"/table/{slug}", params={"op": "conv_3x3"}).json()["entries"]
        assert convs and all(x["op"] == "conv_3x3" for x in convs)
        assert c.get(f"/table/{slug}", params={"batch": 7}).json()["entries"] == []
        csv = c.get(f"/table/{slug}", params={"format": "csv"})
        assert csv.headers["content-type"].startswith("text/csv")
        assert len(csv.text.strip().splitlines()) == n + 1
        with_samples = c.get(f"/table/{slug}", params={"samples": True}).json()["entries"][0]
        assert len(with_samples["samples_us"]) == with_samples["n_samples"]

        # the same request again: a new job, every key skipped
        again = wait_job(c, c.post("/profile", json=TINY_REQ).json()["id"])
        assert again["skipped"] == n and again["state"] == "done"
        forced = wait_job(c, c.post("/profile", json={**TINY_REQ, "force": True}).json()["id"])
        assert forced["skipped"] == 0 and forced["done"] == n
        after = c.get(f"/table/{slug}", headers={"If-None-Match": t.headers["etag"]})
        assert after.status_code == 200 and after.headers["etag"] != t.headers["etag"]  # re-timed rows: new body
        assert len(after.json()["entries"]) == n

        devices = c.get("/devices").json()["devices"]
        assert [d["slug"] for d in devices] == [slug]
        assert devices[0]["environments"][0]["entries"] == n

        g = random_genotype(TINY, torch.Generator().manual_seed(0))
        m = c.post("/measure", json={"genotype": json.loads(g.to_json()), "input_size": [32, 48]})
        assert m.status_code == 200, m.text
        res = m.json()
        assert res["median_ms"] > 0 and res["fps"] == pytest.approx(1e3 / res["median_ms"])
        assert res["predicted_ms"] > 0 and res["missing_keys"] == []
        assert res["error_pct"] == pytest.approx((res["predicted_ms"] - res["median_ms"]) / res["median_ms"] * 100)
        # at a size the table lacks, the prediction is null and the missing keys are named
        m2 = c.post("/measure", json={"genotype": json.loads(g.to_json()), "input_size": [40, 40]}).json()
        assert m2["predicted_ms"] is None and m2["missing_keys"]


def test_bad_input_is_rejected_with_the_field_named(shared_server: Server) -> None:
    with shared_server.client() as c:
        jobs_before = c.get("/jobs").json()
        def bad(path: str, body: dict, code: int = 422) -> str:
            r = c.post(path, json=body)
            assert r.status_code == code, r.text
            return json.dumps(r.json())

        assert "c_in" in bad("/profile", {"keys": [{**KEY, "c_in": -8}]})
        assert "c_in" in bad("/profile", {"keys": [{**KEY, "c_in": 100000}]})
        assert "conv_9x9" in bad("/profile", {"keys": [{**KEY, "op": "conv_9x9"}]})
        assert "batch" in bad("/profile", {"keys": [{**KEY, "batch": 10000}]})
        assert "h/w" in bad("/profile", {"keys": [{**KEY, "h": 100000}]})
        assert "exactly one" in bad("/profile", {"keys": [KEY], **TINY_REQ})
        assert "input_size" in bad("/profile", {"layout": TINY.model_dump(mode="json")})
        assert "schema_version" in bad("/profile", {"schema_version": 9, "keys": [KEY]})
        g = json.loads(random_genotype(TINY, torch.Generator().manual_seed(1)).to_json())
        g_bad = json.loads(json.dumps(g))
        g_bad["cells"][0]["edges"][0] = "conv_9x9"
        assert "conv_9x9" in bad("/measure", {"genotype": g_bad, "input_size": [32, 32]})
        g_bad = json.loads(json.dumps(g))
        g_bad["cells"] = g_bad["cells"][:2]
        assert "cells" in bad("/measure", {"genotype": g_bad, "input_size": [32, 32]})
        assert "input_size" in bad("/measure", {"genotype": g, "input_size": [99999, 32]})
        assert "batch" in bad("/measure", {"genotype": g, "input_size": [32, 32], "batch": 5000})
        assert c.get("/table/no-such-device").status_code == 404
        assert c.get("/jobs/nope").status_code == 404
        assert c.delete("/jobs/nope").status_code == 404
        assert c.get("/compare", params={"devices": "a"}).status_code == 422
        # nothing was stored by any of it
        assert c.get("/jobs").json() == jobs_before


@pytest.mark.slow
def test_concurrent_identical_requests_make_one_job(server: Server) -> None:
    layout = TINY.model_copy(update={"num_cells": 4})
    body = {"layout": layout.model_dump(mode="json"), "input_size": [48, 64]}

    def post(_: int) -> tuple[int, str]:
        r = httpx.post(server.url + "/profile", json=body, timeout=60)
        return r.status_code, r.json()["id"]

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(post, range(10)))
    ids = {job_id for _, job_id in results}
    assert len(ids) == 1, results
    assert sorted(code for code, _ in results).count(202) == 1
    with server.client() as c:
        wait_job(c, ids.pop())
        assert len(c.get("/jobs").json()) == 1


def test_cancel_job(server: Server) -> None:
    with server.client() as c:
        body = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": [128, 256]}
        job = c.post("/profile", json=body).json()
        cancelled = c.delete(f"/jobs/{job['id']}").json()
        assert cancelled["state"] == "cancelled"
        time.sleep(0.5)
        final = c.get(f"/jobs/{job['id']}").json()
        assert final["state"] == "cancelled" and final["done"] < final["total"]


@pytest.mark.slow
def test_kill9_mid_job_resumes_without_duplicates(db_url: str, tmp_path: Path) -> None:
    slow = {"GAS_SAMPLES": "20", "GAS_MIN_SAMPLE_MS": "1", "GAS_WARMUP_MS": "10"}
    layout = NetworkLayout(num_cells=5, reduction_cells=(1, 3))
    body = {"layout": layout.model_dump(mode="json"), "input_size": [64, 96]}
    n = _n_keys(layout, (64, 96))
    srv = start_server(db_url, tmp_path, slow)
    try:
        with srv.client() as c:
            job_id = c.post("/profile", json=body).json()["id"]
            deadline = time.monotonic() + 60
            while c.get(f"/jobs/{job_id}").json()["done"] < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
        (worker,) = srv.worker_pids()  # the job runs in the service's device-worker process
        srv.kill9()
        deadline = time.monotonic() + 10
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(worker), "the device worker outlived a kill -9 of its service"
    finally:
        stop_server(srv)
    engine = db.make_engine(db_url)
    with db.session_factory(engine)() as s:
        stored_at_kill = s.scalar(select(func.count()).select_from(Measurement))
    assert 5 <= stored_at_kill < n
    srv = start_server(db_url, tmp_path, slow)
    try:
        with srv.client() as c:
            job = wait_job(c, job_id, timeout=300)
            assert job["state"] == "done" and job["done"] == n
            assert len(c.get("/jobs").json()) == 1
        assert "resumed" in srv.log.read_text()
    finally:
        stop_server(srv)
    with db.session_factory(engine)() as s:
        rows = s.scalar(select(func.count()).select_from(Measurement))
        distinct = s.scalar(select(func.count(func.distinct(Measurement.key_hash))))
    engine.dispose()
    assert rows == distinct == n


@pytest.mark.slow
def test_token_guards_mutating_routes(tmp_path: Path) -> None:
    srv = start_server(f"sqlite:///{tmp_path / 't.db'}", tmp_path, {"GAS_API_TOKEN": "s3cret"})
    try:
        with srv.client() as c:
            assert c.post("/profile", json={"keys": [KEY]}).status_code == 401
            wrong = c.post("/profile", json={"keys": [KEY]}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 403 and "s3cret" not in wrong.text
            spec = c.get("/openapi.json").json()["paths"]
            for path, verb in (("/profile", "post"), ("/measure", "post"), ("/table/import", "post"),
                               ("/jobs/{job_id}", "delete")):
                assert {"401", "403"} <= set(spec[path][verb]["responses"]), path
            ok = c.post("/profile", json={"keys": [KEY]}, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 202
            assert c.get("/jobs").status_code == 200  # reads stay open
    finally:
        stop_server(srv)


BIG = 2**63


def test_bad_input_is_a_422_naming_the_field_never_a_500(shared_server: Server) -> None:
    """NaN / Infinity in a body, integers past 64 bits in a query or a body, unusable slugs and
    huge invalid bodies: each a 422 whose message names the field, echoing little of the input."""
    with shared_server.client() as c:
        for body in ('{"layout": {}, "input_size": [NaN, 8]}', '{"layout": {}, "input_size": [Infinity, 8]}'):
            r = c.post("/profile", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text
            assert "input_size" in r.json()["message"]
        r = c.post("/measure", content='{"genotype": {"cells": []}, "input_size": [8, NaN]}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "input_size" in r.json()["message"]
        r = c.get("/table/anything", params={"batch": str(BIG)})
        assert r.status_code == 422 and "batch" in r.json()["message"]
        r = c.get("/compare", params={"devices": "a,b", "batch": str(2**70)})
        assert r.status_code == 422 and "batch" in r.json()["message"]
        r = c.post("/profile", json={"keys": [{**KEY, "c_in": 2**70}]})
        assert r.status_code == 422 and "c_in" in r.json()["message"]
        r = c.post("/profile", json={"keys": [{**KEY, "c_in": "8"}]})  # numbers are numbers: no coercion
        assert r.status_code == 422 and "c_in" in r.json()["message"]
        r = c.post("/profile", json={"layout": NetworkLayout().model_dump(mode="json"), "input_size": [64, 64],
                                     "batches": list(range(1, 65)), "dtypes": ["float32", "float16",
                                                                                           "bfloat16"] * 5,
                                     "memory_formats": ["contiguous", "channels_last"]})
        assert r.status_code == 422 and "exceed the bound" in r.json()["message"], r.text  # bounded before expansion
        geno = json.loads(random_genotype(TINY, torch.Generator().manual_seed(0)).to_json())
        geno["layout"]["stem_channels"] = [16, 8192, 32]
        r = c.post("/measure", json={"genotype": geno, "input_size": [64, 64]})
        assert r.status_code == 422 and "stem_channels" in r.json()["message"], r.text
        geno["layout"]["stem_channels"] = [16, 4096, 32]
        r = c.post("/measure", json={"genotype": geno, "input_size": [3584, 3584]})
        assert r.status_code == 422 and "exceeds" in r.json()["message"], r.text  # peak activation, before building
        huge = c.post("/profile", json={"keys": [{**KEY, "op": "x" * 2_000_000}]})
        assert huge.status_code == 422 and len(huge.content) < 4096  # the 2 MB input is not echoed back

        job = wait_job(c, c.post("/profile", json={"keys": [KEY]}).json()["id"])
        slug = c.get("/device").json()["device"]["slug"]
        table = c.get(f"/table/{slug}", params={"samples": "true"}).json()
        for path, value in ((("entries", 0, "c_in"), 2**70), (("entries", 0, "gpu_clock_mhz"), 2**70),
                            (("entries", 0, "samples_us", 0), float("nan")), (("device", "slug"), "a/b"),
                            (("device", "slug"), ".."), (("device", "slug"), "x,y"), (("device", "slug"), "z@w")):
            bad = json.loads(json.dumps(table))
            target = bad
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
            r = c.post("/table/import", content=json.dumps(bad), headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (path, r.text)
            field = path[-1] if isinstance(path[-1], str) else path[-2]
            assert field in r.json()["message"], (path, r.json())
        assert c.get(f"/table/{slug}", params={"samples": "true"}).json() == table  # nothing stored changed

        # one timezone, whatever the backend: the job reads the same aware time from every route
        posted = c.post("/profile", json={"keys": [KEY], "force": True}).json()
        got = c.get(f"/jobs/{posted['id']}").json()
        assert posted["created_at"] == got["created_at"] and got["created_at"].endswith(("Z", "+00:00"))
        assert all(j["created_at"].endswith(("Z", "+00:00")) for j in c.get("/jobs").json())

        # DELETE of an ended job is a conflict, not a silent no-op
        assert job["state"] == "done"
        r = c.delete(f"/jobs/{job['id']}")
        assert r.status_code == 409 and "done" in r.json()["message"]

        # If-None-Match: the weak form of the ETag and * both revalidate
        etag = c.get(f"/table/{slug}").headers["ETag"]
        assert c.get(f"/table/{slug}", headers={"If-None-Match": f"W/{etag}"}).status_code == 304
        assert c.get(f"/table/{slug}", headers={"If-None-Match": "*"}).status_code == 304
        assert c.get(f"/table/{slug}", headers={"If-None-Match": '"other"'}).status_code == 200


@pytest.mark.slow
def test_body_limits_and_unparseable_bodies(tmp_path: Path) -> None:
    srv = start_server(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, {"GAS_MAX_BODY_BYTES": "4096"})
    try:
        with srv.client() as c:
            big = json.dumps({"keys": [KEY] * 200})
            assert len(big) > 4096
            r = c.post("/profile", content=big, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and "GAS_MAX_BODY_BYTES" in r.json()["message"]

            def chunks():  # no Content-Length: the limit holds on the streamed body too
                for _ in range(10):
                    yield b" " * 1000

            r = c.post("/profile", content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413
            r = c.post("/profile", content=b'{"keys": [', headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["message"], r.text
            assert c.get("/health").status_code == 200  # the server is fine after all that
    finally:
        stop_server(srv)


@pytest.mark.slow
def test_gas_service_cli_errors_are_one_line(tmp_path: Path) -> None:
    """Unknown op in a genotype, and measuring where no table exists: one line, exit 2, and no
    empty ./gas.db left behind."""
    import subprocess
    import sys

    g = json.loads(random_genotype(NetworkLayout(), torch.Generator().manual_seed(0)).to_json())
    g["cells"][0]["edges"][0] = "conv_9x9"
    (tmp_path / "bad.json").write_text(json.dumps(g))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "latency_service.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})

    r = cli("measure", "bad.json")
    assert r.returncode == 2 and "unknown op 'conv_9x9'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    g["cells"][0]["edges"][0] = "conv_3x3"
    (tmp_path / "good.json").write_text(json.dumps(g))
    r = cli("measure", "good.json", "--input-size", "32", "64")
    assert r.returncode == 2 and "run `gas-service profile` first" in r.stderr, r.stderr
    assert not (tmp_path / "gas.db").exists()


@pytest.mark.slow
def test_read_token_guards_reads_and_every_cli_passes_a_token(tmp_path: Path) -> None:
    import subprocess
    import sys

    srv = start_server(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, {"GAS_API_TOKEN": "s3cret", "GAS_READ_TOKEN": "r3ad"})
    try:
        with srv.client() as c:
            assert c.get("/health").status_code == 200 and c.get("/openapi.json").status_code == 200
            for path in ("/jobs", "/devices", "/device", "/table/x", "/compare?devices=a,b"):
                assert c.get(path).status_code == 401, path
                assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 403, path
            assert c.get("/jobs", headers={"Authorization": "Bearer r3ad"}).status_code == 200
            assert c.get("/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.post("/profile", json={"keys": [KEY]}, headers={"Authorization": "Bearer r3ad"}).status_code == 403
            spec = c.get("/openapi.json").json()["paths"]
            assert {"401", "403"} <= set(spec["/table/{device}"]["get"]["responses"])

        def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "search_client.table_cli", *args, "--latency-url", srv.url],
                                  capture_output=True, text=True, timeout=120,
                                  env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})})

        assert cli("devices").returncode == 1
        assert cli("devices", "--token", "r3ad").returncode == 0
        assert cli("devices", env={"GAS_API_TOKEN": "s3cret"}).returncode == 0
        assert "s3cret" not in srv.log.read_text() and "r3ad" not in srv.log.read_text()
    finally:
        stop_server(srv)


@pytest.mark.slow
def test_unreachable_database_is_one_line_and_exit_1(tmp_path: Path) -> None:
    import subprocess
    import sys

    from latency_service.testing import free_port

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "GAS_DB_WAIT_S": "1",
           "GAS_DATABASE_URL": f"postgresql+psycopg://gas:Pa55wOrd@127.0.0.1:{free_port()}/gas"}
    r = subprocess.run([sys.executable, "-m", "latency_service.cli", "serve", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "is unreachable after 1 s" in last and "Traceback" not in r.stderr, r.stderr
    assert "Pa55wOrd" not in r.stderr  # the password is redacted
