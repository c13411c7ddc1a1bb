"""SQLAlchemy 2 typed ORM. Alembic (``migrations/``) is the only source of the schema."""

from __future__ import annotations

from array import array
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(t: datetime) -> datetime:
    """A naive datetime is taken as UTC (what this service writes); an aware one is converted."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always reads back timezone-aware UTC. PostgreSQL keeps
    the zone; SQLite stores none and returns naive datetimes, so the same job read ``…Z`` from
    ``POST /profile`` and a naive time from ``GET /jobs/{id}``. Same DDL as the plain type."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value) if value is not None else None


def as_stored(samples_us: list[float]) -> list[float]:
    """``samples_us`` as :class:`Samples` stores and reads them back (float32). A row's statistics
    are computed from these, so that they are exactly those of its stored samples: an export
    re-imported (which recomputes them from the samples) then reproduces them to the last bit,
    where float64 statistics let a near-zero paired median (the mean of two samples of opposite
    sign) differ from the recomputed one by more than 1e-6 of itself."""
    return array("f", samples_us).tolist()


class Samples(TypeDecorator[list[float]]):
    """Every raw sample of a timing, µs per run, stored as float32 in machine order (little-endian
    on every supported host), 4 bytes a sample. Same DDL as ``LargeBinary``; the codec lives
    here so nothing above the ORM handles bytes."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: list[float] | None, dialect: Dialect) -> bytes | None:
        return array("f", value).tobytes() if value is not None else None

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> list[float] | None:
        if value is None:
            return None
        out = array("f")
        out.frombytes(value)
        return out.tolist()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, datetime: UTCDateTime}


class Device(Base):
    """Hardware a table belongs to; ``slug`` is stable across hosts of the same model."""

    __tablename__ = "device"
    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(8))  # cuda | cpu
    name: Mapped[str] = mapped_column(String(256))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    environments: Mapped[list[Environment]] = relationship(back_populates="device")


class Environment(Base):
    """Software that changes timings (torch, CUDA, cuDNN, driver, cudnn.benchmark, threads)."""

    __tablename__ = "environment"
    __table_args__ = (UniqueConstraint("device_id", "fingerprint", name="uq_environment_device_fp"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    fingerprint: Mapped[str] = mapped_column(String(32))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    origin: Mapped[str] = mapped_column(String(16), default="measured", server_default="measured")
    """"measured" (a host of this database timed in it) or "imported" (it came from a file)."""
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # gas_core.quality.Calibration
    device: Mapped[Device] = relationship(back_populates="environments")


class Measurement(Base):
    """One key timed on one (device, environment): summary stats plus every raw sample."""

    __tablename__ = "measurement"
    __table_args__ = (
        UniqueConstraint("device_id", "environment_id", "key_hash", name="uq_measurement_key"),
        Index("ix_measurement_filter", "device_id", "environment_id", "dtype", "batch", "memory_format"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environment.id", ondelete="CASCADE"))
    key_hash: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(256))
    op: Mapped[str] = mapped_column(String(64))
    c_in: Mapped[int] = mapped_column(Integer)
    c_out: Mapped[int] = mapped_column(Integer)
    h: Mapped[int] = mapped_column(Integer)
    w: Mapped[int] = mapped_column(Integer)
    stride: Mapped[int] = mapped_column(Integer)
    n_inputs: Mapped[int] = mapped_column(Integer)
    batch: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    memory_format: Mapped[str] = mapped_column(String(16))
    runtime: Mapped[str] = mapped_column(String(16))
    median_us: Mapped[float] = mapped_column(Float)
    p10_us: Mapped[float] = mapped_column(Float)
    p90_us: Mapped[float] = mapped_column(Float)
    mean_us: Mapped[float] = mapped_column(Float)
    std_us: Mapped[float] = mapped_column(Float)
    n_samples: Mapped[int] = mapped_column(Integer)
    iters_per_sample: Mapped[int] = mapped_column(Integer)
    timer: Mapped[str] = mapped_column(String(32))
    method: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    samples: Mapped[list[float]] = mapped_column(Samples, deferred=True)  # loaded only when asked for
    gpu_clock_mhz: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gpu_temp_c: Mapped[int | None] = mapped_column(Integer, nullable=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    origin: Mapped[str] = mapped_column(String(16), default="measured", server_default="measured")
    """Stored although unstable (gas_core.quality): its samples, or the host while it ran."""
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # gas_core.quality.RowQuality
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """A profiling job: its keys, its progress (``done`` commits with each measurement, so a
    crash loses at most the key in flight) and its state. Any host of the job's (device,
    environment) may run it; ``owner`` and ``heartbeat_at`` say which one does, so another host
    takes a running job over only once its heartbeat is stale."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_queue", "device_id", "environment_id", "state"),
        Index("ix_job_client_state", "client", "state"),
        Index("ix_job_created", "created_at"),  # GET /jobs reads the newest N without sorting them all
        Index(
            "uq_job_active_request", "request_hash", unique=True,
            sqlite_where=text("state IN ('queued', 'running')"),
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environment.id", ondelete="CASCADE"))
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    keys: Mapped[list[str]] = mapped_column(JSON, deferred=True)
    """The job's canonical keys while it is queued or running; emptied when it ends (a 4,988-key job
    kept 0.39 MB for ever), and loaded only by the worker, never by a listing."""
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # worker id of the host running it
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)  # who queued it: hashed token or address
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    flagged: Mapped[int] = mapped_column(Integer, default=0)  # keys stored flagged
    retimed: Mapped[int] = mapped_column(Integer, default=0)  # keys timed more than once before being stored
    host_noise: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # gas_core.quality.HostNoise


class E2EMeasurement(Base):
    """A derived network timed end to end, with the table's prediction beside it."""

    __tablename__ = "e2e_measurement"
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("device.id", ondelete="CASCADE"))
    environment_id: Mapped[int] = mapped_column(ForeignKey("environment.id", ondelete="CASCADE"))
    genotype: Mapped[dict[str, Any]] = mapped_column(JSON)
    genotype_hash: Mapped[str] = mapped_column(String(64), index=True)
    input_h: Mapped[int] = mapped_column(Integer)
    input_w: Mapped[int] = mapped_column(Integer)
    batch: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    memory_format: Mapped[str] = mapped_column(String(16))
    runtime: Mapped[str] = mapped_column(String(16), default="eager", server_default="eager")
    median_us: Mapped[float] = mapped_column(Float)
    p90_us: Mapped[float] = mapped_column(Float)
    mean_us: Mapped[float] = mapped_column(Float)
    std_us: Mapped[float] = mapped_column(Float)
    n_samples: Mapped[int] = mapped_column(Integer)
    iters_per_sample: Mapped[int] = mapped_column(Integer)
    fps: Mapped[float] = mapped_column(Float)
    predicted_us: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples: Mapped[list[float]] = mapped_column(Samples, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
