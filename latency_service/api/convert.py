"""ORM row → response model conversions shared by the routes."""

from __future__ import annotations

from typing import Any

from gas_core.keys import MAX_US
from gas_core.quality import HostNoise
from gas_core.table import clip_json
from gas_core.wire import DevicePublic, EntryPublic, EnvironmentPublic, JobPublic
from latency_service.models import Device, Environment, Job, Measurement


def device_row_public(dev: Device) -> DevicePublic:
    return DevicePublic(slug=dev.slug, kind=dev.kind, name=dev.name, info=clip_json(dev.info))  # type: ignore[arg-type]


def environment_public(env: Environment, entries: int | None = None) -> EnvironmentPublic:
    """Info clipped to the import bound: an environment stored before imports were bounded (one
    300 levels deep made every ``GET /devices`` a 500) is served, not fatal."""
    return EnvironmentPublic(fingerprint=env.fingerprint, info=clip_json(env.info), entries=entries,
                             created_at=env.created_at, origin=env.origin)


def job_public(job: Job, device: str, environment: str) -> JobPublic:
    return JobPublic(
        id=job.id, state=job.state, device=device, environment=environment, total=job.total, done=job.done,
        skipped=job.skipped, force=job.force, errors=job.errors, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, owner=job.owner,
        heartbeat_at=job.heartbeat_at, flagged=job.flagged, retimed=job.retimed,
        host_noise=HostNoise.model_validate(job.host_noise) if job.host_noise else None,
    )


# the flat columns of an entry (and of the CSV export); method and samples are nested
ENTRY_FIELDS = [f for f in EntryPublic.model_fields if f not in ("samples_us", "method", "quality")]


STAT_FIELDS = ("median_us", "p10_us", "p90_us", "mean_us", "std_us")


def entry_public(row: Measurement, with_samples: bool = False) -> EntryPublic:
    """A stored row as served. A statistic beyond ``MAX_US`` (schema-valid on import before the
    bound) is served at the bound and the row flagged, rather than failing the whole table."""
    data: dict[str, Any] = {f: getattr(row, f) for f in ENTRY_FIELDS}
    data["method"] = clip_json(row.method) if row.method is not None else None
    data["quality"] = row.quality
    if any(not data[f] <= MAX_US for f in STAT_FIELDS):
        data.update({f: min(data[f], MAX_US) if data[f] == data[f] else MAX_US for f in STAT_FIELDS}, flagged=True)
    if with_samples:
        data["samples_us"] = [max(-MAX_US, min(MAX_US, x)) for x in row.samples]
    return EntryPublic(**data)
