"""Bodies of the latency service's HTTP API (request ``…Request`` / response ``…Public``), each
with ``schema_version``: written once here, served by ``latency_service`` and read by
``search_client``. Requests forbid unknown fields (a typo is a 422 naming it, not a silently
ignored option); responses ignore them, so an older client keeps reading a newer service."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, computed_field, model_validator

from gas_core.errors import one_line
from gas_core.genotype import Genotype, random_genotype
from gas_core.keys import Dtype, LatencyKey, MemoryFormat, Runtime
from gas_core.quality import Agreement, HostCheck, HostNoise
from gas_core.search_space import NetworkLayout
from gas_core.table import LatencyTable, TableComparison, TableDevice, TableEntry, TableEnvironment

SCHEMA_VERSION: Final = 1
JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class Versioned(BaseModel):
    """A response body."""

    model_config = ConfigDict(extra="ignore")
    schema_version: Literal[1] = SCHEMA_VERSION


class VersionedRequest(Versioned):
    """A request body."""

    model_config = ConfigDict(extra="forbid")


# Valid bodies in the schema: clients and fuzzers (schemathesis in CI) start from them
_EXAMPLE_LAYOUT = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=16,
                                num_classes=4)
_EXAMPLE_GENOTYPE = random_genotype(_EXAMPLE_LAYOUT, torch.Generator().manual_seed(0))


class ProfileRequest(VersionedRequest):
    """Either explicit ``keys``, or a ``layout`` + ``input_size`` expanded by gas_core's
    ``cell_shapes`` for every combination of ``batches`` × ``dtypes`` × ``memory_formats``."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"keys": [{"op": "conv_3x3", "c_in": 8, "c_out": 8, "h": 16, "w": 32, "stride": 1, "batch": 1}]},
        {"layout": _EXAMPLE_LAYOUT.model_dump(mode="json"), "input_size": [32, 48], "batches": [1],
         "dtypes": ["float32"]},
    ]})

    keys: list[LatencyKey] | None = Field(default=None, min_length=1, max_length=100_000)
    layout: NetworkLayout | None = None
    input_size: tuple[StrictInt, StrictInt] | None = Field(default=None, description="(H, W) of the network input")
    batches: list[StrictInt] = Field(default=[1], min_length=1, max_length=64)
    dtypes: list[Dtype] = Field(default=["float32"], min_length=1, max_length=16)
    memory_formats: list[MemoryFormat] = Field(default=["contiguous"], min_length=1, max_length=16)
    runtimes: list[Runtime] = Field(default=["eager"], min_length=1, max_length=8, description=(
        "how each component is run when timed: eager, or exported/compiled at its shape (GET /device lists "
        "this host's runtimes)"))
    force: bool = Field(default=False, description="re-time keys that are already stored")

    @model_validator(mode="after")
    def _one_source(self) -> ProfileRequest:
        if (self.keys is None) == (self.layout is None):
            raise ValueError("give exactly one of 'keys' or 'layout' (with 'input_size')")
        if self.keys is not None:
            defaults = {n: type(self).model_fields[n].default for n in ("input_size", "batches", "dtypes",
                                                                         "memory_formats", "runtimes")}
            extra = [n for n, d in defaults.items() if getattr(self, n) != d]
            if extra:
                raise ValueError(f"{extra[0]}: only with 'layout'; explicit 'keys' carry their own size, batch, dtype, "
                                 "memory format and runtime")
        if self.layout is not None and self.input_size is None:
            raise ValueError("input_size: required with 'layout'")
        if self.input_size is not None and min(self.input_size) < 1:
            raise ValueError("input_size: H and W must be positive")
        if any(b < 1 for b in self.batches):
            raise ValueError("batches: must be positive")
        return self


