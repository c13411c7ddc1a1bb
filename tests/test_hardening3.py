"""Hardening, third round (docs/security.md): one test per row of the probe that found it."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from search_client.train_cli import eval_app, export_app, train_app

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """A pickle that runs code when loaded: ``open(marker, 'w')`` stands for any command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("command", ["gas-eval", "gas-export", "gas-train --init"])
def test_row15_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "gas-train", "model": {}, "payload": _RunsCode(marker)}, evil)
    geno = tmp_path / "g.json"
    from gas_core.genotype import random_genotype
    from gas_core.search_space import NetworkLayout

    geno.write_text(random_genotype(NetworkLayout(num_classes=4), torch.Generator().manual_seed(0)).to_json())
    args = {"gas-eval": (eval_app, [str(evil)]),
            "gas-export": (export_app, [str(evil), "--input-size", "8", "8"]),
            "gas-train --init": (train_app, [str(geno), "--init", str(evil), "--epochs", "1", "--quiet",
                                             "--out", str(tmp_path / "run")])}[command]
    r = CliRunner().invoke(args[0], args[1])  # type: ignore[arg-type]
    assert r.exit_code == 2, r.output
    assert "refused" in r.output and "could run code" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not marker.exists()


def test_row15_our_own_checkpoints_still_load(tmp_path: Path) -> None:
    """weights_only=True reads everything gas-train and the search write (plain data only)."""
    from search_client.train import TRAIN_CHECKPOINT_KIND, read_checkpoint

    ck = {"kind": TRAIN_CHECKPOINT_KIND, "schema_version": 1, "config": {"lr": 0.01, "seed": None},
          "model": {"w": torch.ones(2)}, "opt": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1,
                                                               momentum=0.9).state_dict(),
          "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "history": [{"loss": 1.0}]}
    torch.save(ck, tmp_path / "ok.pt")
    got = read_checkpoint(tmp_path / "ok.pt")
    assert torch.equal(got["model"]["w"], torch.ones(2)) and got["history"] == [{"loss": 1.0}]


def test_row16_gas_export_names_the_extra_it_needs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import search_client.train_cli as cli

    monkeypatch.setattr(cli, "missing_modules", lambda *names: ["onnxruntime"])
    r = CliRunner().invoke(export_app, [str(tmp_path / "x.pt"), "--input-size", "8", "8"])
    assert r.exit_code == 2 and "pip install 'gas-nas[export]'" in r.output and "onnxruntime" in r.output


@pytest.mark.slow
@pytest.mark.e2e
def test_row16_a_plain_install_runs_every_console_script(tmp_path: Path) -> None:
    """``pip install torch==2.13.0`` (the CPU wheel, as README says), then a plain ``pip install .``
    in a fresh venv: every console script starts, and gas-export, whose ONNX packages are an extra,
    says which extra in one line instead of a traceback."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    for args in ([torch_pin], [str(ROOT)]):
        done = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    scripts = ["gas-service", "gas-search", "gas-table", "gas-train", "gas-eval", "gas-export"]
    for script in scripts:
        done = subprocess.run([str(env_dir / "bin" / script), "--help"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (script, done.stderr[-2000:])
    done = subprocess.run([str(env_dir / "bin" / "gas-export"), "x.pt", "--input-size", "8", "8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "pip install 'gas-nas[export]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and sys.executable != str(py)


# ---------------------------------------------------------------- the HTTP layer, in process

TOKEN = "s3cret-token"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The real app on each backend through FastAPI's TestClient (lifespan, migrations), its
    device idle so jobs stay queued: no server process, nothing timed."""
    from fastapi.testclient import TestClient

    from latency_service.core.config import Settings
    from latency_service.main import create_app

    url = (f"sqlite:///{tmp_path_factory.mktemp('h3') / 'gas.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_cluster").create_db())
    settings = Settings(database_url=url, api_token=TOKEN, device="cpu", worker_process=False, cpu_threads=1)
    with TestClient(create_app(settings, run_worker=False), raise_server_exceptions=False) as client:
        yield client


