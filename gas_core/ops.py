"""Candidate operations and fixed components, each behind one name→factory registry.

Every factory has the same signature ``(c_in, c_out, stride, affine) -> nn.Module`` and maps
``(N, c_in, H, W)`` to ``(N, c_out, ceil(H/stride), ceil(W/stride))`` (``upsample`` scales up
instead). The same tables build the supernet, the derived network and the latency service's
timing cases, so what is timed is exactly what runs.

The order of :data:`OPS` is the order of the last axis of α and of the latency tensor L.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from gas_core.keys import TORCH_DTYPES, TORCH_MEMORY_FORMATS, Dtype, LatencyKey, MemoryFormat, ceil_div

Factory = Callable[[int, int, int, bool], nn.Module]

ASPP_RATES: tuple[int, ...] = (6, 12, 18)
PPM_BINS: tuple[int, ...] = (1, 2, 3, 6)


Inputs = Literal["one", "sum", "concat"]


@dataclass(frozen=True)
class Entry:
    """A registered op or component and every fact about it the rest of the system needs: the
    network's structure, the latency keys, the key checks and the timing cases read these fields,
    never the name."""

    name: str
    factory: Factory
    zero_cost: bool = False
    """True when the derived network drops the op (``none``): it costs nothing and has no key."""
    strides: tuple[int, ...] | None = (1, 2)
    """The strides it runs at; None: any positive factor (``upsample``'s scale factor)."""
    inputs: Inputs = "one"
    """``one`` tensor; ``sum``: n ≥ 2 tensors of c_in channels → c_in; ``concat``: n ≥ 2 → n·c_in."""
    sized_by_output: bool = False
    """Called as ``(x, (H, W))``, resizing x to (H, W); its key's h, w are that output size and its
    input is ceil(h / stride) (``upsample``: a segmentation net's output size is the image's,
    which the downsampled size does not determine)."""
    same_channels: bool = False
    """c_out must equal c_in (``upsample``, ``node_sum``)."""
    in_graph: bool = True
    """Under a one-graph runtime its keys may be timed inside a graph, as the marginal cost of
    one more copy (:func:`in_graph_form`, docs/latency-key.md "In-graph keys"). False for
    ``graph_call``, which *is* the graph's entry."""
    fans_out: bool = False
    """Two copies reading one input stay two computations (each has its own weights), so a key
    whose output cannot feed a copy of itself can still be timed inside a graph as one more
    copy beside it (``fan_out``). False where a runtime would merge the copies, as common
    subexpressions, into one (a weightless pool, a resize)."""


class Registry:
    """Ordered name → :class:`Entry` table; registering a name twice is an error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **facts: Any) -> Callable[[Factory], Factory]:
        """Decorator: ``facts`` are :class:`Entry`'s fields after ``factory``."""

        def deco(factory: Factory) -> Factory:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, factory, **facts)
            return factory

        return deco

    @contextmanager
    def registered(self, name: str, factory: Factory, **facts: Any) -> Iterator[Entry]:
        """Register ``name`` for the duration of a ``with`` block (tests, experiments): the
        candidate list, α's last axis, the keys and the networks all see it until the block ends."""
        self.register(name, **facts)(factory)
        try:
            yield self._entries[name]
        finally:
            del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)


OPS = Registry("op")
COMPONENTS = Registry("component")


