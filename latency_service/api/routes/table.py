from __future__ import annotations

import csv
import io
import logging
from collections.abc import Hashable
from dataclasses import asdict
from typing import Annotated, Any, Literal

import anyio.to_process
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from gas_core.keys import INT32_MAX, Dtype, MemoryFormat, Runtime
from gas_core.table import LatencyTable, compare_tables
from gas_core.wire import (
    ComparePublic,
    DevicesPublic,
    DeviceSummary,
    FieldProblem,
    ImportPublic,
    PairComparison,
    TablePublic,
    TableRef,
    split_ref,
)
from latency_service import crud, importer
from latency_service.api.convert import ENTRY_FIELDS, device_row_public, entry_public, environment_public
from latency_service.api.deps import READ_RESPONSES, TOKEN_RESPONSES, HostDep, ReadDep, SessionDep, TokenDep
from latency_service.api.errors import BODY_MODELS, error_body
from latency_service.api.fastpath import raw_request_key
from latency_service.api.table_cache import Rendered, TableScope
from latency_service.models import Device, Environment
from latency_service.service import Host

log = logging.getLogger(__name__)
router = APIRouter(tags=["tables"])


def _device_env(session: SessionDep, slug: str, environment: str | None) -> tuple[Device, Environment]:
    dev = crud.get_device(session, slug=slug)
    if dev is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown device {slug!r}; see GET /devices")
    env = crud.get_environment(session, device=dev, fingerprint=environment)
    if env is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {slug!r} has no environment {environment!r}")
    return dev, env


# /table/import is registered before /table/{device}: the other order let "{device}" capture
# "import", and OPTIONS /table/import answered 405 with Allow: GET.
IMPORT_BODY = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LatencyTable"}}}}
BODY_MODELS.append(LatencyTable)
"""The body's schema, declared here: the route reads raw bytes (decoded in a worker process,
latency_service/importer.py), so FastAPI cannot derive it from a parameter."""


@router.post(
    "/table/import", response_model=ImportPublic, dependencies=[TokenDep],
    openapi_extra={"x-large-body": True, "requestBody": IMPORT_BODY},
    summary="Merge an exported table (gas-table export) into this database",
    responses={400: {"description": "the body is not JSON"},
               415: {"description": "the body is not sent as application/json"},
               409: {"description": "the file's device conflicts with the stored one, the environment holds rows "
                                    "this service measured (force=true imports anyway), or a concurrent write"},
               422: {"description": "not a version-1 GAS latency table, or an inconsistent row"}, **TOKEN_RESPONSES},
)
async def import_table(
    request: Request, host: HostDep,
    force: Annotated[bool, Query(description="let the file's rows replace stored ones whatever their dates, and "
                                 "import into an environment this service measured")] = False,
) -> Response:
    """The file is decoded, checked and merged in a worker process, so a large file never holds
    the other requests (latency_service/importer.py)."""
    body = await request.body()
    out = await anyio.to_process.run_sync(importer.import_file, body, host.settings.database_url, force,
                                          host.settings.quality_policy(), cancellable=False)
    if out.status != 200:
        return JSONResponse(status_code=out.status, content=error_body(out.message, [FieldProblem.model_validate(d)
                                                                                     for d in out.detail]))
    host.table_cache.invalidate()
    log.info("imported %s@%s: %s", out.device, out.environment, out.counts)
    return JSONResponse(ImportPublic(device=out.device, environment=out.environment, **out.counts)
                        .model_dump(mode="json"))


class TableQuery(BaseModel):
    """The query of ``GET /table/{device}``: which environment, which rows, which format. Frozen,
    so one value keys the rendered-response cache."""

    model_config = ConfigDict(frozen=True)
    environment: str | None = Field(None, description="environment fingerprint; the newest when omitted")
    dtype: Dtype | None = None
    batch: int | None = Field(None, ge=1, le=INT32_MAX)
    memory_format: MemoryFormat | None = None
    op: str | None = Field(None, description="only this op's rows")
    runtime: Runtime | None = Field(None, description="only this runtime's rows")
    format: Literal["json", "csv"] = "json"
    samples: bool = Field(False, description="include every raw sample (µs) of each row")


