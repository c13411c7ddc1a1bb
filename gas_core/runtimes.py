"""The runtimes a network ships on, one registry entry each (docs/latency-key.md, "Runtimes").

A latency key's ``runtime`` names how its component is run when timed: ``eager`` PyTorch, or
exported/compiled at the key's exact shape, the way a deployment would run it: as its own graph,
or as one more copy inside a graph of copies of itself where it can be (:func:`in_graph`).
Each entry says which devices, dtypes and memory formats it serves, how to find its version
(absent: not installed) and what to install, and turns a ``(module, args)`` pair into a
zero-argument callable that runs it. The service times that callable with its usual method; a
whole derived network goes through the same entry for ``/measure``, so a table and an
end-to-end figure of one runtime always describe the same execution.

BatchNorm is folded into the conv before it for ``onnxruntime`` and ``tensorrt`` (their
exporters fold it) and left to inductor for ``torch_compile`` (it folds it when it freezes
weights, which it does not do by default: the table then times what ``torch.compile`` runs).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from gas_core.keys import LatencyKey, Runtime
from gas_core.ops import InGraphForm, in_graph_form

ONNX_OPSET = 17
Prepared = Callable[[], object]


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every BatchNorm2d that directly follows a Conv2d in a
    Sequential folded into that conv (the BN becomes Identity). Returns (copy, folds). Shapes and
    outputs are unchanged up to float rounding."""
    folded = copy.deepcopy(model).eval()
    n = 0
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                n += 1
    return folded, n


class _TensorArgs(nn.Module):
    """Wraps a component whose call takes a non-tensor argument (upsample's output size) so the
    exporter sees tensors only; the constant is baked into the graph, as it is at that shape."""

    def __init__(self, module: nn.Module, args: tuple) -> None:
        super().__init__()
        self.module = module
        self.tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.args = args

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        for i, t in zip(self.tensor_at, tensors, strict=True):
            args[i] = t
        return self.module(*args)


def onnx_model(module: nn.Module, args: tuple, dynamic_batch: bool = False) -> bytes:
    """``module`` (BN folded) exported to ONNX at the exact shapes of ``args``: the model bytes.
    Non-tensor arguments become constants of the graph."""
    folded, _ = fold_batchnorm(module)
    wrapped = _TensorArgs(folded, args).eval()
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    names = [f"x{i}" for i in range(len(tensors))]
    axes = {n: {0: "batch"} for n in [*names, "y"]} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="gas-onnx-") as tmp, torch.no_grad():
        path = Path(tmp) / "component.onnx"
        torch.onnx.export(wrapped, tensors, str(path), input_names=names, output_names=["y"], dynamic_axes=axes,
                          opset_version=ONNX_OPSET, dynamo=False)
        return path.read_bytes()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- the runtimes


def _eager(module: nn.Module, args: tuple, device: torch.device) -> Prepared:
    return lambda: module(*args)


