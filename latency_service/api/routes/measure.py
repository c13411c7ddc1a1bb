from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, HTTPException, Request, Response, status

from gas_core.wire import MeasurePublic, MeasureRequest
from latency_service.api.deps import TOKEN_RESPONSES, HostDep, TokenDep
from latency_service.bounds import RequestError
from latency_service.jobs import QueueFull

router = APIRouter(tags=["measure"])
log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25


@router.post(
    "/measure", response_model=MeasurePublic, dependencies=[TokenDep],
    summary="Time a derived network end to end, with the table's prediction beside it",
    responses={415: {"description": "the body is not sent as application/json"},
               422: {"description": "malformed genotype or a bound exceeded; the message names the field"},
               503: {"description": "GAS_MEASURE_QUEUE measurements already wait for the device; retry after "
                                    "the Retry-After seconds"},
               **TOKEN_RESPONSES},
)
async def measure(req: MeasureRequest, host: HostDep, request: Request) -> MeasurePublic | Response:
    """Runs on the device worker, alternating with the keys of any running profiling job, so it
    never overlaps another timing on this device. ``predicted_ms`` is null when the table lacks
    keys of this network; ``missing_keys`` lists them. At most ``GAS_MEASURE_QUEUE`` wait; a
    client that disconnects before its measurement starts takes it off the queue."""
    try:
        host.check_measure_bounds(req)
    except RequestError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
    try:
        fut = host.worker.submit_measure(req, limit=host.settings.measure_queue)
    except QueueFull as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err), headers={"Retry-After": "5"}) from None
    waiting = asyncio.wrap_future(fut)
    while not waiting.done():
        await asyncio.wait([waiting], timeout=DISCONNECT_POLL_S)
        if not waiting.done() and await request.is_disconnected():
            if fut.cancel():
                log.info("measure cancelled before it ran: the client disconnected")
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    return waiting.result()