@router.get(
    "/table/{device}",
    response_model=TablePublic,
    summary="A device's lookup table (newest environment unless one is named)",
    dependencies=[ReadDep],
    responses={
        **READ_RESPONSES,
        200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"},
        304: {"description": "unchanged since the ETag in If-None-Match"},
        404: {"description": "unknown device or environment"},
    },
)
async def table(
    request: Request,
    device: str,
    query: Annotated[TableQuery, Query()],
    host: HostDep,
    if_none_match: Annotated[str | None, Header()] = None,
    accept_encoding: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Served from pre-rendered bytes (JSON or CSV, plain and gzip) whenever the table's version
    is known: for ``GAS_TABLE_VERSION_TTL_S`` after it was read, or until this host writes a row
    (then the cached-read fast path answers repeats of this exact request before routing,
    docs/architecture.md). Only then are the device, environment and version looked up again
    (on a worker thread), and the table re-rendered only when its version changed."""
    key = raw_request_key(request.scope)
    rendered = await host.table_cache.current(
        key, lambda generation: run_in_threadpool(_current, host, device, query, key, generation))
    code, headers, body = rendered.answer(if_none_match, accept_encoding)
    return Response(content=body, status_code=code, headers=headers)


def _current(host: Host, device: str, query: TableQuery, request_key: Hashable, generation: int) -> Rendered:
    """The table's current version, rendered (from the cache when that version was seen)."""
    with host.sessions() as session:
        dev, env = _device_env(session, device, query.environment)
        scope = TableScope(dev.id, env.id, query.dtype, query.batch, query.memory_format, query.op, query.runtime)
        filters: dict[str, Any] = asdict(scope)
        version = (tuple(filters.items()), query.format, query.samples, crud.table_version(session, **filters))
        rendered = host.table_cache.rendered(version)
        if rendered is None:
            body, media = _render(session, dev, env, filters, query.format, query.samples)
            rendered = host.table_cache.put(version, Rendered.of(body, media, env.fingerprint))
    host.table_cache.remember(request_key, rendered, generation, scope)
    return rendered


def _render(session: Session, dev: Device, env: Environment, filters: dict, format: str,
            samples: bool) -> tuple[bytes, str]:
    entries = [entry_public(r, samples) for r in crud.table_rows(session, **filters, with_samples=samples)]
    if format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=ENTRY_FIELDS)
        writer.writeheader()
        for e in entries:
            writer.writerow(e.model_dump(include=set(ENTRY_FIELDS), mode="json"))
        body, media = buf.getvalue().encode(), "text/csv"
    else:
        payload = TablePublic(
            device=device_row_public(dev),
            environment=environment_public(env, len(entries)),
            entries=entries,
        )
        body, media = payload.model_dump_json().encode(), "application/json"
    return body, media


@router.get("/devices", response_model=DevicesPublic, summary="Every device in the database", dependencies=[ReadDep],
            responses=READ_RESPONSES)
def devices(session: SessionDep) -> DevicesPublic:
    out = []
    for dev, envs in crud.device_summaries(session):
        out.append(DeviceSummary(
            **device_row_public(dev).model_dump(),
            environments=[environment_public(e, n) for e, n in envs],
        ))
    return DevicesPublic(devices=out)


MAX_COMPARE = 8


def _table_ref(session: Session, ref: str) -> tuple[Device, Environment]:
    """``slug`` (its newest environment) or ``slug@fingerprint``."""
    try:
        slug, fp = split_ref(ref)
    except ValueError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    return _device_env(session, slug, fp)


@router.get(
    "/compare", response_model=ComparePublic, summary="Compare devices' (or environments') tables key by key",
    dependencies=[ReadDep],
    responses={**READ_RESPONSES, 404: {"description": "unknown device or environment"},
               422: {"description": "fewer than two tables, more than 8, or one named twice"}},
)
def compare(
    session: SessionDep,
    devices: Annotated[str, Query(description="comma-separated tables, each a device slug (its newest environment) "
                                              "or slug@environment; at least two. Ratios are later / earlier")],
    dtype: Dtype | None = None,
    batch: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
    memory_format: MemoryFormat | None = None,
    op: str | None = None,
    runtime: Runtime | None = None,
) -> ComparePublic:
    refs = [r.strip() for r in devices.split(",") if r.strip()]
    if not 2 <= len(refs) <= MAX_COMPARE:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"devices: give 2 to {MAX_COMPARE} comma-separated tables (slug or slug@environment), "
                            f"got {len(refs)}")
    tables, seen = [], set()
    for ref in refs:
        dev, env = _table_ref(session, ref)
        if (dev.id, env.id) in seen:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"devices: {ref!r} names a table already listed ({dev.slug}@{env.fingerprint})")
        seen.add((dev.id, env.id))
        rows = crud.table_rows(session, device_id=dev.id, environment_id=env.id, dtype=dtype, batch=batch,
                               memory_format=memory_format, op=op, runtime=runtime)
        tables.append((TableRef(device=dev.slug, environment=env.fingerprint, entries=len(rows)),
                       {r.key: (r.op, r.median_us) for r in rows}))
    pairs = [
        PairComparison(a=ra, b=rb, **compare_tables(ta, tb).model_dump())
        for i, (ra, ta) in enumerate(tables) for rb, tb in tables[i + 1:]
    ]
    return ComparePublic(tables=[t[0] for t in tables], pairs=pairs)