def _onnxruntime(module: nn.Module, args: tuple, device: torch.device) -> Prepared:
    """An InferenceSession of the component's own graph: CUDA provider on a GPU (onnxruntime-gpu),
    else CPU with as many intra-op threads as torch uses, so both runtimes get the same cores.

    Inputs and the output are bound once to buffers allocated here (IO binding), as a deployment
    that keeps its tensors would run it: ``sess.run`` would hand each call's output back as a new
    numpy array, a copy of the output tensor that a component inside a network never pays, and
    that grows with the tensor (``graph_call``, a one-element graph, cannot take it off). The
    callable answers the bound output, a ``(N, C, H, W)`` float32 tensor on ``device``, rewritten
    in place by each call."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    cpu_module = module.float().cpu()
    cpu_args = tuple(a.float().cpu().contiguous() if isinstance(a, torch.Tensor) else a for a in args)
    sess = ort.InferenceSession(onnx_model(cpu_module, cpu_args), opts, providers=providers)
    given = {f"x{i}": a for i, a in enumerate(a for a in cpu_args if isinstance(a, torch.Tensor))}
    inputs = {i.name: given[i.name].to(device) for i in sess.get_inputs()}  # the exporter drops an unread input
    out = torch.empty(sess.get_outputs()[0].shape, dtype=torch.float32, device=device)  # static: exported at this shape
    kind, index = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
    binding = sess.io_binding()
    for name, t in inputs.items():
        binding.bind_input(name, kind, index, np.float32, list(t.shape), t.data_ptr())
    binding.bind_output("y", kind, index, np.float32, list(out.shape), out.data_ptr())
    return _BoundSession(sess, binding, inputs, out)


@dataclass(frozen=True)
class _BoundSession:
    """An ONNX Runtime session with its inputs and output bound to ``inputs``/``out``; holding
    them here keeps the memory the binding points at alive as long as the callable."""

    sess: Any
    binding: Any
    inputs: dict[str, torch.Tensor]
    out: torch.Tensor

    def __call__(self) -> torch.Tensor:
        self.sess.run_with_iobinding(self.binding)
        return self.out


def _torch_compile(module: nn.Module, args: tuple, device: torch.device) -> Prepared:
    """``torch.compile`` (inductor) of the component at this shape; compiled here, by a first
    call, so the timed calls run the compiled code only.

    Dynamo's caches are reset first: every instance of one op class shares a ``forward``, and
    after ``recompile_limit`` (8) shapes dynamo silently runs the rest eagerly, so a table's
    9th ``sep_conv_3x3`` on would have timed eager PyTorch under the name torch_compile. A
    compile that neither produced a graph nor converted the frame (an identity has nothing to
    compile, but its frame converts) is an error, never a silent eager timing.

    The reset also drops what earlier ``prepare`` calls compiled: called again, such a callable
    recompiles, and once one ``forward`` has recompiled past the limit dynamo would run it
    eagerly, silently (a benchmark that prepared 17 prefixes of one network, then timed them,
    timed the last nine eagerly). Hitting the limit is made an error instead, process-wide:
    dynamo reads the flag at each call, and patching it around every call costs ~27 µs."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch.compiler.reset()
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
    compiled = torch.compile(module, backend="inductor", dynamic=False)
    compiled(*args)
    if counters["stats"]["unique_graphs"] == graphs and counters["frames"]["ok"] == frames:
        raise RuntimeError(f"torch.compile did not compile {type(module).__name__}: it would run eagerly")
    return lambda: compiled(*args)


