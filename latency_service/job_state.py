"""The profiling job's state machine: every read and every write of a :class:`Job` row.

::

    queued ──claim──▶ running ──finish──▶ done | failed
      │                 │ ▲
      │                 │ └─ claim by another host once the heartbeat is older than job_stale_s
      │                 ├─ progress / record_reference: done+1, heartbeat, counters (state kept)
      │                 ├─ fail_key: the worker process died on key ``done``; count it failed
      │                 └─ fail_running: the worker is gone for good ──▶ failed
      └──────── cancel (DELETE /jobs/{id}) ──────────────────────────▶ cancelled

Every write is a compare-and-swap on the row's state and owner (and, for a claim, its
heartbeat), so a DELETE or a take-over by another host of a fleet always wins over a worker
that stalled: its late write changes no row and is rolled back. Sessions are passed in; each
function commits (or rolls back) its own change unless it says otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from gas_core.keys import LatencyKey
from gas_core.quality import HostNoise
from latency_service.crud import rows_changed
from latency_service.models import Job, utcnow

ACTIVE = ("queued", "running")


def find_active(session: Session, *, request_hash: str) -> Job | None:
    """The queued or running job of this request, without its key list (loaded on access): a
    resent ``/profile`` answers with the job's progress, and decoding thousands of keys per
    request was most of that route's cost under load."""
    q = select(Job).options(defer(Job.keys)).where(Job.request_hash == request_hash, Job.state.in_(ACTIVE))
    return session.scalar(q)


def create(
    session: Session, *, device_id: int, environment_id: int, request_hash: str, keys: list[LatencyKey], force: bool,
    client: str | None = None,
) -> tuple[Job, bool]:
    """(job, created). An identical request already queued or running returns that job; the
    partial unique index on ``request_hash`` makes this hold across processes too. When a
    concurrent identical request wins the insert and its job has already ended (all its keys
    were stored), the insert is simply tried again."""
    for _ in range(5):
        existing = find_active(session, request_hash=request_hash)
        if existing is not None:
            return existing, False
        job = Job(
            id=str(uuid.uuid4()), device_id=device_id, environment_id=environment_id, request_hash=request_hash,
            state="queued", keys=[k.canonical for k in keys], force=force, total=len(keys), done=0, skipped=0,
            errors=[], client=client,
        )
        session.add(job)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        return job, True
    raise RuntimeError(f"could not queue the job for request {request_hash[:12]}: it kept racing identical requests")


def active_jobs_of(session: Session, *, client: str) -> int:
    """Queued or running jobs that ``client`` queued (any device of the database)."""
    return int(session.scalar(select(func.count(Job.id)).where(Job.client == client, Job.state.in_(ACTIVE))) or 0)


def queued_keys_of(session: Session, *, client: str) -> int:
    """Keys not yet processed over ``client``'s queued and running jobs (any device)."""
    q = select(func.coalesce(func.sum(Job.total - Job.done), 0)).where(Job.client == client, Job.state.in_(ACTIVE))
    return int(session.scalar(q) or 0)


def queued_keys(session: Session, *, device_id: int, environment_id: int) -> int:
    """Keys not yet processed over the queued and running jobs of one (device, environment)."""
    q = select(func.coalesce(func.sum(Job.total - Job.done), 0)).where(
        Job.device_id == device_id, Job.environment_id == environment_id, Job.state.in_(ACTIVE))
    return int(session.scalar(q) or 0)


def fail_running(session: Session, *, owner: str, reason: str) -> list[str]:
    """Mark ``owner``'s running jobs failed with ``reason`` (its device worker is gone for good, so
    nothing will advance them); returns their ids. Commits."""
    jobs = session.scalars(select(Job).where(Job.state == "running", Job.owner == owner)).all()
    for job in jobs:
        session.execute(update(Job).where(Job.id == job.id, Job.state == "running").values(
            state="failed", errors=[*job.errors, reason], finished_at=utcnow(), keys=[]))
    session.commit()
    return [j.id for j in jobs]


def stop(session: Session, *, job: Job, owner: str, reason: str) -> bool:
    """running → failed with ``reason`` (a busy host under ``GAS_BUSY_POLICY=stop``, a spent time
    budget): the keys timed so far stay stored. Only while ``owner`` runs it; commits; ``job`` is
    refreshed. True when it was stopped here."""
    q = update(Job).where(Job.id == job.id, Job.state == "running", Job.owner == owner)
    stopped = _commit_if(session, q.values(state="failed", errors=[*job.errors, reason], finished_at=utcnow(),
                                           keys=[]))
    session.refresh(job)
    return stopped


