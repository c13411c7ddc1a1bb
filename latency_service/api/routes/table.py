from __future__ import annotations

import csv
import hashlib
import io
import math
import statistics
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from gas_core.keys import Dtype, MemoryFormat
from latency_service import crud
from latency_service.api.convert import ENTRY_FIELDS, device_row_public, entry_public
from latency_service.api.deps import HostDep, SessionDep
from latency_service.models import Device, Environment
from latency_service.schemas import (
    ComparePublic,
    DevicesPublic,
    DeviceSummary,
    EnvironmentPublic,
    TablePublic,
)

router = APIRouter(tags=["tables"])


def _device_env(session: SessionDep, slug: str, environment: str | None) -> tuple[Device, Environment]:
    dev = crud.get_device(session, slug=slug)
    if dev is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown device {slug!r}; see GET /devices")
    env = crud.get_environment(session, device=dev, fingerprint=environment)
    if env is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {slug!r} has no environment {environment!r}")
    return dev, env


@router.get(
    "/table/{device}",
    response_model=TablePublic,
    summary="A device's lookup table (newest environment unless one is named)",
    responses={
        200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"},
        304: {"description": "unchanged since the ETag in If-None-Match"},
        404: {"description": "unknown device or environment"},
    },
)
def table(
    device: str,
    session: SessionDep,
    host: HostDep,
    environment: str | None = None,
    dtype: Dtype | None = None,
    batch: Annotated[int | None, Query(ge=1)] = None,
    memory_format: MemoryFormat | None = None,
    op: str | None = None,
    format: Literal["json", "csv"] = "json",
    samples: bool = Query(False, description="include every raw sample (µs) of each row"),
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    dev, env = _device_env(session, device, environment)
    filters = dict(device_id=dev.id, environment_id=env.id, dtype=dtype, batch=batch, memory_format=memory_format,
                   op=op)
    version = crud.table_version(session, **filters)
    cache_key = (tuple(filters.items()), format, samples, version)
    cached = host.table_cache.get(cache_key)
    if cached is None:
        body, media = _render(session, dev, env, filters, format, samples)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        cached = host.table_cache.put(cache_key, (body, media, etag))
    body, media, etag = cached
    headers = {"ETag": etag, "X-GAS-Environment": env.fingerprint, "Cache-Control": "no-cache"}
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=body, media_type=media, headers=headers)


def _render(session: Session, dev: Device, env: Environment, filters: dict, format: str,
            samples: bool) -> tuple[bytes, str]:
    entries = [entry_public(r, samples) for r in crud.table_rows(session, **filters)]
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
            environment=EnvironmentPublic(fingerprint=env.fingerprint, info=env.info, entries=len(entries),
                                          created_at=env.created_at),
            entries=entries,
        )
        body, media = payload.model_dump_json().encode(), "application/json"
    return body, media


@router.get("/devices", response_model=DevicesPublic, summary="Every device in the database")
def devices(session: SessionDep) -> DevicesPublic:
    out = []
    for dev, envs in crud.device_summaries(session):
        out.append(DeviceSummary(
            **device_row_public(dev).model_dump(),
            environments=[EnvironmentPublic(fingerprint=e.fingerprint, info=e.info, entries=n, created_at=e.created_at)
                          for e, n in envs],
        ))
    return DevicesPublic(devices=out)


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    try:
        return statistics.correlation(ra, rb)
    except statistics.StatisticsError:
        return None


@router.get("/compare", response_model=ComparePublic, summary="Compare two devices' tables key by key",
            responses={404: {"description": "unknown device"}, 422: {"description": "not two devices"}})
def compare(
    session: SessionDep,
    devices: Annotated[str, Query(description="two device slugs, comma-separated: a,b")],
    dtype: Dtype | None = None,
    batch: Annotated[int | None, Query(ge=1)] = None,
    memory_format: MemoryFormat | None = None,
) -> ComparePublic:
    slugs = [s.strip() for s in devices.split(",") if s.strip()]
    if len(slugs) != 2:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "devices: give exactly two slugs, a,b")
    tables = []
    for slug in slugs:
        dev, env = _device_env(session, slug, None)
        rows = crud.table_rows(session, device_id=dev.id, environment_id=env.id, dtype=dtype, batch=batch,
                               memory_format=memory_format)
        tables.append({r.key: (r.op, r.median_us) for r in rows})
    common = sorted(set(tables[0]) & set(tables[1]))
    ratios = {k: tables[1][k][1] / tables[0][k][1] for k in common if tables[0][k][1] > 0}
    per_op: dict[str, list[float]] = {}
    for k, r in ratios.items():
        per_op.setdefault(tables[0][k][0], []).append(r)
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios.values())) if ratios else float("nan")
    return ComparePublic(
        devices=(slugs[0], slugs[1]),
        common_keys=len(common),
        geomean_ratio=geo,
        spearman=spearman([tables[0][k][1] for k in common], [tables[1][k][1] for k in common]),
        per_op={op: {"geomean_ratio": math.exp(statistics.fmean(math.log(r) for r in rs)), "keys": len(rs)}
                for op, rs in sorted(per_op.items())},
        ratios=ratios,
    )