# ---------------------------------------------------------------- building blocks


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, pad: int, dil: int, affine: bool) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, k, stride, pad, dilation=dil, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """ReLU → 3×3 depthwise (dilated) → 1×1 pointwise → BN, as docs/architecture.md defines it."""

    def __init__(self, c_in: int, c_out: int, stride: int, dil: int, affine: bool) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, stride, dil, dilation=dil, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1×1 stride-2 convs. Odd sides are padded on the
    bottom/right before the offset branch so both halves give ``ceil(H/2)`` (DARTS' version
    breaks on odd sizes such as 769×1537)."""

    def __init__(self, c_in: int, c_out: int, affine: bool) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


class Zero(nn.Module):
    """The ``none`` op: zeros of the output shape. Only the supernet runs it."""

    def __init__(self, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_out = c_out
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return x.new_zeros(n, self.c_out, ceil_div(h, self.stride), ceil_div(w, self.stride))


class PoolBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, affine: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride, 1)
        self.proj = (
            None
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=affine))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return x if self.proj is None else self.proj(x)


class NodeSum(nn.Module):
    """Intermediate node: element-wise sum of its incoming edges, ``n × (N, C, H, W) → (N, C, H, W)``."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Chain(nn.Module):
    """``links`` copies of one component (distinct weights, as a network's ops have), each feeding
    its output to the next: ``(N, C, H, W), *rest → (N, C, H, W)``. ``rest`` (a node sum's other
    inputs) is passed to every link. The shape a one-graph runtime's key is timed in, so that the
    difference of two chain lengths is what one more such component costs *inside* a graph."""

    def __init__(self, links: list[nn.Module]) -> None:
        super().__init__()
        self.links = nn.ModuleList(links)

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        for link in self.links:
            x = link(x, *rest)
        return x


class FanOut(nn.Module):
    """``terms`` outputs of components that all read one input, summed:
    ``(N, C, H, W) → (N, C', H', W')``. With as many copies as terms (distinct weights) each
    term is its own computation; with one copy its output is summed ``terms`` times. The two
    differ by ``terms − 1`` copies and have the same adds, input and output: the shape in which
    a one-graph runtime's key that cannot feed itself is timed inside a graph."""

    def __init__(self, copies: list[nn.Module], terms: int) -> None:
        super().__init__()
        if len(copies) not in (1, terms):
            raise ValueError(f"a fan-out of {terms} terms takes 1 or {terms} copies, got {len(copies)}")
        self.copies = nn.ModuleList(copies)
        self.terms = terms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [c(x) for c in self.copies]
        if len(ys) == 1:
            ys = ys * self.terms
        out = ys[0]
        for y in ys[1:]:
            out = out + y
        return out