def _cuda_graph(module: nn.Module, args: tuple, device: torch.device) -> Prepared:
    """The component's kernels captured once into a CUDA graph and replayed: what is left is the
    kernels' own time, without Python or launch overhead."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm up off the capture (cuDNN picks its algorithms here)
        for _ in range(3):
            module(*args)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(*args)
    return graph.replay


def _tensorrt(module: nn.Module, args: tuple, device: torch.device) -> Prepared:
    raise NotImplementedError("timing under TensorRT is not implemented in this version; time its ONNX graph "
                              "with runtime onnxruntime, or with trtexec from `gas-export`'s model.onnx")


def _cxx_compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


@dataclass(frozen=True)
class RuntimeEntry:
    """One runtime: where it runs, what it needs, how it prepares a component."""

    name: str
    devices: frozenset[str]
    dtypes: frozenset[str]
    memory_formats: frozenset[str]
    package: str | None
    """distribution whose version is the runtime's (None: torch itself)"""
    install: str
    prepare: Callable[[nn.Module, tuple, torch.device], Prepared]
    needs_cxx_on_cpu: bool = False
    one_graph: bool = False
    """A network under this runtime is one graph entered by one call (an ONNX session's run, a
    compiled module's call, a graph replay), while each own-graph key's timing entered its graph:
    its table then holds a ``graph_call`` key, the cost of that entry, which a network pays once
    (:attr:`gas_core.search_space.NetworkShapes.call`; docs/latency-key.md, "Runtimes")."""

    context_timing: bool = False
    """Whether the service's context method (each run after eager kernels that evict the caches,
    docs/timing.md) applies. Eager only: between two calls of an ONNX Runtime session or a compiled
    module those eager kernels disturb the runtime's own threads, and the paired difference
    charges that to the key (on a 2-core EPYC the context sums over-predicted whole onnxruntime
    networks by 550–1300 % and torch.compile ones by 140 %, the isolated sums by 17–74 %), so
    these keys are timed in isolation whatever ``GAS_TIMING_CONTEXT`` says."""

    folds_constants: bool = False
    """The runtime computes a subgraph whose inputs are all constants once, when it builds the
    graph, and never at run time (ONNX Runtime's and TensorRT's constant folding). In a derived
    network a node that no live edge feeds is zeros, a cell of only such nodes is a constant, and
    so is whatever only constants feed: those components cost nothing under this runtime
    (:func:`gas_core.latency.derived_keys`). Inductor does not fold them (a module's weights are
    graph inputs unless frozen), nor does a CUDA graph."""
    drops_dead_code: bool = False
    """The runtime never computes what does not reach the graph's output (ONNX Runtime, TensorRT,
    inductor's dead-code elimination); eager PyTorch and a CUDA graph's replay run every kernel
    the forward launched. A cell that neither of the next two cells reads, or that only feeds
    constant-folded parts, costs nothing under this runtime."""

    def version(self) -> str | None:
        return torch.__version__ if self.package is None else _version(self.package)

    def missing(self, device_type: str) -> str | None:
        """Why this runtime cannot run on a ``device_type`` host here, with what to install;
        None when it can."""
        if device_type not in self.devices:
            return f"runtime {self.name} runs on {' or '.join(sorted(self.devices))} only, not on {device_type}"
        if self.version() is None:
            return f"runtime {self.name} is not installed on this host: {self.install}"
        if self.name == "onnxruntime" and device_type == "cuda" and not _ort_has_cuda():
            return "runtime onnxruntime has no CUDA provider on this host: pip install onnxruntime-gpu"
        if self.needs_cxx_on_cpu and device_type == "cpu" and _cxx_compiler() is None:
            return f"runtime {self.name} needs a C++ compiler on a CPU host (inductor builds C++): install g++ or clang"
        return None


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


_ALL_DTYPES = frozenset({"float32", "float16", "bfloat16"})
_ALL_FORMATS = frozenset({"contiguous", "channels_last"})

REGISTRY: dict[str, RuntimeEntry] = {e.name: e for e in (
    RuntimeEntry("eager", frozenset({"cpu", "cuda"}), _ALL_DTYPES, _ALL_FORMATS, None,
                 "ships with torch", _eager, context_timing=True),
    # ONNX graphs are NCHW and exported here in float32 (onnxruntime's CPU kernels are float32)
    RuntimeEntry("onnxruntime", frozenset({"cpu", "cuda"}), frozenset({"float32"}), frozenset({"contiguous"}),
                 "onnxruntime", "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)", _onnxruntime, one_graph=True,
                 folds_constants=True, drops_dead_code=True),
    RuntimeEntry("torch_compile", frozenset({"cpu", "cuda"}), _ALL_DTYPES, _ALL_FORMATS, None,
                 "ships with torch (inductor; Triton on CUDA, a C++ compiler on CPU)", _torch_compile,
                 needs_cxx_on_cpu=True, one_graph=True, drops_dead_code=True),
    RuntimeEntry("cuda_graph", frozenset({"cuda"}), _ALL_DTYPES, _ALL_FORMATS, None, "ships with torch (CUDA)",
                 _cuda_graph, one_graph=True),
    RuntimeEntry("tensorrt", frozenset({"cuda"}), _ALL_DTYPES, frozenset({"contiguous"}), "tensorrt",
                 "pip install tensorrt (NVIDIA GPUs only)", _tensorrt, one_graph=True, folds_constants=True,
                 drops_dead_code=True),
)}
assert tuple(REGISTRY) == get_args(Runtime), "every Runtime literal has exactly one registry entry"


