"""ORM row → response model conversions shared by the routes."""

from __future__ import annotations

from typing import Any

from gas_core.quality import HostNoise
from gas_core.wire import DevicePublic, EntryPublic, JobPublic
from latency_service.models import Device, Job, Measurement
from latency_service.profiler import samples_from_blob


def device_row_public(dev: Device) -> DevicePublic:
    return DevicePublic(slug=dev.slug, kind=dev.kind, name=dev.name, info=dev.info)  # type: ignore[arg-type]


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


def entry_public(row: Measurement, with_samples: bool = False) -> EntryPublic:
    data: dict[str, Any] = {f: getattr(row, f) for f in ENTRY_FIELDS}
    data["method"] = row.method
    data["quality"] = row.quality
    if with_samples:
        data["samples_us"] = samples_from_blob(row.samples)
    return EntryPublic(**data)
