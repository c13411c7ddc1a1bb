"""The service's hot paths under load (bench/service_load.py): remembered table reads answered
before routing, invalidated only by writes to the rows they read; a resent /profile answered from
memory while its job is active. Behaviour only: no timing."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch

from gas_core.keys import LatencyKey
from gas_core.search_space import NetworkLayout
from gas_core.wire import ProfileRequest
from latency_service.api.fastpath import CachedTableReads
from latency_service.api.table_cache import Rendered, TableCache, TableScope, TableWrite
from latency_service.core.config import Settings
from latency_service.jobs import Trust
from latency_service.profiler import Method, Timing
from latency_service.service import Host
from latency_service.testing import stop_server, wait_job
from tests.support import start_server, worker_rig

TINY = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=16, num_classes=4)
KEY = LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8, w=8, stride=1, batch=1)


def _write(device_id: int = 1, **fields: Any) -> TableWrite:
    return TableWrite(device_id=device_id, environment_id=1, key=KEY.model_copy(update=fields))


def test_a_remembered_read_survives_writes_elsewhere_and_not_to_its_rows() -> None:
    cache = TableCache(ttl_s=3600)
    table = Rendered.of(b'{"entries": []}', "application/json", "env")
    scope = TableScope(device_id=1, environment_id=1, batch=1, dtype="float32")
    cache.remember("batch1", table, cache.generation, scope)
    cache.invalidate(_write(batch=2))  # another batch
    cache.invalidate(_write(device_id=2))  # another device of a fleet database
    cache.invalidate(_write(dtype="float16"))
    assert cache.recent("batch1") is table
    cache.invalidate(_write(batch=1))  # a row it reads
    assert cache.recent("batch1") is None
    cache.remember("batch1", table, cache.generation, scope)
    cache.invalidate(None)  # rows nobody can name (an import, flags on a stretch of keys)
    assert cache.recent("batch1") is None


def test_a_lookup_that_raced_a_write_is_not_remembered_as_current() -> None:
    cache = TableCache(ttl_s=3600)
    table = Rendered.of(b"{}", "application/json", "env")
    before = cache.generation  # read before the database lookup
    cache.invalidate(_write(batch=1))  # lands while the lookup runs
    cache.remember("r", table, before, TableScope(1, 1))
    assert cache.recent("r") is None


def test_an_answer_older_than_the_write_log_is_stale() -> None:
    cache = TableCache(ttl_s=3600)
    cache.remember("r", Rendered.of(b"{}", "application/json", "env"), cache.generation, TableScope(1, 1, batch=1))
    for _ in range(TableCache.WRITE_LOG + 1):
        cache.invalidate(_write(batch=2))  # none touches it, but the log no longer reaches back
    assert cache.recent("r") is None


def test_expired_answers_are_not_served() -> None:
    cache = TableCache(ttl_s=0)
    cache.remember("r", Rendered.of(b"{}", "application/json", "env"), cache.generation, TableScope(1, 1))
    assert cache.recent("r") is None


class _Inner:
    """The application behind the fast path: records that it was reached."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _get(mw: CachedTableReads, host: Any, query: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/table/cpu", "query_string": query,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "app": SimpleNamespace(state=SimpleNamespace(host=host))}
    asyncio.run(mw(scope, receive, send))  # type: ignore[arg-type]
    return sent[0]["status"], {k.decode(): v.decode() for k, v in sent[0]["headers"]}, sent[1]["body"]


def test_fast_path_serves_what_the_route_remembered_and_never_decides_auth() -> None:
    body = b'{"entries": [1, 2, 3]}' * 200
    table = Rendered.of(body, "application/json", "env1")
    host = SimpleNamespace(settings=Settings(), table_cache=TableCache(ttl_s=3600))
    host.table_cache.remember(("/table/cpu", b"batch=1"), table, 0, TableScope(1, 1, batch=1))
    inner = _Inner()
    mw = CachedTableReads(inner)

    code, headers, got = _get(mw, host, b"batch=1", {"Accept-Encoding": "gzip, deflate"})
    assert (code, inner.calls) == (200, 0)
    assert gzip.decompress(got) == body and headers["content-encoding"] == "gzip"
    assert headers["etag"] == table.etag and headers["x-gas-environment"] == "env1"
    assert headers["content-length"] == str(len(got)) and headers["vary"] == "Accept-Encoding"
    code, headers, got = _get(mw, host, b"batch=1", {})
    assert code == 200 and got == body and "content-encoding" not in headers
    code, headers, got = _get(mw, host, b"batch=1", {"If-None-Match": f'W/{table.etag}'})
    assert code == 304 and got == b"" and inner.calls == 0
    _get(mw, host, b"batch=2", {})  # never answered by the route: not served here
    assert inner.calls == 1

    host.settings = Settings(read_token="r3ad", api_token="wr1te")
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic r3ad"}):
        code, _, _ = _get(mw, host, b"batch=1", auth)
        assert code == 401  # passed on: the route answers 401/403
    assert inner.calls == 4
    for token in ("r3ad", "wr1te"):
        code, _, got = _get(mw, host, b"batch=1", {"Authorization": f"Bearer {token}"})
        assert code == 200 and got == body
    assert inner.calls == 4