class _CountingBody:
    """A request body that records whether anyone read it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.read = data, False

    def __iter__(self):
        self.read = True
        yield self.data


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc"])
def test_row1_no_body_is_read_before_auth(app_client, auth: str | None) -> None:
    """An anonymous or wrong-token request to a token route is refused before its body is read
    (the body here is never iterated), with the connection closed."""
    body = _CountingBody(b"[" + b"[]," * 1000 + b"[]]")
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    r = app_client.post("/profile", content=body, headers=headers)
    assert r.status_code == (403 if auth == "Bearer wrong" else 401), r.text
    assert not body.read and r.headers["connection"] == "close"
    assert r.json()["message"] and "s3cret" not in r.text


def test_row13_415_only_after_routing_and_auth(app_client) -> None:
    """No JSON type: a path that does not exist is a 404, a method the path lacks a 405, a token
    route without its token a 401 — the 415 only for an authorised request to a JSON route. Two
    Content-Type headers are a 400."""
    assert app_client.post("/no/such/route", content=b"x").status_code == 404
    assert app_client.post("/health", content=b"x").status_code == 405
    assert app_client.post("/profile", content=b"{}").status_code == 401
    ok = {"Authorization": f"Bearer {TOKEN}"}
    r = app_client.post("/profile", content=b"{}", headers=ok)
    assert r.status_code == 415 and "expected application/json" in r.json()["message"]
    r = app_client.post("/profile", content=b"{}", headers=[("authorization", f"Bearer {TOKEN}"),
                                                            ("content-type", "text/plain"),
                                                            ("content-type", "application/json")])
    assert r.status_code == 400 and "sent 2 times" in r.json()["message"]


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "PATCH"])
def test_row14_allow_lists_every_method_of_the_path(app_client, method: str) -> None:
    r = app_client.request(method, "/jobs/x", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}


@pytest.mark.parametrize("name", ["token", "api_token", "read_token", "gas_api_token", "apitoken", "api-key", "auth",
                                  "bearer", "authorization", "tok%65n", "Password", "client_secret", "KEY"])
def test_row11_every_spelling_of_a_secret_is_redacted(name: str) -> None:
    from latency_service.server import redact_query

    line = f'127.0.0.1:5 - "GET /device?dtype=float32&{name}=SECRET&batch=1 HTTP/1.1" 200'
    out = redact_query(line)
    assert "SECRET" not in out and "dtype=float32" in out and "batch=1" in out and f"{name}=***" in out


def test_row11_ordinary_parameters_are_kept() -> None:
    from latency_service.server import redact_query

    line = "GET /table/cpu?environment=abc&op=conv_3x3&samples=true&format=csv HTTP/1.1"
    assert redact_query(line) == line


def test_row12_a_restart_under_way_is_a_short_503(app_client, monkeypatch: pytest.MonkeyPatch) -> None:
    host = app_client.app.state.host
    monkeypatch.setattr(host.worker, "alive", lambda: False)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    body = {"keys": [{"op": "conv_3x3", "c_in": 8, "c_out": 8, "h": 8, "w": 8, "stride": 1, "batch": 1}]}
    monkeypatch.setattr(host.worker, "restarting", lambda: True)
    r = app_client.post("/profile", json=body, headers=ok)
    assert r.status_code == 503 and int(r.headers["retry-after"]) <= 5 and "restarting" in r.json()["message"]
    monkeypatch.setattr(host.worker, "restarting", lambda: False)
    r = app_client.post("/profile", json=body, headers=ok)
    assert r.status_code == 503 and int(r.headers["retry-after"]) == 60 and "down" in r.json()["message"]


def _as_client(app_client, addr: str):
    """The same running app, seen from another peer address."""
    from fastapi.testclient import TestClient

    return TestClient(app_client.app, client=(addr, 40000), raise_server_exceptions=False)


def _big_layout_request(i: int) -> dict:
    """The probe's request of 4,988 keys (43 batches × 2 memory formats × 58)."""
    return {"layout": {}, "input_size": [256, 800 + i], "batches": list(range(1, 44)),
            "memory_formats": ["contiguous", "channels_last"]}


def test_row3_one_client_cannot_take_the_whole_queue(app_client, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the defaults, one client's second 4,988-key job is over its share (429, naming
    GAS_MAX_CLIENT_KEYS) while another client's ordinary request is still taken."""
    monkeypatch.setattr(app_client.app.state.host.worker, "alive", lambda: True)  # idle, as if it were busy
    ok = {"Authorization": f"Bearer {TOKEN}"}
    greedy = _as_client(app_client, "10.0.0.3")
    first = greedy.post("/profile", json=_big_layout_request(0), headers=ok)
    assert first.status_code == 202 and first.json()["total"] == 4988, first.text
    second = greedy.post("/profile", json=_big_layout_request(1), headers=ok)
    assert second.status_code == 429 and "GAS_MAX_CLIENT_KEYS" in second.json()["message"]
    assert int(second.headers["retry-after"]) > 0
    other = _as_client(app_client, "10.0.0.4").post("/profile", json={"layout": {}, "input_size": [256, 512]},
                                                      headers=ok)
    assert other.status_code == 202, other.text
    for r in (first, other):  # leave the queue as it was for the other tests
        assert app_client.delete(f"/jobs/{r.json()['id']}", headers=ok).status_code == 200


