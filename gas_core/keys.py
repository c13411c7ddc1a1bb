"""The latency key: the exact configuration one timed kernel runs at (docs/latency-key.md).

Both sides of the system speak in keys: the search client computes the keys of its supernet
from :func:`gas_core.search_space.cell_shapes` and asks for them; the latency service profiles
a key by building :func:`gas_core.ops.build_component` at :func:`gas_core.ops.key_input_shapes`.

Convention for ``h``/``w``: they are the spatial size of the component's (first) input, except
for ``upsample``, where they are the *output* size and the input is ``ceil(h / stride)`` —
the output size of a segmentation network is the image size, which the downsampled size does
not determine.
"""

from __future__ import annotations

import hashlib
from typing import Literal, get_args

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Dtype = Literal["float32", "float16", "bfloat16"]
MemoryFormat = Literal["contiguous", "channels_last"]
Runtime = Literal["eager", "onnxruntime", "torch_compile", "cuda_graph", "tensorrt"]

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
MEMORY_FORMATS: tuple[str, ...] = ("contiguous", "channels_last")
RUNTIMES: tuple[str, ...] = get_args(Runtime)  # each one entry of gas_core.runtimes.REGISTRY

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
TORCH_MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
}

KEY_HASH_LEN = 32
KEY_MAX_LEN = 256
"""Longest canonical key string (the database column's width)."""


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


NO_NUL = AfterValidator(_no_nul)
"""On every free-form string, beside its ``max_length``: PostgreSQL refuses NUL in text and SQLite
stores it, so the check comes before either sees it and both backends answer the same 422."""

INT32_MAX = 2**31 - 1
"""Upper bound of every integer field of a key or a table row: what SQLite and PostgreSQL
integer columns hold, so an absurd value is a 422 naming the field, not a database overflow."""
MAX_US = 1e12
"""Upper bound of every stored latency statistic and sample (µs; about 11.6 days): a sum of any
table's rows stays finite, so no arithmetic on stored figures can overflow."""
MIN_RATIO_US = 1e-3
"""Latencies below this (1 ns) are below any timer's resolution: a ratio against one is
undefined (null), never an underflow or an overflow."""


class LatencyKey(BaseModel):
    """One row of a latency lookup table. Immutable and hashable, so sets of keys dedupe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: str = Field(min_length=1, max_length=64, description="candidate op or fixed component name")
    c_in: int = Field(ge=1, le=INT32_MAX, strict=True, description="input channels (per input)")
    c_out: int = Field(ge=1, le=INT32_MAX, strict=True, description="output channels")
    h: int = Field(ge=1, le=INT32_MAX, strict=True, description="input height (output height for upsample)")
    w: int = Field(ge=1, le=INT32_MAX, strict=True, description="input width (output width for upsample)")
    stride: int = Field(ge=1, le=INT32_MAX, strict=True, description="spatial stride (upsample: scale factor)")
    n_inputs: int = Field(default=1, ge=1, le=16, strict=True, description="tensors fed (node_sum, concat)")
    batch: int = Field(ge=1, le=INT32_MAX, strict=True)
    dtype: Dtype = "float32"
    memory_format: MemoryFormat = "contiguous"
    runtime: Runtime = "eager"

    @property
    def canonical(self) -> str:
        """One string per key; field order is fixed so equal keys give equal strings."""
        return (
            f"{self.op}|cin={self.c_in}|cout={self.c_out}|h={self.h}|w={self.w}|s={self.stride}"
            f"|n={self.n_inputs}|b={self.batch}|{self.dtype}|{self.memory_format}|{self.runtime}"
        )

    @property
    def key_hash(self) -> str:
        """Stable across processes and machines (unlike ``hash()``): sha256 of the canonical string."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:KEY_HASH_LEN]

    @classmethod
    def from_canonical(cls, text: str) -> LatencyKey:
        """Inverse of :attr:`canonical`; raises ``ValueError`` naming the malformed part."""
        parts = text.split("|")
        if len(parts) != 11:
            raise ValueError(f"canonical key needs 11 '|'-separated parts, got {len(parts)}: {text!r}")
        fields: dict[str, object] = {"op": parts[0]}
        names = {"cin": "c_in", "cout": "c_out", "h": "h", "w": "w", "s": "stride", "n": "n_inputs", "b": "batch"}
        for part in parts[1:8]:
            name, _, value = part.partition("=")
            if name not in names or not value.isdigit():
                raise ValueError(f"malformed key part {part!r} in {text!r}")
            fields[names[name]] = int(value)
        fields["dtype"], fields["memory_format"], fields["runtime"] = parts[8:11]
        return cls.model_validate(fields)


def without_runtime(canonical: str) -> str:
    """A canonical key less its runtime part: the same component at the same shape, under any
    runtime, so tables of two runtimes can be matched key by key."""
    return canonical.rsplit("|", 1)[0]


def ceil_div(n: int, d: int) -> int:
    """Output size of a 3×3/pad-1 or 1×1 conv/pool with stride ``d`` on a side of ``n``."""
    return -(-n // d)


def key_pixels(key: LatencyKey) -> int:
    """Largest activation a key allocates, in elements: used by the service to bound requests."""
    return key.batch * max(key.c_in * key.n_inputs, key.c_out) * key.h * key.w
