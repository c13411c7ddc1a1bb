"""Database operations, keyword-only. Sessions are passed in; commits happen here."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gas_core.keys import LatencyKey
from latency_service.device import DeviceIdentity, EnvironmentIdentity
from latency_service.models import Device, E2EMeasurement, Environment, Job, Measurement, utcnow
from latency_service.profiler import Timing

ACTIVE = ("queued", "running")


def get_or_create_device(session: Session, *, ident: DeviceIdentity) -> Device:
    dev = session.scalar(select(Device).where(Device.slug == ident.slug))
    if dev is None:
        dev = Device(slug=ident.slug, kind=ident.kind, name=ident.name, info=ident.info)
        session.add(dev)
        try:
            session.commit()
        except IntegrityError:  # another host of the fleet created it first
            session.rollback()
            dev = session.scalars(select(Device).where(Device.slug == ident.slug)).one()
    elif dev.info != ident.info:
        dev.info = ident.info
        session.commit()
    return dev


def get_or_create_environment(session: Session, *, device: Device, ident: EnvironmentIdentity) -> Environment:
    q = select(Environment).where(Environment.device_id == device.id, Environment.fingerprint == ident.fingerprint)
    env = session.scalar(q)
    if env is None:
        env = Environment(device_id=device.id, fingerprint=ident.fingerprint, info=ident.info)
        session.add(env)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            env = session.scalars(q).one()
    return env


def get_device(session: Session, *, slug: str) -> Device | None:
    return session.scalar(select(Device).where(Device.slug == slug))


def get_environment(session: Session, *, device: Device, fingerprint: str | None) -> Environment | None:
    """The named environment, or the newest one of ``device`` that has measurements."""
    q = select(Environment).where(Environment.device_id == device.id)
    if fingerprint is not None:
        return session.scalar(q.where(Environment.fingerprint == fingerprint))
    newest = session.scalar(
        q.join(Measurement, Measurement.environment_id == Environment.id)
        .group_by(Environment.id)
        .order_by(func.max(Measurement.created_at).desc())
        .limit(1)
    )
    return newest or session.scalar(q.order_by(Environment.created_at.desc(), Environment.id.desc()).limit(1))


def stored_hashes(session: Session, *, device_id: int, environment_id: int, hashes: Iterable[str]) -> set[str]:
    wanted = list(hashes)
    found: set[str] = set()
    for i in range(0, len(wanted), 500):
        chunk = wanted[i : i + 500]
        found.update(
            session.scalars(
                select(Measurement.key_hash).where(
                    Measurement.device_id == device_id,
                    Measurement.environment_id == environment_id,
                    Measurement.key_hash.in_(chunk),
                )
            )
        )
    return found


def put_measurement(
    session: Session, *, device_id: int, environment_id: int, key: LatencyKey, timing: Timing,
    method: dict[str, Any], telemetry: dict[str, int | None],
) -> Measurement:
    """Insert, or replace the stats of, the row of ``key``. Does not commit: the caller commits
    it together with the job's progress so both land or neither does."""
    row = session.scalar(
        select(Measurement).where(
            Measurement.device_id == device_id,
            Measurement.environment_id == environment_id,
            Measurement.key_hash == key.key_hash,
        )
    )
    values = dict(
        **timing.summary(), method=method, samples=timing.samples_blob(), created_at=utcnow(), **telemetry
    )
    if row is None:
        row = Measurement(
            device_id=device_id, environment_id=environment_id, key_hash=key.key_hash, key=key.canonical,
            **key.model_dump(), **values,
        )
        session.add(row)
    else:
        for name, value in values.items():
            setattr(row, name, value)
    return row


def _filtered(q, *, device_id: int, environment_id: int, dtype: str | None, batch: int | None,  # type: ignore[no-untyped-def]
              memory_format: str | None, op: str | None):
    q = q.where(Measurement.device_id == device_id, Measurement.environment_id == environment_id)
    if dtype is not None:
        q = q.where(Measurement.dtype == dtype)
    if batch is not None:
        q = q.where(Measurement.batch == batch)
    if memory_format is not None:
        q = q.where(Measurement.memory_format == memory_format)
    if op is not None:
        q = q.where(Measurement.op == op)
    return q


