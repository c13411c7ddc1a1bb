from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.concurrency import run_in_threadpool

from gas_core.wire import JobPublic, JobState, ProfileRequest
from latency_service import job_state
from latency_service.api.convert import job_public
from latency_service.api.deps import (
    READ_RESPONSES,
    TOKEN_RESPONSES,
    ClientDep,
    HostDep,
    ReadDep,
    SessionDep,
    TokenDep,
)
from latency_service.bounds import Overloaded, RequestError
from latency_service.models import Device, Environment, Job

router = APIRouter(tags=["jobs"])


def _public(session: SessionDep, job: Job) -> JobPublic:
    dev = session.get(Device, job.device_id)
    env = session.get(Environment, job.environment_id)
    return job_public(job, dev.slug if dev else "?", env.fingerprint if env else "?")


WORKER_RESTART_RETRY_S = 3
"""Retry-After while the worker process restarts: its pause (1 s) and a start-up."""


@router.post(
    "/profile", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED, dependencies=[TokenDep],
    summary="Queue a profiling job on this host's device",
    responses={200: {"model": JobPublic, "description": "an identical job is already queued or running"},
               415: {"description": "the body is not sent as application/json"},
               422: {"description": "a key or bound is invalid (GAS_MAX_KEYS_PER_JOB among them); the message "
                                    "names the field"},
               429: {"description": "this client already holds GAS_MAX_JOBS_PER_CLIENT queued or running jobs; "
                                    "Retry-After says when to try again"},
               503: {"description": "GAS_MAX_QUEUED_KEYS keys already wait for the device, or the device worker is "
                                    "down; Retry-After says when to try again"},
               **TOKEN_RESPONSES},
)
async def profile(req: ProfileRequest, host: HostDep, client: ClientDep, response: Response) -> JobPublic:
    """Keys already stored for this device and environment are skipped unless ``force``. An
    identical request while one is queued or running returns that job (200, not 202). Queued
    work is bounded before anything is stored: keys per job, jobs per client (its bearer token,
    else its address) and keys waiting for the device."""
    # a request resent while its job is active is answered here, on the event loop; otherwise
    # one thread-pool hop for the database. The job is this host's, so its device and
    # environment need no query. (Under 64 clients the thread hops, not the work, were the cost.)
    known = host.known_active_job(req)
    if known is None and not host.worker.alive():
        if host.worker.restarting():
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the device worker is restarting; retry in a "
                                "few seconds", headers={"Retry-After": str(WORKER_RESTART_RETRY_S)})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the device worker is down (see GET /health and "
                            "the service log); no job would run until the service restarts",
                            headers={"Retry-After": "60"})
    try:
        job, created = (known, False) if known is not None else await run_in_threadpool(
            host.submit_profile, req, client)
    except RequestError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
    except Overloaded as err:
        raise HTTPException(err.status, str(err), headers={"Retry-After": str(err.retry_after_s)}) from None
    if not created:
        response.status_code = status.HTTP_200_OK
    return job_public(job, host.device.slug, host.env.fingerprint)


@router.get("/jobs", response_model=list[JobPublic], summary="Recent jobs, newest first", dependencies=[ReadDep],
            responses=READ_RESPONSES)
def jobs(
    session: SessionDep, state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[JobPublic]:
    return [_public(session, j) for j in job_state.list_jobs(session, state=state, limit=limit)]


@router.get("/jobs/{job_id}", response_model=JobPublic, dependencies=[ReadDep],
            responses={404: {"description": "no such job"}, **READ_RESPONSES})
def job(job_id: str, session: SessionDep) -> JobPublic:
    found = job_state.get(session, job_id=job_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} not found")
    return _public(session, found)


@router.delete("/jobs/{job_id}", response_model=JobPublic, dependencies=[TokenDep],
               responses={404: {"description": "no such job"},
                          409: {"description": "the job has already ended (done, failed or cancelled)"},
                          **TOKEN_RESPONSES},
               summary="Cancel a queued or running job")
def cancel(job_id: str, session: SessionDep, host: HostDep) -> JobPublic:
    """Measurements already stored stay; the key in flight finishes and is kept."""
    found = job_state.get(session, job_id=job_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} not found")
    if found.state not in job_state.ACTIVE:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id!r} has already ended ({found.state})")
    job = job_state.cancel(session, job=found)
    host.job_ended(job.request_hash)
    if job.state != "cancelled":  # it ended between the read and the update
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id!r} has already ended ({job.state})")
    return _public(session, job)