IN_GRAPH_EXTRA = 3
"""An in-graph key is timed as ``1 + IN_GRAPH_EXTRA`` copies (a chain, or a fan-out of as many
terms) paired with one copy in the same form; each sample is their difference over
``IN_GRAPH_EXTRA`` (docs/latency-key.md "In-graph keys"). The row's timer names the form
(:func:`timed_as_now`)."""


def timed_as_now(key: LatencyKey, timer: str) -> bool:
    """Whether a stored row of ``key`` with ``timer`` was timed the way ``key`` is timed now: an
    in-graph key's timer ends in ``+chain`` or ``+fan_out`` (its form), any other key's in neither.
    A row timed otherwise (a one-graph runtime's key timed as its own graph, before in-graph keys
    existed) is stale: a profile job times it again, without changing the environment, so the
    host's eager tables are not orphaned by a change that did not touch them."""
    form = timing_form(key)
    tail = timer.rsplit("+", 1)[-1] if "+" in timer else None
    if form is None:
        return tail not in ("chain", "fan_out")
    return tail == form


def timing_form(key: LatencyKey) -> InGraphForm | None:
    """How ``key`` is timed inside a graph (a one-graph runtime's key with an
    :func:`gas_core.ops.in_graph_form`), or None when it is timed as its own graph or eagerly."""
    return in_graph_form(key) if REGISTRY[key.runtime].one_graph else None


def in_graph(key: LatencyKey) -> bool:
    """Whether ``key`` is timed inside a graph (the marginal cost of one more copy of itself)
    rather than as its own graph. Such a key's median is already what it adds to a network:
    nothing is taken off it for the entry."""
    return timing_form(key) is not None


def resolve_runtime(name: str) -> RuntimeEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}; known: {', '.join(REGISTRY)}") from None


def _withheld(name: str, offered: frozenset[str] | None) -> str | None:
    """Why ``name`` is refused when the operator offers only ``offered`` (None: all); None if offered."""
    if offered is None or name in offered:
        return None
    return f"runtime {name} is not offered by this host (its operator set GAS_RUNTIMES={','.join(sorted(offered))})"


def check_runtime(name: str, device_type: str, dtype: str, memory_format: str,
                  offered: frozenset[str] | None = None) -> str | None:
    """Why a key of runtime ``name`` at ``dtype``/``memory_format`` cannot be timed on a
    ``device_type`` host here (one line, naming what to install or change); None when it can.
    ``offered``: the runtimes the host's operator allows (None: all)."""
    entry = resolve_runtime(name)
    missing = _withheld(name, offered) or _missing(name, device_type)
    if missing is not None:
        return missing
    if dtype not in entry.dtypes:
        return f"runtime {name} times {', '.join(sorted(entry.dtypes))} only, not {dtype}"
    if memory_format not in entry.memory_formats:
        return f"runtime {name} times {', '.join(sorted(entry.memory_formats))} memory format only, not {memory_format}"
    return None


def host_runtimes(device_type: str, offered: frozenset[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every registered runtime on a ``device_type`` host: its version and, when it cannot run
    here, why (``/device`` lists this; the versions are part of the environment fingerprint,
    whatever the operator offers)."""
    out = {}
    for name, e in REGISTRY.items():
        why = _missing(name, device_type) or _withheld(name, offered)
        out[name] = {"version": e.version(), "available": why is None, "missing": why}
    return out


@functools.cache
def _missing(name: str, device_type: str) -> str | None:
    """:meth:`RuntimeEntry.missing`, once per process: what is installed does not change while
    it runs, and every ``/profile``, ``/measure`` and ``/device`` asks (package metadata, an
    import, a compiler lookup)."""
    return REGISTRY[name].missing(device_type)


def prepare(runtime: str, module: nn.Module, args: tuple, device: torch.device) -> Prepared:
    """A zero-argument callable that runs ``module(*args)`` under ``runtime`` (compiled or
    exported first, here, so that calling it only runs)."""
    return resolve_runtime(runtime).prepare(module, args, device)
