"""Latency tables as data, and the maths of comparing two of them.

A table is one (device, environment)'s rows: a :class:`gas_core.keys.LatencyKey` with the
statistics of its timing. :class:`LatencyTable` is both the service's ``GET /table`` JSON body and
the export artefact (``gas-table export`` / ``import``), so a table moves between fleets exactly as
it is served: identity, method and every raw sample.

The comparison helpers are pure functions over ``{canonical key: (op, median µs)}`` maps:
per-key ratio b / a, geometric-mean ratio, Spearman ρ and Kendall τ-b of the latencies.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from scipy import stats

from gas_core.keys import INT32_MAX, KEY_HASH_LEN, KEY_MAX_LEN, MAX_US, MIN_RATIO_US, NO_NUL, LatencyKey
from gas_core.quality import RowQuality

TABLE_SCHEMA_VERSION: Final = 1
TABLE_KIND: Final = "gas-latency-table"
SLUG_PATTERN: Final = r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$"
"""Lower-case words joined by single ``-``, ``_`` or ``.``: no ``/``, ``..``, ``,`` or ``@``,
which would make a table impossible to fetch (``/table/{slug}``) or to name in ``/compare``
(``slug@environment``, comma-separated)."""
Int32 = Annotated[int, Field(ge=0, le=INT32_MAX, strict=True)]
Micros = Annotated[float, Field(ge=0, le=MAX_US, allow_inf_nan=False)]

JSON_MAX_DEPTH: Final = 8
JSON_MAX_BYTES: Final = 16_384


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value, iteratively (a recursive walk is what failed on 300 levels)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    depth = json_depth(value)
    if depth > JSON_MAX_DEPTH:
        raise ValueError(f"nested {depth} levels deep; at most {JSON_MAX_DEPTH}")
    size = len(json.dumps(value))
    if size > JSON_MAX_BYTES:
        raise ValueError(f"{size} bytes as JSON; at most {JSON_MAX_BYTES}")
    return value


FreeJson = Annotated[dict[str, Any], AfterValidator(_bounded)]
"""A free-form object from outside (device and environment info, a row's method): bounded in
depth and size, so an import cannot store something no later response can serialize."""


def clip_json(value: Any, depth: int = JSON_MAX_DEPTH) -> Any:
    """``value`` with every container deeper than ``depth`` replaced by a string saying so: what
    the service answers for a free-form field stored before imports were bounded."""
    if not isinstance(value, dict | list):
        return value
    if depth <= 1 and any(isinstance(c, dict | list) for c in (value.values() if isinstance(value, dict) else value)):
        return f"<clipped: nested deeper than {JSON_MAX_DEPTH} levels>"
    if isinstance(value, dict):
        return {k: clip_json(v, depth - 1) for k, v in value.items()}
    return [clip_json(v, depth - 1) for v in value]


def environment_fingerprint(info: Mapping[str, Any]) -> str:
    """16 hex digits naming an environment: sha256 of its info as sorted JSON. Recomputable, so
    an imported table whose info was edited after export is caught."""
    return hashlib.sha256(json.dumps(dict(info), sort_keys=True).encode()).hexdigest()[:16]


class TableDevice(BaseModel):
    slug: str = Field(min_length=1, max_length=128, pattern=SLUG_PATTERN,
                      description="stable name of the hardware, e.g. nvidia-h100-80gb-hbm3")
    kind: Literal["cpu", "cuda"]
    name: Annotated[str, Field(max_length=256), NO_NUL]
    info: FreeJson = Field(default_factory=dict)


class TableEnvironment(BaseModel):
    fingerprint: Annotated[str, Field(min_length=1, max_length=32), NO_NUL]
    info: FreeJson = Field(default_factory=dict)
    entries: int | None = Field(default=None, description="rows of this environment")
    created_at: datetime | None = None
    origin: Literal["measured", "imported"] | None = Field(
        default=None, description="measured: a host of this service's database timed it (a device's default table "
        "prefers these); imported: it came from a file. Ignored on import")


class TableEntry(BaseModel):
    """One timed key. ``key`` is the canonical string; the key's fields are repeated as columns so
    CSV users can filter without parsing it, and checked against it on input."""

    key: Annotated[str, Field(max_length=KEY_MAX_LEN), NO_NUL]
    key_hash: Annotated[str, Field(max_length=KEY_HASH_LEN), NO_NUL]
    op: Annotated[str, Field(max_length=64), NO_NUL]
    c_in: Int32
    c_out: Int32
    h: Int32
    w: Int32
    stride: Int32
    n_inputs: Int32
    batch: Int32
    dtype: Annotated[str, Field(max_length=16), NO_NUL]
    memory_format: Annotated[str, Field(max_length=16), NO_NUL]
    runtime: Annotated[str, Field(max_length=16), NO_NUL]
    median_us: Micros
    p10_us: Micros
    p90_us: Micros
    mean_us: Micros
    std_us: Micros
    n_samples: int = Field(ge=1, le=INT32_MAX, strict=True)
    iters_per_sample: int = Field(ge=1, le=INT32_MAX, strict=True)
    timer: Annotated[str, Field(max_length=32), NO_NUL]
    method: FreeJson | None = Field(default=None, description="profiler settings the row was timed with")
    gpu_clock_mhz: Int32 | None = None
    gpu_temp_c: Int32 | None = None
    flagged: bool = Field(default=False, description="stored although unstable: its samples spread too far, or the "
                          "host drifted while it was timed; see quality.reasons")
    quality: RowQuality | None = Field(default=None, description="the verdict and the figures it rests on")
    created_at: datetime
    origin: Literal["measured", "imported"] | None = Field(
        default=None, description="measured: timed by a host of this service's database; imported: merged from a "
        "file (an import into a measured environment needs force=true). Ignored on import")
    samples_us: list[Annotated[float, Field(ge=-MAX_US, le=MAX_US, allow_inf_nan=False)]] | None = Field(
        default=None, description="every raw sample, µs per run (samples=true)")

    def latency_key(self) -> LatencyKey:
        """The parsed key; ``ValueError`` if the string is not the key's canonical form (``cin=08``,
        other digits, leading zeros: a lookup by the canonical string would never find the row,
        and a later profile would skip the key as stored), or its hash or columns disagree."""
        key = LatencyKey.from_canonical(self.key)
        if key.canonical != self.key:
            raise ValueError(f"key {self.key[:120]!r} is not canonical; its canonical form is {key.canonical!r}")
        if key.key_hash != self.key_hash:
            raise ValueError(f"key_hash {self.key_hash} is not the hash of {self.key!r} ({key.key_hash})")
        for name, value in key.model_dump().items():
            if getattr(self, name) != value:
                raise ValueError(f"column {name}={getattr(self, name)!r} disagrees with key {self.key!r}")
        return key


class LatencyTable(BaseModel):
    """``GET /table/{device}`` and the ``gas-table export`` artefact."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = TABLE_SCHEMA_VERSION
    kind: Literal["gas-latency-table"] = TABLE_KIND
    device: TableDevice
    environment: TableEnvironment
    entries: list[TableEntry]

    def lookup(self) -> dict[str, float]:
        """Canonical key → median µs: what :class:`gas_core.latency.LatencyTerm` consumes."""
        return {e.key: e.median_us for e in self.entries}

    @model_validator(mode="after")
    def _unique_keys(self) -> LatencyTable:
        seen: set[str] = set()
        for i, e in enumerate(self.entries):
            if e.key in seen:
                raise ValueError(f"entries[{i}]: key {e.key!r} appears twice")
            seen.add(e.key)
        return self


