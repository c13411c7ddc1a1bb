"""Database operations, keyword-only. Sessions are passed in; commits happen here."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Result, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from gas_core.keys import LatencyKey
from gas_core.quality import HostNoise, QualityPolicy, RowQuality, RowStat, assess
from gas_core.table import LatencyTable, TableEntry
from latency_service.device import DeviceIdentity, EnvironmentIdentity
from latency_service.models import Device, E2EMeasurement, Environment, Job, Measurement, as_utc, utcnow
from latency_service.profiler import Timing, samples_to_blob

ACTIVE = ("queued", "running")


def rows_changed(result: Result[Any]) -> int:
    """Rows an UPDATE matched: how conditional (compare-and-swap) writes learn whether they won."""
    return cast(CursorResult[Any], result).rowcount


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
        env = Environment(device_id=device.id, fingerprint=ident.fingerprint, info=ident.info, origin="measured")
        session.add(env)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            env = session.scalars(q).one()
    if env.origin != "measured":  # this host measures in it from now on (it may have been imported first)
        env.origin = "measured"
        session.commit()
    return env


def get_device(session: Session, *, slug: str) -> Device | None:
    return session.scalar(select(Device).where(Device.slug == slug))


def get_environment(session: Session, *, device: Device, fingerprint: str | None) -> Environment | None:
    """The named environment, or the device's default: the newest environment a host of this
    database *measured* that has rows, else the newest imported one with rows, else the newest
    registered. An import can add an environment but never becomes a live host's default, whatever
    dates its file claims; name it (``?environment=``) to read it."""
    q = select(Environment).where(Environment.device_id == device.id)
    if fingerprint is not None:
        return session.scalar(q.where(Environment.fingerprint == fingerprint))
    with_rows = (q.join(Measurement, Measurement.environment_id == Environment.id).group_by(Environment.id))
    for origin in ("measured", "imported"):
        newest = session.scalar(with_rows.where(Environment.origin == origin)
                                .order_by(func.max(Measurement.created_at).desc()).limit(1))
        if newest is not None:
            return newest
    return session.scalar(q.order_by(Environment.created_at.desc(), Environment.id.desc()).limit(1))


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
    method: dict[str, Any], telemetry: dict[str, int | None], quality: RowQuality,
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
        **timing.summary(), method=method, samples=timing.samples_blob(), created_at=utcnow(), **telemetry,
        flagged=quality.flagged, quality=quality.model_dump(mode="json"),
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


def flag_rows(session: Session, *, device_id: int, environment_id: int, hashes: Sequence[str], reason: str) -> int:
    """Flag the rows of ``hashes`` for ``reason`` (appended to their verdict's reasons); returns
    how many were not flagged before. Does not commit: the caller commits it with the job."""
    newly = 0
    for i in range(0, len(hashes), 500):
        rows = session.scalars(select(Measurement).where(
            Measurement.device_id == device_id, Measurement.environment_id == environment_id,
            Measurement.key_hash.in_(hashes[i : i + 500])))
        for row in rows:
            newly += not row.flagged
            quality = dict(row.quality or {})
            row.quality = {**quality, "flagged": True, "reasons": [*quality.get("reasons", []), reason]}
            row.flagged = True
    return newly


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
) -> tuple[int, str, str]:
    """(row count, newest write, Σ medians) of a filtered table: changes whenever any of its rows
    does, including rows written by other hosts of a fleet or imported with an older time, so it
    keys the response cache."""
    q = _filtered(select(func.count(), func.max(Measurement.created_at), func.sum(Measurement.median_us)), device_id=device_id,
                  environment_id=environment_id, dtype=dtype, batch=batch, memory_format=memory_format, op=op)
    count, newest, total = session.execute(q).one()
    return int(count), str(newest), repr(total)


class ImportConflict(RuntimeError):
    """The file disagrees with what the database holds (another kind of device under the slug)."""


def import_table(session: Session, *, table: LatencyTable, force: bool, policy: QualityPolicy) -> dict[str, Any]:
    """Merge an exported table into the database in one transaction: rows of new keys are added,
    a stored row is replaced only by a newer one (or by any with ``force``), so re-importing an
    old export never rolls a table back. The caller has validated every entry (keys, samples).
    Every row's verdict is recomputed from its samples under this service's ``policy``; a flag the
    file carries (the host drifted while the row was timed) is kept with its reasons.
    Returns the counts of :class:`gas_core.wire.ImportPublic`."""
    counts = dict(added=0, replaced=0, kept=0, skipped=0, created_device=False, created_environment=False)
    dev = get_device(session, slug=table.device.slug)
    if dev is None:
        dev = Device(slug=table.device.slug, kind=table.device.kind, name=table.device.name, info=table.device.info)
        session.add(dev)
        session.flush()
        counts["created_device"] = True
    elif dev.kind != table.device.kind:
        raise ImportConflict(f"device {dev.slug!r} is a {dev.kind} device here, the file says {table.device.kind}")
    env = get_environment(session, device=dev, fingerprint=table.environment.fingerprint)
    if env is None:
        env = Environment(device_id=dev.id, fingerprint=table.environment.fingerprint, info=table.environment.info,
                          origin="imported")
        session.add(env)
        session.flush()
        counts["created_environment"] = True
    stored = {
        m.key_hash: m
        for m in session.scalars(select(Measurement).where(Measurement.device_id == dev.id,
                                                           Measurement.environment_id == env.id))
    }
    for e in table.entries:
        assert e.samples_us is not None
        quality = imported_quality(e, policy)
        values = dict(
            median_us=e.median_us, p10_us=e.p10_us, p90_us=e.p90_us, mean_us=e.mean_us, std_us=e.std_us,
            n_samples=e.n_samples, iters_per_sample=e.iters_per_sample, timer=e.timer, method=e.method or {},
            samples=samples_to_blob(e.samples_us), gpu_clock_mhz=e.gpu_clock_mhz, gpu_temp_c=e.gpu_temp_c,
            created_at=as_utc(e.created_at), flagged=quality.flagged, quality=quality.model_dump(mode="json"),
        )
        row = stored.get(e.key_hash)
        if row is None:
            key = e.latency_key()
            session.add(Measurement(device_id=dev.id, environment_id=env.id, key_hash=e.key_hash, key=e.key,
                                    **key.model_dump(), **values))
            counts["added"] += 1
            continue
        mine, theirs = row.created_at, as_utc(e.created_at)  # stored rows read back in UTC (UTCDateTime)
        if theirs > mine or (force and theirs != mine):
            for name, value in values.items():
                setattr(row, name, value)
            counts["replaced"] += 1
        elif theirs == mine:
            counts["skipped"] += 1
        else:
            counts["kept"] += 1
    session.commit()
    return counts


def imported_quality(entry: TableEntry, policy: QualityPolicy) -> RowQuality:
    """The verdict of an imported row: from its own samples, plus the reasons the file gives."""
    assert entry.samples_us is not None
    given = entry.quality
    mine = assess(entry.samples_us, policy, attempts=given.attempts if given else 1)
    if given is None or not given.reasons:
        return mine if not entry.flagged else mine.model_copy(update={"flagged": True})
    reasons = list(dict.fromkeys([*mine.reasons, *given.reasons]))
    return mine.model_copy(update={"reasons": reasons, "flagged": True})


def row_stats(session: Session, *, device_id: int, environment_id: int) -> dict[str, RowStat]:
    """Canonical key → (median µs, its standard error, flagged): a prediction with its uncertainty."""
    rows = session.execute(
        select(Measurement.key, Measurement.median_us, Measurement.quality, Measurement.flagged).where(
            Measurement.device_id == device_id, Measurement.environment_id == environment_id
        )
    )
    return {k: RowStat(med, float((q or {}).get("median_se_us", 0.0)), bool(flag)) for k, med, q, flag in rows}


def latest_host_noise(session: Session, *, device_id: int, environment_id: int) -> HostNoise | None:
    """The reference workload through the most recent job of this (device, environment) that timed it."""
    job = session.scalar(
        select(Job).where(Job.device_id == device_id, Job.environment_id == environment_id, Job.host_noise.is_not(None))
        .order_by(Job.created_at.desc()).limit(1))
    return HostNoise.model_validate(job.host_noise) if job is not None and job.host_noise else None


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
    """The queued or running job of this request, without its key list (loaded on access): a
    resent ``/profile`` answers with the job's progress, and decoding thousands of keys per
    request was most of that route's cost under load."""
    q = select(Job).options(defer(Job.keys)).where(Job.request_hash == request_hash, Job.state.in_(ACTIVE))
    return session.scalar(q)


def create_job(
    session: Session, *, device_id: int, environment_id: int, request_hash: str, keys: list[LatencyKey], force: bool,
    client: str | None = None,
) -> tuple[Job, bool]:
    """(job, created). An identical request already queued or running returns that job; the
    partial unique index on ``request_hash`` makes this hold across processes too. When a
    concurrent identical request wins the insert and its job has already ended (all its keys
    were stored), the insert is simply tried again."""
    for _ in range(5):
        existing = find_active_job(session, request_hash=request_hash)
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


def queued_keys(session: Session, *, device_id: int, environment_id: int) -> int:
    """Keys not yet processed over the queued and running jobs of one (device, environment)."""
    q = select(func.coalesce(func.sum(Job.total - Job.done), 0)).where(
        Job.device_id == device_id, Job.environment_id == environment_id, Job.state.in_(ACTIVE))
    return int(session.scalar(q) or 0)


def fail_running_jobs(session: Session, *, owner: str, reason: str) -> list[str]:
    """Mark ``owner``'s running jobs failed with ``reason`` (its device worker is gone for good, so
    nothing will advance them); returns their ids. Commits."""
    jobs = session.scalars(select(Job).where(Job.state == "running", Job.owner == owner)).all()
    for job in jobs:
        session.execute(update(Job).where(Job.id == job.id, Job.state == "running").values(
            state="failed", errors=[*job.errors, reason], finished_at=utcnow()))
    session.commit()
    return [j.id for j in jobs]


def get_job(session: Session, *, job_id: str) -> Job | None:
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


def claim_job(session: Session, *, job: Job, owner: str) -> bool:
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
