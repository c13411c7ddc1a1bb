"""Database operations, keyword-only. Sessions are passed in; commits happen here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Result, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from gas_core.keys import LatencyKey
from gas_core.quality import Calibration, HostNoise, QualityPolicy, RowQuality, RowStat, assess, sample_stats
from gas_core.runtimes import timed_as_now
from gas_core.table import LatencyTable, TableEntry
from latency_service.device import DeviceIdentity, EnvironmentIdentity
from latency_service.models import Device, E2EMeasurement, Environment, Job, Measurement, as_stored, as_utc, utcnow
from latency_service.profiler import Timing


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


def stored_hashes(session: Session, *, device_id: int, environment_id: int, keys: Iterable[LatencyKey]) -> set[str]:
    """Hashes of ``keys`` that have a row timed the way the key is timed now
    (:func:`gas_core.runtimes.timed_as_now`); a stale row is left for the job to time again."""
    wanted = {k.key_hash: k for k in keys}
    hashes = list(wanted)
    found: set[str] = set()
    for i in range(0, len(hashes), 500):
        rows = session.execute(
            select(Measurement.key_hash, Measurement.timer).where(
                Measurement.device_id == device_id,
                Measurement.environment_id == environment_id,
                Measurement.key_hash.in_(hashes[i : i + 500]),
            )
        )
        found.update(h for h, timer in rows if timed_as_now(wanted[h], timer))
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
    stored = as_stored(timing.samples_us)
    values = dict(
        **sample_stats(stored), iters_per_sample=timing.iters_per_sample, timer=timing.timer, method=method,
        samples=stored, created_at=utcnow(),
        **telemetry, flagged=quality.flagged, quality=quality.model_dump(mode="json"), origin="measured",
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
              memory_format: str | None, op: str | None, runtime: str | None = None):
    q = q.where(Measurement.device_id == device_id, Measurement.environment_id == environment_id)
    if runtime is not None:
        q = q.where(Measurement.runtime == runtime)
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
    memory_format: str | None = None, op: str | None = None, runtime: str | None = None, with_samples: bool = False,
) -> Sequence[Measurement]:
    """A filtered table's rows by key; their raw samples (deferred) loaded in the same query
    only when asked for."""
    rows = select(Measurement).options(undefer(Measurement.samples)) if with_samples else select(Measurement)
    q = _filtered(rows, device_id=device_id, environment_id=environment_id, dtype=dtype, batch=batch,
                  memory_format=memory_format, op=op, runtime=runtime)
    return session.scalars(q.order_by(Measurement.key)).all()


def table_version(
    session: Session, *, device_id: int, environment_id: int, dtype: str | None = None, batch: int | None = None,
    memory_format: str | None = None, op: str | None = None, runtime: str | None = None,
) -> tuple[int, str, str]:
    """(row count, newest write, Σ medians) of a filtered table: changes whenever any of its rows
    does, including rows written by other hosts of a fleet or imported with an older time, so it
    keys the response cache."""
    q = _filtered(select(func.count(), func.max(Measurement.created_at), func.sum(Measurement.median_us)), device_id=device_id,
                  environment_id=environment_id, dtype=dtype, batch=batch, memory_format=memory_format, op=op,
                  runtime=runtime)
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
    if env is not None and not force and _measured_rows(session, env) > 0:
        raise ImportConflict(f"environment {env.fingerprint} of {dev.slug!r} holds rows this service measured; a "
                             "file would replace or mix with them: pass force=true to import into it anyway (the "
                             "rows it replaces are then marked imported)")
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
            samples=e.samples_us, gpu_clock_mhz=e.gpu_clock_mhz, gpu_temp_c=e.gpu_temp_c,
            created_at=as_utc(e.created_at), flagged=quality.flagged, quality=quality.model_dump(mode="json"),
            origin="imported",
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


def _measured_rows(session: Session, env: Environment) -> int:
    """Rows of ``env`` that a host of this database timed (not imported)."""
    q = select(func.count(Measurement.id)).where(Measurement.environment_id == env.id, Measurement.origin == "measured")
    return int(session.scalar(q) or 0)


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


def get_calibration(session: Session, *, environment_id: int) -> Calibration | None:
    """The environment's quiet calibration (:class:`gas_core.quality.Calibration`), if any."""
    raw = session.scalar(select(Environment.calibration).where(Environment.id == environment_id))
    return Calibration.model_validate(raw) if raw else None


def add_calibration_point(session: Session, *, environment_id: int, reference: str, median_us: float,
                          at: datetime) -> Calibration:
    """Add a quiet reference point to the environment's calibration (created with it). Commits."""
    env = session.get(Environment, environment_id)
    if env is None:
        raise LookupError(f"environment {environment_id} is gone")
    cal = (Calibration.model_validate(env.calibration).add(median_us, at) if env.calibration else
           Calibration(reference=reference, points_us=[median_us], updated_at=at))
    env.calibration = cal.model_dump(mode="json")
    session.commit()
    return cal


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


def add_e2e(session: Session, **values: Any) -> E2EMeasurement:
    row = E2EMeasurement(**values)
    session.add(row)
    session.commit()
    return row