# ---------------------------------------------------------------- comparison maths


def ratio(a_us: float, b_us: float) -> float | None:
    """b / a where both lie in [MIN_RATIO_US, MAX_US], so the ratio lies in [1e-15, 1e15]: finite,
    never 0, and its logarithm defined (a stored 1e308 against 1e-300 raised in the geometric mean)."""
    ok = all(MIN_RATIO_US <= x <= MAX_US for x in (a_us, b_us))
    return b_us / a_us if ok else None


def geomean(xs: Sequence[float]) -> float | None:
    """Geometric mean of positive numbers; None for none."""
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def _rank_correlation(name: str, fn: Any, a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) != len(b):
        raise ValueError(f"{name}: {len(a)} vs {len(b)} values")
    if len(a) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        value = float(fn(a, b).statistic)
    return None if math.isnan(value) else value


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman ρ (scipy.stats.spearmanr: Pearson on average ranks); None when undefined (n < 2
    or a constant side)."""
    return _rank_correlation("spearman", stats.spearmanr, a, b)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall τ-b (scipy.stats.kendalltau, O(n log n), so ``/compare`` stays fast on tables of
    thousands of keys); None when undefined (n < 2 or a constant side)."""
    return _rank_correlation("kendall_tau", stats.kendalltau, a, b)


class OpComparison(BaseModel):
    keys: int
    geomean_ratio: float | None
    min_ratio: float | None
    max_ratio: float | None


class KeyComparison(BaseModel):
    key: str
    op: str
    a_us: float
    b_us: float
    ratio: float | None = Field(description="b / a; null when either latency is below 0.001 µs (the timer's "
                                "resolution, e.g. 0) or above 1e12 µs")


class TableComparison(BaseModel):
    """Table b against table a over the keys both hold."""

    common_keys: int
    only_a: int = Field(description="keys only in table a")
    only_b: int = Field(description="keys only in table b")
    geomean_ratio: float | None = Field(description="geometric mean of b / a over the common keys with a ratio")
    spearman: float | None = Field(description="Spearman ρ of the common keys' latencies")
    kendall: float | None = Field(description="Kendall τ-b of the common keys' latencies")
    per_op: dict[str, OpComparison]
    keys: list[KeyComparison]


def compare_tables(a: Mapping[str, tuple[str, float]], b: Mapping[str, tuple[str, float]]) -> TableComparison:
    """Compare two ``{canonical key: (op, median µs)}`` maps."""
    common = sorted(set(a) & set(b))
    rows = []
    for k in common:
        ua, ub = a[k][1], b[k][1]
        rows.append(KeyComparison(key=k, op=a[k][0], a_us=ua, b_us=ub, ratio=ratio(ua, ub)))
    by_op: dict[str, list[KeyComparison]] = {}
    for r in rows:
        by_op.setdefault(r.op, []).append(r)
    per_op = {}
    for op, op_rows in sorted(by_op.items()):
        rs = [r.ratio for r in op_rows if r.ratio is not None]
        per_op[op] = OpComparison(keys=len(op_rows), geomean_ratio=geomean(rs), min_ratio=min(rs, default=None),
                                  max_ratio=max(rs, default=None))
    ratios = [r.ratio for r in rows if r.ratio is not None]
    la, lb = [r.a_us for r in rows], [r.b_us for r in rows]
    return TableComparison(
        common_keys=len(common), only_a=len(set(a) - set(b)), only_b=len(set(b) - set(a)),
        geomean_ratio=geomean(ratios), spearman=spearman(la, lb), kendall=kendall_tau(la, lb), per_op=per_op,
        keys=rows,
    )
