"""Hardening, third round (docs/security.md): one test per row of the probe that found it."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

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


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory):
    """The real app on SQLite through FastAPI's TestClient (lifespan, migrations, a worker thread):
    no server process."""
    from fastapi.testclient import TestClient

    from latency_service.core.config import Settings
    from latency_service.main import create_app

    db = tmp_path_factory.mktemp("h3") / "gas.db"
    settings = Settings(database_url=f"sqlite:///{db}", api_token=TOKEN, device="cpu", worker_process=False,
                        cpu_threads=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
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
