from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, status

from latency_service.api.deps import TOKEN_RESPONSES, HostDep, TokenDep
from latency_service.schemas import MeasurePublic, MeasureRequest
from latency_service.service import RequestError

router = APIRouter(tags=["measure"])


@router.post(
    "/measure", response_model=MeasurePublic, dependencies=[TokenDep],
    summary="Time a derived network end to end, with the table's prediction beside it",
    responses={422: {"description": "malformed genotype or a bound exceeded; the message names the field"},
               **TOKEN_RESPONSES},
)
async def measure(req: MeasureRequest, host: HostDep) -> MeasurePublic:
    """Runs on the device worker, between two keys of any running profiling job, so it never
    overlaps another timing on this device. ``predicted_ms`` is null when the table lacks keys
    of this network; ``missing_keys`` lists them."""
    try:
        host.check_measure_bounds(req)
    except RequestError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
    return await asyncio.wrap_future(host.worker.submit(lambda: host.measure(req)))