def get(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(session: Session, *, state: str | None = None, limit: int = 100) -> Sequence[Job]:
    q = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if state is not None:
        q = q.where(Job.state == state)
    return session.scalars(q).all()


def next_job(session: Session, *, device_id: int, environment_id: int, owner: str, stale_before: datetime) -> Job | None:
    """The job this worker should run next: its own running job (resumed after a crash), else a
    running job whose host stopped making progress before ``stale_before``, else the oldest
    queued one, all of this (device, environment) only — a job is timed where it was asked for."""
    mine_or_stale = (Job.state == "running") & (
        (Job.owner == owner) | Job.owner.is_(None) | Job.heartbeat_at.is_(None) | (Job.heartbeat_at < stale_before)
    )
    return session.scalar(
        select(Job)
        .where(Job.device_id == device_id, Job.environment_id == environment_id,
               (Job.state == "queued") | mine_or_stale)
        .order_by((Job.state == "running").desc(), Job.created_at)
        .limit(1)
    )


def fail_key(session: Session, *, job_id: str, owner: str, index: int, error: str) -> bool:
    """Count key ``index`` of a running job failed with ``error`` — only if the job is still
    ``owner``'s and still at that key (the worker process died while timing it, so nothing else
    recorded it). Its restarted worker then goes on with the next key. Commits."""
    job = session.get(Job, job_id)
    if job is None:
        return False
    q = update(Job).where(Job.id == job_id, Job.state == "running", Job.owner == owner, Job.done == index)
    won = rows_changed(session.execute(q.values(done=Job.done + 1, errors=[*job.errors, error], heartbeat_at=utcnow())))
    session.commit()
    return bool(won)


def claim(session: Session, *, job: Job, owner: str) -> bool:
    """Compare-and-swap ``job`` to ``running`` under ``owner``: only if its state, owner and
    heartbeat are still what ``job`` says, so two hosts never both take it. Commits."""
    q = update(Job).where(Job.id == job.id, Job.state == job.state)
    q = q.where(Job.owner.is_(None) if job.owner is None else Job.owner == job.owner)
    q = q.where(Job.heartbeat_at.is_(None) if job.heartbeat_at is None else Job.heartbeat_at == job.heartbeat_at)
    now = utcnow()
    values: dict[str, Any] = {"state": "running", "owner": owner, "heartbeat_at": now}
    if job.state == "queued":
        values["started_at"] = now
    won = rows_changed(session.execute(q.values(**values)))
    session.commit()
    session.refresh(job)
    return bool(won)


def cancel(session: Session, *, job: Job) -> Job:
    if job.state in ACTIVE:
        session.execute(
            update(Job).where(Job.id == job.id, Job.state.in_(ACTIVE)).values(state="cancelled", finished_at=utcnow(), keys=[])
        )
        session.commit()
        session.refresh(job)
    return job


def progress(session: Session, *, job: Job, owner: str, values: dict[str, Any]) -> bool:
    """Count one key done (and beat the heartbeat), with the other counters in ``values``, in the
    transaction that holds its measurement, only while the job still runs under ``owner``:
    after a DELETE or a take-over both are rolled back, so a stalled host never overwrites the
    new owner's progress. True when committed."""
    q = update(Job).where(Job.id == job.id, Job.state == "running", Job.owner == owner)
    return _commit_if(session, q.values(done=Job.done + 1, heartbeat_at=utcnow(), **values))


def record_reference(session: Session, *, job: Job, owner: str, noise: HostNoise, newly_flagged: int) -> bool:
    """Store the job's host-noise record (its reference points and host checks) and add
    ``newly_flagged`` to its flagged count, in the transaction that flagged those rows; only
    while the job still runs under ``owner``. Beats the heartbeat: a job waiting for a quiet
    host (``GAS_BUSY_POLICY=wait``) is re-checked every ``GAS_BUSY_RECHECK_S`` and stays its
    host's. True when committed (``job`` is then refreshed)."""
    q = update(Job).where(Job.id == job.id, Job.state == "running", Job.owner == owner)
    if _commit_if(session, q.values(host_noise=noise.model_dump(mode="json"), flagged=Job.flagged + newly_flagged,
                                    heartbeat_at=utcnow())):
        session.refresh(job)
        return True
    return False


def finish(session: Session, *, job: Job) -> bool:
    """running → failed when any key failed, else done; only if the job is still running under
    the owner ``job`` was read with (a DELETE or a take-over wins). Commits; ``job`` is refreshed."""
    q = update(Job).where(Job.id == job.id, Job.state == "running", Job.owner == job.owner)
    ended = rows_changed(session.execute(q.values(state="failed" if job.errors else "done", finished_at=utcnow(), keys=[])))
    session.commit()
    session.refresh(job)
    return bool(ended)


def _commit_if(session: Session, statement: Any) -> bool:
    """Run a compare-and-swap update: commit when it changed the row, else roll back the whole
    transaction (with whatever the caller wrote in it)."""
    if rows_changed(session.execute(statement)):
        session.commit()
        return True
    session.rollback()
    return False
