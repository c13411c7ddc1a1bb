"""A fleet: several service processes writing to one PostgreSQL, and the docker-compose files
that deploy one (parsed and checked, since Docker cannot run here)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from alembic.script import ScriptDirectory
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from gas_core.search_space import NetworkLayout, cell_shapes
from latency_service import db
from latency_service.core.config import Settings
from latency_service.models import Environment, Measurement
from latency_service.testing import PgCluster, stop_server, wait_job
from tests.support import start_server

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = NetworkLayout(num_cells=4, reduction_cells=(1, 2), stem_channels=(8, 8, 8), head_channels=16, num_classes=4)
REQ = {"layout": LAYOUT.model_dump(mode="json"), "input_size": [32, 64]}


def _resolve(value: str) -> str:
    """``${VAR:-default}`` → default, as compose does with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


@pytest.mark.postgres
@pytest.mark.slow
def test_two_services_share_one_postgres(pg_cluster: PgCluster, tmp_path: Path) -> None:
    """Two environments of this host (1 and 2 torch threads) start together on a fresh database
    (concurrent migrations), profile the same keys at the same time, and both tables come out
    complete, with no row lost or duplicated; /compare answers between them. A third host in the
    first environment shares its queue: the same request sent to both hosts is one job, run once."""
    url = pg_cluster.create_db()
    n = len(cell_shapes(LAYOUT, (32, 64)).all_keys())
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda tw: start_server(url, tmp_path, {"GAS_CPU_THREADS": str(tw[0]),
                                                                        "GAS_WORKER_ID": tw[1]}),
                                [(1, "node-1"), (2, "node-2"), (1, "node-1b")]))
    try:
        envs = []
        for srv in servers:
            with srv.client() as c:
                envs.append(c.get("/device").json())
        slug = envs[0]["device"]["slug"]
        fps = [e["environment"]["fingerprint"] for e in envs]
        assert envs[1]["device"]["slug"] == slug and fps[0] != fps[1] and fps[2] == fps[0]

        def profile(srv):  # type: ignore[no-untyped-def]
            with srv.client() as c:
                r = c.post("/profile", json=REQ)
                assert r.status_code in (200, 202), r.text  # 200: the identical active job, already queued
                return wait_job(c, r.json()["id"], timeout=300)

        with ThreadPoolExecutor(3) as pool:
            jobs = list(pool.map(profile, servers))
        assert [j["state"] for j in jobs] == ["done"] * 3 and [j["done"] for j in jobs] == [n] * 3
        assert jobs[0]["id"] == jobs[2]["id"] != jobs[1]["id"]  # one job per (environment, request)
        assert jobs[0]["environment"] == fps[0] and jobs[1]["environment"] == fps[1]
        assert jobs[0]["owner"] in ("node-1", "node-1b") and jobs[1]["owner"] == "node-2"  # timed in its environment

        with servers[0].client() as c:
            devices = c.get("/devices").json()["devices"]
            assert [d["slug"] for d in devices] == [slug]
            assert sorted((e["fingerprint"], e["entries"]) for e in devices[0]["environments"]) == sorted(
                (fp, n) for fp in set(fps))
            r = c.get("/compare", params={"devices": f"{slug}@{fps[0]},{slug}@{fps[1]}"})
            assert r.status_code == 200, r.text
            pair = r.json()["pairs"][0]
        assert pair["common_keys"] == n and pair["only_a"] == pair["only_b"] == 0
        assert pair["geomean_ratio"] > 0 and pair["kendall"] is not None
        with servers[1].client() as c:  # the other host serves the same data
            assert len(c.get(f"/table/{slug}", params={"environment": fps[0]}).json()["entries"]) == n
    finally:
        for srv in servers:
            stop_server(srv)
    engine = db.make_engine(url)
    with db.session_factory(engine)() as s:
        for fp in fps:
            env_id = s.scalar(select(Environment.id).where(Environment.fingerprint == fp))
            q = select(func.count(), func.count(func.distinct(Measurement.key_hash))).where(
                Measurement.environment_id == env_id)
            assert tuple(s.execute(q).one()) == (n, n)
        keys_by_env = [set(s.scalars(select(Measurement.key).join(Environment).where(Environment.fingerprint == fp)))
                       for fp in fps]
    engine.dispose()
    assert keys_by_env[0] == keys_by_env[1] == {k.canonical for k in cell_shapes(LAYOUT, (32, 64)).all_keys()}


def test_compose_file_wires_postgres_and_the_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "latency-service"}
    pg, svc = services["db"], services["latency-service"]

    # PostgreSQL: persistent named volume and a health check on the same user and database
    assert pg["image"].startswith("postgres:")
    pg_env = {k: _resolve(v) for k, v in pg["environment"].items()}
    volume, _, mount = pg["volumes"][0].partition(":")
    assert mount == "/var/lib/postgresql/data" and volume in compose["volumes"]
    check = " ".join(pg["healthcheck"]["test"])
    assert "pg_isready" in check and f"-U {pg_env['POSTGRES_USER']}" in check and f"-d {pg_env['POSTGRES_DB']}" in check

    # the service: built here, started once the database is healthy, pointed at it
    assert svc["build"]["context"] == "." and (ROOT / svc["build"].get("dockerfile", "Dockerfile")).is_file()
    assert svc["depends_on"]["db"]["condition"] == "service_healthy"
    env = {k: _resolve(v) for k, v in svc["environment"].items()}
    fields = {f"GAS_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"unknown settings {set(env) - fields}"  # a typo would be silently ignored
    settings = Settings(**{k[4:].lower(): v for k, v in env.items()})
    assert settings.api_token is None  # GAS_API_TOKEN= empty means no token
    assert settings.db_wait_s > 0
    dburl = make_url(settings.database_url)
    assert dburl.drivername == "postgresql+psycopg" and dburl.host == "db" and dburl.port == 5432
    assert (dburl.username, dburl.password, dburl.database) == (
        pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])

    # the published port is the one the image serves on
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r'^CMD \[(.*)\]$', dockerfile, re.M)
    assert cmd is not None and '"gas-service", "serve"' in cmd.group(1)
    served = re.search(r'"--port", "(\d+)"', cmd.group(1))
    assert served is not None and _resolve(svc["ports"][0]).split(":")[-1] == served.group(1)
    # torch is installed from the chosen index before the package (so pip never pulls CUDA on CPU)
    assert dockerfile.index("--index-url") < dockerfile.index("pip install .")
    assert "COPY migrations migrations" in dockerfile

    # NVIDIA override: a CUDA torch index and the GPU reserved for the service
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["latency-service"]
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert "/cu" in _resolve(gpu["build"]["args"]["TORCH_INDEX_URL"])
    assert Settings(device=gpu["environment"]["GAS_DEVICE"]).device == "cuda:0"


@pytest.mark.postgres
@pytest.mark.timeout(120)  # without the lock the upgrades deadlock rather than fail
def test_concurrent_migrations_of_one_database(pg_cluster: PgCluster) -> None:
    """Fleet hosts start together: their ``alembic upgrade head`` runs are serialised by an
    advisory lock, so none fails on tables another is creating."""
    url = pg_cluster.create_db()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: db.migrate(url), range(4)))
    head = ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert head is not None and conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head
    engine.dispose()