def table_rows(
    session: Session, *, device_id: int, environment_id: int, dtype: str | None = None, batch: int | None = None,
    memory_format: str | None = None, op: str | None = None,
) -> Sequence[Measurement]:
    q = _filtered(select(Measurement), device_id=device_id, environment_id=environment_id, dtype=dtype, batch=batch,
                  memory_format=memory_format, op=op)
    return session.scalars(q.order_by(Measurement.key)).all()


def table_version(
    session: Session, *, device_id: int, environment_id: int, dtype: str | None = None, batch: int | None = None,
    memory_format: str | None = None, op: str | None = None,
) -> tuple[int, str]:
    """(row count, newest write) of a filtered table: changes whenever any of its rows does,
    including rows written by other hosts of a fleet, so it keys the response cache."""
    q = _filtered(select(func.count(), func.max(Measurement.created_at)), device_id=device_id,
                  environment_id=environment_id, dtype=dtype, batch=batch, memory_format=memory_format, op=op)
    count, newest = session.execute(q).one()
    return int(count), str(newest)


def lookup(session: Session, *, device_id: int, environment_id: int) -> dict[str, float]:
    """Canonical key → median µs: the mapping gas_core's latency term consumes."""
    rows = session.execute(
        select(Measurement.key, Measurement.median_us).where(
            Measurement.device_id == device_id, Measurement.environment_id == environment_id
        )
    )
    return {k: v for k, v in rows}


def device_summaries(session: Session) -> list[tuple[Device, list[tuple[Environment, int]]]]:
    counts = dict(
        session.execute(select(Measurement.environment_id, func.count()).group_by(Measurement.environment_id)).all()
    )
    out = []
    for dev in session.scalars(select(Device).order_by(Device.slug)):
        envs = session.scalars(
            select(Environment).where(Environment.device_id == dev.id).order_by(Environment.created_at)
        ).all()
        out.append((dev, [(e, int(counts.get(e.id, 0))) for e in envs]))
    return out


# ---------------------------------------------------------------- jobs


def find_active_job(session: Session, *, request_hash: str) -> Job | None:
    return session.scalar(select(Job).where(Job.request_hash == request_hash, Job.state.in_(ACTIVE)))


def create_job(
    session: Session, *, device_id: int, environment_id: int, request_hash: str, keys: list[LatencyKey], force: bool
) -> tuple[Job, bool]:
    """(job, created). An identical request already queued or running returns that job; the
    partial unique index on ``request_hash`` makes this hold across processes too."""
    existing = find_active_job(session, request_hash=request_hash)
    if existing is not None:
        return existing, False
    job = Job(
        id=str(uuid.uuid4()), device_id=device_id, environment_id=environment_id, request_hash=request_hash,
        state="queued", keys=[k.canonical for k in keys], force=force, total=len(keys), done=0, skipped=0, errors=[],
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = find_active_job(session, request_hash=request_hash)
        if existing is None:
            raise
        return existing, False
    return job, True


def get_job(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(session: Session, *, state: str | None = None, limit: int = 100) -> Sequence[Job]:
    q = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if state is not None:
        q = q.where(Job.state == state)
    return session.scalars(q).all()


def next_job(session: Session, *, device_id: int) -> Job | None:
    """Oldest running (resumed after a crash) or queued job of this device."""
    return session.scalar(
        select(Job)
        .where(Job.device_id == device_id, Job.state.in_(ACTIVE))
        .order_by((Job.state == "running").desc(), Job.created_at)
        .limit(1)
    )


def cancel_job(session: Session, *, job: Job) -> Job:
    if job.state in ACTIVE:
        session.execute(
            update(Job).where(Job.id == job.id, Job.state.in_(ACTIVE)).values(state="cancelled", finished_at=utcnow())
        )
        session.commit()
        session.refresh(job)
    return job


def add_e2e(session: Session, **values: Any) -> E2EMeasurement:
    row = E2EMeasurement(**values)
    session.add(row)
    session.commit()
    return row
