"""Engine, sessions and migrations. Start-up runs ``alembic upgrade head``; never ``create_all``."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_before_delay, wait_exponential

log = logging.getLogger(__name__)


def _migrations_dir() -> Path:
    """The Alembic tree: ``migrations/`` beside the package in a checkout or an editable install,
    ``latency_service/migrations`` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "migrations", here / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError(f"Alembic migrations not found beside {here}; reinstall gas-nas")


MIGRATIONS = _migrations_dir()


POOL_CONNECTIONS = 40
"""Connections a service may hold: one per API worker thread (``Host.start`` caps anyio's thread
pool one below it) and one for the device worker. With fewer connections than threads, 64
concurrent requests left every thread waiting on the pool and /health took 30 s (its timeout)."""


def make_engine(url: str) -> Engine:
    """SQLite gets WAL and a busy timeout so the profiling worker and the API can share it. The
    pool opens up to :data:`POOL_CONNECTIONS` (a fleet's PostgreSQL needs that many per host)."""
    if url.startswith("sqlite"):
        # every connection kept: an overflow connection is closed when returned and re-opened
        # (with its pragmas) on the next burst, which showed in profiles under load
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_CONNECTIONS, max_overflow=0)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=POOL_CONNECTIONS - 10)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    return cfg


def wait_for(url: str, timeout_s: float) -> None:
    """Connect, retrying with backoff (0.5 s doubling to 5 s) for up to ``timeout_s``: in a
    compose file or a cluster the service may start before its database accepts connections.
    Raises the last error."""
    engine = create_engine(url, poolclass=NullPool)

    def connect() -> None:
        with engine.connect():
            pass

    def log_retry(state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("database %s not reachable (%s); retrying in %.1fs", redact(url), str(err).splitlines()[0], wait)

    try:
        Retrying(retry=retry_if_exception_type(OperationalError), stop=stop_before_delay(timeout_s),
                 wait=wait_exponential(multiplier=0.5, max=5.0), before_sleep=log_retry, reraise=True)(connect)
    finally:
        engine.dispose()


# pg_advisory_lock id held while migrating ("GASM" in ASCII)
MIGRATION_LOCK = 0x4741534D


def migrate(url: str, revision: str = "head") -> None:
    """``alembic upgrade``. On PostgreSQL under an advisory lock: the hosts of a fleet start
    together, and two concurrent upgrades of one database would both try to create the tables."""
    log.info("alembic upgrade %s on %s", revision, redact(url))
    cfg = alembic_config(url)
    if not url.startswith("postgresql"):
        command.upgrade(cfg, revision)
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                conn.commit()
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
