"""GAS core: search space, ops, supernet, GCN-guided module, latency term, derivation and the
final network. Pure torch: no HTTP, no SQL. Both the latency service and the search client
import it, so the shape contract (:func:`gas_core.search_space.cell_shapes` and
:class:`gas_core.keys.LatencyKey`) lives here and nowhere else."""

from gas_core.keys import DTYPES, MEMORY_FORMATS, RUNTIMES, LatencyKey
from gas_core.ops import COMPONENTS, OPS, PRIMITIVES, build_component
from gas_core.search_space import NetworkLayout, NetworkShapes, cell_shapes

__all__ = [
    "COMPONENTS",
    "DTYPES",
    "MEMORY_FORMATS",
    "OPS",
    "PRIMITIVES",
    "RUNTIMES",
    "LatencyKey",
    "NetworkLayout",
    "NetworkShapes",
    "build_component",
    "cell_shapes",
]