class Concat(nn.Module):
    """Cell output: channel concat of the intermediate nodes, ``n × (N, C, H, W) → (N, nC, H, W)``."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


def conv_bn_relu(c_in: int, c_out: int, k: int, pad: int = 0, dil: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, 1, pad, dilation=dil, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling at output stride 16: 1×1, three 3×3 at rates 6/12/18,
    image pooling (conv + ReLU, trainable at batch 1); concat → 1×1 projection.
    ``(N, c_in, h, w) → (N, c_out, h, w)``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(c_in, c_out, 1)] + [conv_bn_relu(c_in, c_out, 3, r, r) for r in ASPP_RATES]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        # no BN on the 1×1 pooled branch: it has one value per channel at batch 1
        self.pool_proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.ReLU())
        self.project = conv_bn_relu(c_out * (len(ASPP_RATES) + 2), c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = F.interpolate(self.pool_proj(self.pool(x)), size=size, mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet) with bins 1/2/3/6; concat with the input → 3×3 fuse.
    ``(N, c_in, h, w) → (N, c_out, h, w)``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = max(1, c_in // len(PPM_BINS))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(c_in, mid, 1)) for b in PPM_BINS
        )
        self.fuse = conv_bn_relu(c_in + mid * len(PPM_BINS), c_out, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [x] + [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return self.fuse(torch.cat(feats, dim=1))


class Upsample(nn.Module):
    """Bilinear resize of the logits to the image size: ``(N, C, h, w), (H, W) → (N, C, H, W)``."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class GraphCall(nn.Module):
    """The smallest graph a runtime can run: one add on a ``(N, 1, 1, 1)`` tensor. Timed as its
    own graph it costs what entering any graph costs (a session's run, a compiled call's guards,
    a replay's launch) and next to nothing else: the ``graph_call`` key of a one-graph runtime."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


# ---------------------------------------------------------------- candidate ops (fixed order)


@OPS.register("none", zero_cost=True)
def _none(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return Zero(c_out, stride)


@OPS.register("max_pool_3x3")
def _max_pool(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return PoolBN(c_in, c_out, stride, affine)


@OPS.register("skip_connect", fans_out=True)
def _skip(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    if stride == 2:
        return FactorizedReduce(c_in, c_out, affine)
    if c_in != c_out:
        return ReLUConvBN(c_in, c_out, 1, 1, 0, 1, affine)
    return nn.Identity()


@OPS.register("conv_3x3", fans_out=True)
def _conv(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return ReLUConvBN(c_in, c_out, 3, stride, 1, 1, affine)


def _register_sep(name: str, dil: int) -> None:
    @OPS.register(name, fans_out=True)
    def _sep(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
        return SepConv(c_in, c_out, stride, dil, affine)


_register_sep("sep_conv_3x3", 1)
for _d in (2, 4, 8):
    _register_sep(f"dil_sep_conv_3x3_d{_d}", _d)

PRIMITIVES: tuple[str, ...] = OPS.names()
"""The paper's candidate ops, in α's order. gas_core itself reads ``OPS.names()``, so an op
registered later (:meth:`Registry.registered`) joins the search space everywhere at once."""


# ---------------------------------------------------------------- fixed components


@COMPONENTS.register("stem_conv", fans_out=True)
def _stem_conv(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out, affine=affine), nn.ReLU()
    )


@COMPONENTS.register("preprocess_1x1", strides=(1,), fans_out=True)
def _pre_1x1(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return ReLUConvBN(c_in, c_out, 1, 1, 0, 1, affine)


@COMPONENTS.register("preprocess_reduce", strides=(2,), fans_out=True)
def _pre_reduce(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return FactorizedReduce(c_in, c_out, affine)


@COMPONENTS.register("node_sum", strides=(1,), inputs="sum", same_channels=True)
def _node_sum(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return NodeSum()


@COMPONENTS.register("concat", strides=(1,), inputs="concat")
def _concat(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return Concat()


@COMPONENTS.register("head_aspp", strides=(1,), fans_out=True)
def _aspp(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return ASPP(c_in, c_out)


@COMPONENTS.register("head_ppm", strides=(1,), fans_out=True)
def _ppm(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return PPM(c_in, c_out)


@COMPONENTS.register("classifier", strides=(1,), fans_out=True)
def _classifier(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return nn.Conv2d(c_in, c_out, 1)


@COMPONENTS.register("upsample", strides=None, sized_by_output=True, same_channels=True)
def _upsample(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return Upsample()


@COMPONENTS.register("graph_call", strides=(1,), same_channels=True, in_graph=False)
def _graph_call(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    return GraphCall()


# ---------------------------------------------------------------- the one resolver


@dataclass(frozen=True)
class KeySpec:
    """What a built component needs, beside its input's shape, to name its latency key."""

    op: str
    c_in: int
    c_out: int
    stride: int


def resolve(name: str) -> Entry:
    """Look a name up in the candidate ops, then the fixed components."""
    if name in OPS:
        return OPS[name]
    if name in COMPONENTS:
        return COMPONENTS[name]
    raise KeyError(f"unknown op or component {name!r}; ops: {', '.join(OPS)}; components: {', '.join(COMPONENTS)}")


def build_component(name: str, c_in: int, c_out: int, stride: int = 1, affine: bool = True) -> nn.Module:
    """Build any op or component by name and tag it with its :class:`KeySpec`, so a forward
    hook can reconstruct the exact latency key of every call (see the coverage test)."""
    if c_in < 1 or c_out < 1 or stride < 1:
        raise ValueError(f"{name}: channels and stride must be positive, got c_in={c_in} c_out={c_out} stride={stride}")
    module = resolve(name).factory(c_in, c_out, stride, affine)
    module.key_spec = KeySpec(name, c_in, c_out, stride)  # type: ignore[assignment]
    return module


def key_of_call(module: nn.Module, args: tuple, dtype: Dtype, memory_format: MemoryFormat) -> LatencyKey:
    """The latency key of one forward call of a tagged module."""
    spec = cast(KeySpec, module.key_spec)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    n, _, h, w = tensors[0].shape
    if resolve(spec.op).sized_by_output:
        h, w = args[1]
    return LatencyKey(
        op=spec.op,
        c_in=spec.c_in,
        c_out=spec.c_out,
        h=int(h),
        w=int(w),
        stride=spec.stride,
        n_inputs=len(tensors),
        batch=int(n),
        dtype=dtype,
        memory_format=memory_format,
    )