def test_row4_client_identity_cannot_be_forged(app_client) -> None:
    """Neither an unknown bearer token nor an X-Forwarded-For header makes a new client."""
    from latency_service.api.deps import client_of

    class Req:
        def __init__(self, host: str) -> None:
            self.client = type("C", (), {"host": host})()

    class Creds:
        def __init__(self, token: str) -> None:
            self.credentials = token

    import asyncio

    host = app_client.app.state.host
    who = [asyncio.run(client_of(Req("10.0.0.5"), host, Creds(t) if t else None))  # type: ignore[arg-type]
           for t in (None, "made-up-1", "made-up-2")]
    assert len(set(who)) == 1 and who[0] == "addr:10.0.0.5"
    mine = asyncio.run(client_of(Req("10.0.0.5"), host, Creds(TOKEN)))  # type: ignore[arg-type]
    theirs = asyncio.run(client_of(Req("10.0.0.6"), host, Creds(TOKEN)))  # type: ignore[arg-type]
    assert mine != theirs and TOKEN not in mine and len(mine) <= 64  # one shared token, two clients
    from latency_service.core.config import Settings

    assert Settings().forwarded_allow_ips is None  # uvicorn then trusts no X-Forwarded-For (server.run)


def _own_table(app_client, **entry_over) -> dict:
    """A one-row table file in the host's own device and environment."""
    from datetime import UTC, datetime

    from gas_core.keys import LatencyKey
    from gas_core.quality import sample_stats

    me = app_client.get("/device").json()
    key = LatencyKey(op="conv_3x3", c_in=8, c_out=8, h=20, w=36, stride=1, batch=1)
    samples = [1.0, 1.0, 1.0]
    entry = {"key": key.canonical, "key_hash": key.key_hash, **key.model_dump(), **sample_stats(samples),
             "iters_per_sample": 1, "timer": "perf_counter_ns", "created_at": datetime.now(UTC).isoformat(),
             "samples_us": samples, **entry_over}
    return {"schema_version": 1, "kind": "gas-latency-table",
            "device": {k: me["device"][k] for k in ("slug", "kind", "name", "info")},
            "environment": {"fingerprint": me["environment"]["fingerprint"], "info": me["environment"]["info"]},
            "entries": [entry]}