def test_the_worker_names_each_stored_key_and_reports_the_end_of_its_job(tmp_path: Path) -> None:
    keys = [KEY.model_copy(update={"w": 8 * (i + 1)}) for i in range(3)]

    def timer(key: LatencyKey, dev: torch.device, method: Method) -> Timing:
        if key == keys[1]:
            raise ValueError("unsupported here")
        return Timing(samples_us=[10.0, 10.1, 10.2, 9.9, 10.0], iters_per_sample=1, timer="fake", timed_ns=0)

    rig = worker_rig(f"sqlite:///{tmp_path / 'w.db'}", keys, trust=Trust(), timer=timer,
                     reference=lambda d: [Timing([1.0, 1.0, 1.0], 1, "fake", 0)])
    written: list[LatencyKey | None] = []
    ended: list[bool] = []
    rig.worker.on_write = written.append
    rig.worker.on_job_end = lambda request_hash: ended.append(request_hash is not None)
    with rig.session:
        rig.worker._job_step()
    assert written == [keys[0], keys[2]]  # the failed key wrote no row
    assert ended == [True]
    rig.engine.dispose()


def test_a_resent_profile_request_is_answered_from_memory_while_its_job_is_active(tmp_path: Path) -> None:
    host = Host.start(Settings(database_url=f"sqlite:///{tmp_path / 'p.db'}", device="cpu"), run_worker=False)
    try:
        req = ProfileRequest(layout=NetworkLayout(), input_size=(64, 128))
        assert host.known_active_job(req) is None  # never seen
        job, created = host.submit_profile(req)
        assert created and host.known_active_job(ProfileRequest(layout=NetworkLayout(), input_size=(64, 128))) is job
        assert host.known_active_job(ProfileRequest(layout=NetworkLayout(), input_size=(64, 130))) is None
        host.job_ended()  # this host's worker finished or cancelled a job
        assert host.known_active_job(req) is None
        again, created = host.submit_profile(req)  # the database still says queued: the same job
        assert not created and again.id == job.id and host.known_active_job(req) is again
    finally:
        host.close()


@pytest.mark.slow
def test_fast_and_routed_table_reads_agree_and_a_write_is_seen(tmp_path: Path) -> None:
    srv = start_server(f"sqlite:///{tmp_path / 'l.db'}", tmp_path, {"GAS_TABLE_VERSION_TTL_S": "3600"})
    try:
        with srv.client() as c:
            layout = TINY.model_dump(mode="json")
            wait_job(c, c.post("/profile", json={"layout": layout, "input_size": [16, 32]}).json()["id"])
            slug = c.get("/device").json()["device"]["slug"]
            first = c.get(f"/table/{slug}", params={"batch": 1})  # through the route
            second = c.get(f"/table/{slug}", params={"batch": 1})  # remembered: the fast path
            assert second.content == first.content
            for h in ("etag", "content-type", "content-encoding", "vary", "cache-control", "x-gas-environment"):
                assert second.headers.get(h) == first.headers.get(h), h
            n = len(first.json()["entries"])
            wait_job(c, c.post("/profile", json={"layout": layout, "input_size": [16, 48]}).json()["id"])
            third = c.get(f"/table/{slug}", params={"batch": 1})  # TTL of an hour: only the write can tell
            assert third.headers["etag"] != first.headers["etag"] and len(third.json()["entries"]) > n
            assert c.get(f"/table/{slug}", params={"batch": 1}, headers={"If-None-Match": third.headers["etag"]}
                         ).status_code == 304
    finally:
        stop_server(srv)


@pytest.mark.slow
def test_read_token_still_guards_remembered_reads(tmp_path: Path) -> None:
    srv = start_server(f"sqlite:///{tmp_path / 't.db'}", tmp_path,
                       {"GAS_TABLE_VERSION_TTL_S": "3600", "GAS_READ_TOKEN": "r3ad", "GAS_API_TOKEN": "wr1te"})
    try:
        auth = {"Authorization": "Bearer wr1te"}
        with srv.client(headers=auth) as c:
            layout = TINY.model_dump(mode="json")
            wait_job(c, c.post("/profile", json={"layout": layout, "input_size": [16, 32]}).json()["id"])
            slug = c.get("/device").json()["device"]["slug"]
            assert c.get(f"/table/{slug}").status_code == 200  # remembered now
            assert httpx.get(f"{srv.url}/table/{slug}").status_code == 401
            assert httpx.get(f"{srv.url}/table/{slug}", headers={"Authorization": "Bearer nope"}).status_code == 403
            assert httpx.get(f"{srv.url}/table/{slug}", headers={"Authorization": "Bearer r3ad"}).status_code == 200
    finally:
        stop_server(srv)
