from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from gas_core.runtimes import host_runtimes
from gas_core.wire import DevicePublic, EnvironmentPublic, HealthPublic, HostPublic
from latency_service import crud
from latency_service.api.deps import READ_RESPONSES, HostDep, ReadDep, SessionDep

router = APIRouter(tags=["host"])


@router.get("/health", response_model=HealthPublic, summary="Liveness and database reachability")
def health(host: HostDep, session: SessionDep) -> HealthPublic:
    try:
        session.execute(text("SELECT 1"))
        db_ok = True
    except Exception:
        db_ok = False
    worker = host.worker.alive()
    return HealthPublic(status="ok" if db_ok and worker else "degraded", database=db_ok, worker=worker,
                        measuring=host.worker.measuring, measure_queue=host.worker.queued())


@router.get("/device", response_model=HostPublic, summary="This host's device identity and environment",
            dependencies=[ReadDep], responses=READ_RESPONSES)
def device(host: HostDep, session: SessionDep) -> HostPublic:
    return HostPublic(
        host_noise=crud.latest_host_noise(session, device_id=host.device_id, environment_id=host.environment_id),
        device=DevicePublic(slug=host.device.slug, kind=host.device.kind, name=host.device.name,  # type: ignore[arg-type]
                            info=host.device.info),
        environment=EnvironmentPublic(fingerprint=host.env.fingerprint, info=host.env.info),
        torch_device=str(host.torch_device),
        runtimes=host_runtimes(host.torch_device.type, host.settings.offered_runtimes()),
    )