def check_key(key: LatencyKey) -> None:
    """Raise ``ValueError`` naming the field when ``key`` describes nothing a GAS network runs
    (the rules are the registry entry's facts)."""
    try:
        entry = resolve(key.op)
    except KeyError as err:
        raise ValueError(f"op: {err.args[0]}") from None
    if entry.zero_cost:
        raise ValueError(f"op: {key.op!r} costs nothing (the derived network drops it); it has no table entry")
    if entry.inputs == "one" and key.n_inputs != 1:
        raise ValueError(f"n_inputs: {key.op} takes one input, got {key.n_inputs}")
    if entry.inputs != "one" and key.n_inputs < 2:
        raise ValueError(f"n_inputs: {key.op} takes 2 or more inputs, got {key.n_inputs}")
    if entry.inputs == "concat" and key.c_out != key.c_in * key.n_inputs:
        raise ValueError(f"c_out: {key.op} gives c_in × n_inputs = {key.c_in * key.n_inputs} channels, got {key.c_out}")
    if entry.same_channels and key.c_out != key.c_in:
        raise ValueError(f"c_out: {key.op} keeps its {key.c_in} channels, got {key.c_out}")
    if entry.strides is not None and key.stride not in entry.strides:
        runs = " or ".join(map(str, entry.strides))
        raise ValueError(f"stride: {key.op} runs at stride {runs}, got {key.stride}")


InGraphForm = Literal["chain", "fan_out"]


def in_graph_form(key: LatencyKey) -> InGraphForm | None:
    """How ``key``'s component can be timed inside a graph, as the marginal cost of one more
    copy: ``chain`` when it can feed its output to a copy of itself (one input, or a sum whose
    other inputs each link reuses, at stride 1 with as many channels out as in, not sized by its
    output); else ``fan_out`` when copies reading one input stay distinct
    (:attr:`Entry.fans_out`); else None (a concat, a resize, a weightless pool at stride 2, the
    graph entry: timed as their own graph)."""
    entry = resolve(key.op)
    if not entry.in_graph or entry.zero_cost or entry.sized_by_output:
        return None
    if key.stride == 1 and (entry.inputs == "sum" or (entry.inputs == "one" and key.c_in == key.c_out)):
        return "chain"
    return "fan_out" if entry.fans_out and entry.inputs == "one" else None


def key_input_shapes(key: LatencyKey) -> list[tuple[int, int, int, int]]:
    """NCHW shapes of the tensors a component receives for ``key`` (see :class:`Entry`)."""
    if resolve(key.op).sized_by_output:
        return [(key.batch, key.c_in, ceil_div(key.h, key.stride), ceil_div(key.w, key.stride))]
    return [(key.batch, key.c_in, key.h, key.w)] * key.n_inputs


def build_timing_case(
    key: LatencyKey, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
    copies: int = 1, shared: bool = False,
) -> tuple[nn.Module, tuple]:
    """Module (eval mode, on ``device`` in the key's dtype and memory format) and the exact
    positional arguments a network passes it for ``key``. Raises ``ValueError`` for a bad key.
    ``copies`` > 1: the key's :func:`in_graph_form` with that many copies (a :class:`Chain`, or
    a :class:`FanOut` of as many terms); ``shared``: a fan-out's terms all from one copy."""
    check_key(key)
    form = in_graph_form(key)
    if copies < 1 or (copies > 1 and form is None) or (shared and form != "fan_out"):
        raise ValueError(f"op: {key.op} at this key cannot be timed inside a graph as {copies} copies")
    built = [build_component(key.op, key.c_in, key.c_out, key.stride) for _ in range(1 if shared else copies)]
    module = (built[0] if copies == 1 else Chain(built) if form == "chain" else FanOut(built, copies)).eval()
    dtype = TORCH_DTYPES[key.dtype]
    fmt = TORCH_MEMORY_FORMATS[key.memory_format]
    module = module.to(device=device, dtype=dtype, memory_format=fmt)  # type: ignore[call-overload]
    inputs = [
        torch.randn(shape, generator=generator).to(device=device, dtype=dtype, memory_format=fmt)
        for shape in key_input_shapes(key)
    ]
    args: tuple = (inputs[0], (key.h, key.w)) if resolve(key.op).sized_by_output else tuple(inputs)
    return module, args