class JobPublic(Versioned):
    id: str
    state: JobState
    device: str
    environment: str
    total: int
    done: int
    skipped: int
    force: bool
    errors: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    owner: str | None = Field(default=None, description="worker id (GAS_WORKER_ID) of the host running the job")
    heartbeat_at: datetime | None = None
    flagged: int = Field(default=0, description="keys stored flagged: still unstable after re-timing, or timed while "
                         "the host's reference workload drifted")
    retimed: int = Field(default=0, description="keys timed more than once because their first samples were unstable")
    host_noise: HostNoise | None = Field(default=None, description="the reference workload timed at the job's start, "
                                         "between keys and at its end")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def warnings(self) -> list[str]:
        """What a user should know about this job's figures, in words."""
        out = []
        if self.flagged:
            out.append(f"{self.flagged} key(s) stored flagged (unstable): predictions using them are unreliable; "
                       "re-profile on a quiet host with force=true")
        busy = next((c for c in self.host_noise.checks if c.busy), None) if self.host_noise is not None else None
        if busy is not None:
            out.append(f"the host was busy while this job ran ({busy.describe()}); it went on as "
                       f"GAS_BUSY_POLICY={busy.action} says, and the rows timed meanwhile are flagged")
        if self.host_noise is not None and self.host_noise.exceeded:
            out.append(f"the host's reference workload drifted up to {self.host_noise.drift_pct:.0f} % during the "
                       f"job, beyond the threshold ({self.host_noise.threshold_pct:.0f} %) and "
                       f"{self.host_noise.min_z:g}× the host's own wander: the host was not steady")
        return out


# a table and its parts are gas_core's artefact: the same model is served, exported and imported
DevicePublic = TableDevice
EnvironmentPublic = TableEnvironment
EntryPublic = TableEntry
TablePublic = LatencyTable


class RuntimeSupport(BaseModel):
    version: str | None = Field(description="installed version; null when not installed")
    available: bool
    missing: str | None = Field(default=None, description="why it cannot run here, and what to install")


class HostPublic(Versioned):
    """``GET /device``: this host's identity and current environment."""

    device: DevicePublic
    environment: EnvironmentPublic
    torch_device: str
    runtimes: dict[str, RuntimeSupport] = Field(default_factory=dict, description="every registered runtime: its "
                                                "version here and, when it cannot run here, why")
    host_noise: HostNoise | None = Field(default=None, description="the reference workload through this "
                                         "environment's most recent job: how steady the host was")


class DeviceSummary(DevicePublic):
    environments: list[EnvironmentPublic]


class DevicesPublic(Versioned):
    devices: list[DeviceSummary]


class Deployment(BaseModel):
    """The network as it will be shipped: what the latency keys and ``/measure`` describe. The
    search writes it beside its genotype (:data:`DEPLOYMENT_FILE`), gas-train copies it beside
    its checkpoint, and gas-eval measures that deployment, not a float32 default."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION
    input_size: tuple[StrictInt, StrictInt] = Field(description="(H, W) of the network input")
    batch: int = Field(default=1, ge=1)
    dtype: Dtype = "float32"
    memory_format: MemoryFormat = "contiguous"
    runtime: Runtime = "eager"

    def describe(self) -> str:
        """``1×3×96×192 bfloat16 channels_last, runtime torch_compile``."""
        return (f"{self.batch}×3×{self.input_size[0]}×{self.input_size[1]} {self.dtype} {self.memory_format}, "
                f"runtime {self.runtime}")

    @classmethod
    def beside(cls, path: Path) -> Deployment | None:
        """The deployment written in ``path``'s directory (a genotype's or a checkpoint's), if any."""
        f = path.parent / DEPLOYMENT_FILE
        if not f.is_file():
            return None
        try:
            return cls.model_validate_json(f.read_text())
        except ValidationError as err:
            raise ValueError(f"{f}: not a deployment ({one_line(err)})") from None


DEPLOYMENT_FILE: Final = "deployment.json"


