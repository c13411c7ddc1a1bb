"""The FastAPI application. ``create_app(settings)`` is used by uvicorn (``gas-service serve``)
and by the tests; start-up migrates the database and starts the device worker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from latency_service import db
from latency_service.api import errors
from latency_service.api.fastpath import CachedTableReads
from latency_service.api.routes import health, jobs, measure, table
from latency_service.core.config import Settings, get_settings
from latency_service.service import Host

API_VERSION = "1"


def create_app(settings: Settings | None = None, *, run_worker: bool = True) -> FastAPI:
    """The app; ``run_worker=False`` leaves the device idle (jobs stay queued): HTTP tests in
    process that exercise queues and bounds without timing anything."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        host = Host.start(settings, run_worker=run_worker, worker_process=settings.worker_process)
        app.state.host = host
        # fewer API threads than pooled connections: a thread never waits on the pool for a
        # connection that only another thread could hand back (latency_service/db.py)
        anyio.to_thread.current_default_thread_limiter().total_tokens = db.POOL_CONNECTIONS - 2
        try:
            yield
        finally:
            host.close()

    # /docs and /redoc from assets installed with the fastapi-offline package, not a CDN: a lab's
    # service often has no internet, and the CDN pages then render blank
    app = FastAPIOffline(
        title="GAS latency service",
        version=API_VERSION,
        description="Per-device latency lookup tables for GAS: profiles every candidate op at the exact "
        "shape each cell sees, serves the table, and times derived networks end to end.",
        lifespan=lifespan,
        responses=errors.ERROR_RESPONSES,
    )
    for module in (health, jobs, table, measure):
        app.include_router(module.router)
    errors.install(app, settings.max_body_bytes)
    app.add_middleware(CachedTableReads)  # outermost: a remembered table read skips everything else
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory: ``uvicorn --factory latency_service.main:app_from_env``."""
    return create_app(get_settings())