@pytest.mark.parametrize("spelling", ["conv_3x3|cin=08", "conv_3x3|cin=\u0668", "conv_3x3|cin=" + "0" * 300 + "8"])
def test_row5_a_key_that_is_not_canonical_is_a_422(app_client, spelling: str) -> None:
    table = _own_table(app_client)
    entry = table["entries"][0]
    entry["key"] = entry["key"].replace("conv_3x3|cin=8", spelling)
    r = app_client.post("/table/import", json=table, params={"force": True},
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and ("not canonical" in r.text or "at most 256" in r.text), r.text


@pytest.mark.parametrize(("field", "value"), [("timer", "x" * 1_000_000), ("timer", "t" * 33), ("timer", "a\x00b"),
                                              ("quality", {"spread": 0, "nonpositive_share": 0, "median_se_us": 0,
                                                           "flagged": True, "reasons": ["r" * 1_000_000]})])
def test_row6_7_free_form_strings_are_bounded_on_both_backends(app_client, field: str, value: object) -> None:
    r = app_client.post("/table/import", json=_own_table(app_client, **{field: value}), params={"force": True},
                        headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text[:300]
    assert field in r.json()["message"]


def test_row6_a_nul_in_a_device_name_is_a_422(app_client) -> None:
    table = _own_table(app_client)
    table["device"] = {**table["device"], "slug": "other-dev", "name": "a\x00b"}
    r = app_client.post("/table/import", json=table, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and "device.name" in r.json()["message"]


def test_row8_an_import_into_the_hosts_measured_environment_needs_force(app_client) -> None:
    """The probe: the host's own fingerprint and info, its key, samples [1, 1, 1] dated now. The
    measured row stays unless force; with force the replaced row says it was imported."""
    from gas_core.keys import LatencyKey
    from gas_core.quality import assess
    from latency_service import crud
    from latency_service.profiler import Timing

    host = app_client.app.state.host
    key = LatencyKey(op="conv_3x3", c_in=8, c_out=8, h=20, w=36, stride=1, batch=1)
    with host.sessions() as s:  # as the profiler stores a row
        crud.put_measurement(s, device_id=host.spec.device_id, environment_id=host.spec.environment_id, key=key,
                             timing=Timing([29.0, 30.0, 31.0], 1, "perf_counter_ns", 0), method={}, telemetry={},
                             quality=assess([29.0, 30.0, 31.0]))
        s.commit()
    ok = {"Authorization": f"Bearer {TOKEN}"}
    table = _own_table(app_client)
    slug, env = table["device"]["slug"], table["environment"]["fingerprint"]
    before = app_client.get(f"/table/{slug}", params={"environment": env}).json()["entries"]
    assert [(e["median_us"], e["origin"]) for e in before if e["key"] == key.canonical] == [(30.0, "measured")]
    r = app_client.post("/table/import", json=table, headers=ok)
    assert r.status_code == 409 and "force=true" in r.json()["message"]
    r = app_client.post("/table/import", json=table, headers=ok, params={"force": True})
    assert r.status_code == 200, r.text
    rows = app_client.get(f"/table/{slug}", params={"environment": env}).json()["entries"]
    assert [(e["median_us"], e["origin"]) for e in rows if e["key"] == key.canonical] == [(1.0, "imported")]


def test_row9_the_rendered_table_cache_is_bounded_in_bytes() -> None:
    from latency_service.api.table_cache import Rendered, TableCache

    cache = TableCache(ttl_s=3600, capacity_bytes=1_000_000)
    for i in range(64):  # 64 query variants of a large table: ~200 kB each, plain and gzip
        body = bytes(range(256)) * 400 + str(i).encode()
        cache.put(("v", i), Rendered.of(body, "application/json", "env"))
    assert cache._rendered.weight <= 1_000_000 and 0 < len(cache._rendered) < 64


def test_row10_an_ended_job_drops_its_key_list(app_client, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import select

    from latency_service.models import Job

    monkeypatch.setattr(app_client.app.state.host.worker, "alive", lambda: True)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    job = app_client.post("/profile", json={"layout": {}, "input_size": [64, 96]}, headers=ok).json()
    host = app_client.app.state.host
    with host.sessions() as s:
        assert len(s.scalar(select(Job.keys).where(Job.id == job["id"])) or []) == job["total"] > 0
    assert app_client.delete(f"/jobs/{job['id']}", headers=ok).json()["state"] == "cancelled"
    with host.sessions() as s:
        assert s.scalar(select(Job.keys).where(Job.id == job["id"])) == []
    listed = app_client.get("/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in listed] == [job["id"]] and "keys" not in listed[0]


@pytest.mark.slow
@pytest.mark.e2e
def test_row2_a_request_body_has_a_deadline(tmp_path: Path) -> None:
    """A live uvicorn (the point is the connection): a complete head with no body, and a body
    trickling at a byte a second, are both closed at GAS_BODY_TIMEOUT_S; an unauthenticated head
    with a body pending is answered 401 at once and closed, without waiting for the body."""
    import socket
    import time

    from latency_service.testing import stop_server
    from tests.support import start_server

    srv = start_server(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, {"GAS_BODY_TIMEOUT_S": "2",
                                                                   "GAS_API_TOKEN": TOKEN})
    host, port = srv.url.removeprefix("http://").split(":")
    head = (b"POST /measure HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    try:
        for trickle in (False, True):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(head)
                s.settimeout(0.9 if trickle else 30)
                t0, got = time.monotonic(), b"?"
                while time.monotonic() - t0 < 30:
                    if trickle:
                        try:
                            s.sendall(b" ")
                        except OSError:
                            got = b""
                            break
                    try:
                        got = s.recv(1024)
                        break
                    except TimeoutError:
                        continue
                assert got == b"" and 1.5 < time.monotonic() - t0 < 15, (trickle, got, time.monotonic() - t0)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head.replace(b"Authorization: Bearer " + TOKEN.encode() + b"\r\n", b""))
            s.settimeout(10)
            t0, answer = time.monotonic(), b""
            while chunk := s.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 401") and time.monotonic() - t0 < 1.5, answer[:200]
        with httpx.Client(base_url=srv.url) as c:  # the service is unaffected
            assert c.get("/health").status_code == 200
    finally:
        stop_server(srv)


def test_row1_an_authorised_body_is_bounded_by_its_route(app_client) -> None:
    """/profile and /measure take small bodies (GAS_MAX_JSON_BODY_BYTES, 4 MiB): a larger one is
    a 413 before it is decoded, which would hold the interpreter lock for seconds; /table/import
    keeps the larger GAS_MAX_BODY_BYTES."""
    ok = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = b"[" + b"[]," * (2 * 2**20) + b"[]]"  # 6 MiB of tiny arrays
    for path in ("/profile", "/measure"):
        r = app_client.post(path, content=body, headers=ok)
        assert r.status_code == 413 and "GAS_MAX_JSON_BODY_BYTES" in r.json()["message"], (path, r.text[:200])
    r = app_client.post("/table/import", content=body, headers=ok)
    assert r.status_code == 422  # read and refused as not a table, not cut off by the small bound