class MeasureRequest(VersionedRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"genotype": _EXAMPLE_GENOTYPE.model_dump(mode="json"), "input_size": [32, 48], "batch": 1},
    ]})
    genotype: Genotype
    input_size: tuple[StrictInt, StrictInt] = Field(description="(H, W) of the network input")
    batch: int = Field(default=1, ge=1, strict=True)
    dtype: Dtype = "float32"
    memory_format: MemoryFormat = "contiguous"
    runtime: Runtime = Field(default="eager", description="run the whole network under this runtime, exported or "
                             "compiled as one graph; its table prediction uses that runtime's rows")
    num_classes: int | None = Field(default=None, ge=1, le=1000, strict=True)

    @model_validator(mode="after")
    def _check(self) -> MeasureRequest:
        if min(self.input_size) < 1:
            raise ValueError("input_size: H and W must be positive")
        return self


class MeasuredOn(Versioned):
    """Where and how a network was timed end to end: the service's answer and the search
    client's report both start with it."""

    device: str
    environment: str
    input_size: tuple[int, int]
    batch: int
    dtype: str
    memory_format: str
    runtime: str = "eager"


class MeasurePublic(MeasuredOn):
    median_ms: float
    p10_ms: float | None = None
    p90_ms: float
    mean_ms: float
    std_ms: float
    n_samples: int
    fps: float
    predicted_ms: float | None = Field(description="plain sum of the table over the network's keys; null if keys miss")
    missing_keys: list[str] = Field(default_factory=list)
    error_pct: float | None = Field(description="(predicted − measured) / measured × 100")
    agreement: Agreement | None = Field(
        default=None, description="both sides as intervals, whether the error lies within the timing noise, and "
        "plain-words warnings (flagged rows, a host that drifted, an error larger than the noise); null if keys miss")
    host_check: HostCheck | None = Field(
        default=None, description="the host right before the network was timed: the reference workload against "
        "the environment's quiet calibration, the other processes' load, and whether it was busy")


class TableRef(BaseModel):
    device: str
    environment: str
    entries: int
    runtime: str | None = Field(default=None, description="only this runtime's rows (null: every runtime's)")


class PairComparison(TableComparison):
    """Table ``b`` against table ``a`` (ratios are b / a)."""

    a: TableRef
    b: TableRef


class ComparePublic(Versioned):
    tables: list[TableRef]
    pairs: list[PairComparison] = Field(description="every pair (i < j) of the listed tables, a = the earlier one")


class ImportPublic(Versioned):
    """What ``POST /table/import`` did with each row of the file."""

    device: str
    environment: str
    created_device: bool
    created_environment: bool
    added: int = Field(description="keys the table did not hold")
    replaced: int = Field(description="stored rows older than the file's (or any, with force=true)")
    kept: int = Field(description="stored rows newer than the file's, left as they were")
    skipped: int = Field(description="rows identical in time to the stored ones (already imported)")


class HealthPublic(Versioned):
    status: Literal["ok", "degraded"]
    database: bool
    worker: bool
    measuring: bool = Field(default=False, description="a /measure is being timed on the device now")
    measure_queue: int = Field(default=0, description="measurements waiting for the device (GAS_MEASURE_QUEUE at most)")


class FieldProblem(BaseModel):
    """One thing wrong with a request: where (``loc`` as the validator gives it, ``field`` as a
    person reads it), what, and at most 120 characters of the offending input."""

    model_config = ConfigDict(extra="ignore")
    loc: list[str | int] = []
    field: str
    msg: str
    type: str
    input: str = ""


class ErrorBody(Versioned):
    """Every error response of the service (4xx and 5xx): one line for a person, and the fields
    at fault when the error is about the request's content (empty otherwise)."""

    message: str
    detail: list[FieldProblem] = []


def split_ref(ref: str) -> tuple[str, str | None]:
    """A table reference, ``slug`` or ``slug@environment`` (the CLIs' ``--target``, ``/compare``'s
    ``tables``) → (slug, environment or None)."""
    slug, _, env = ref.partition("@")
    if not slug:
        raise ValueError(f"table reference {ref!r}: expected DEVICE or DEVICE@ENVIRONMENT")
    return slug, env or None
