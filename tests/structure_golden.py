"""Fingerprints of everything the network's structure decides, for layouts and input
configurations that exercise every rule (reductions, odd sides, the cell after a reduction, both
heads, several nodes per cell, batch/dtype/format): the table's keys and their order, the keys of
derived networks, the keys each module of a built network runs at, and the parameter names and
shapes of the derived network and the supernet. ``tests/golden/structure.json`` holds them as
written before the structure was described once; ``test_structure_matches_golden`` proves a
refactor changed none of it. Regenerate (only for an intended change) with
``python -m tests.structure_golden``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from gas_core.genotype import random_genotype
from gas_core.latency import derived_keys
from gas_core.network import GASNet
from gas_core.ops import key_of_call
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.supernet import Supernet

GOLDEN = Path(__file__).parent / "golden" / "structure.json"

LAYOUTS: dict[str, NetworkLayout] = {
    "default": NetworkLayout(),
    "camvid-ppm": NetworkLayout(num_classes=11, head="ppm"),
    "odd": NetworkLayout(num_cells=5, nodes=3, init_channels=4, reduction_cells=(0, 2), stem_channels=(8, 12),
                         stem_strides=(2, 2), head_channels=16, num_classes=5),
}
CONFIGS = [((97, 129), 1, "float32", "contiguous"), ((180, 240), 2, "float16", "channels_last"),
           ((33, 65), 1, "bfloat16", "contiguous")]


def _digest(items: list) -> dict:
    text = json.dumps(items, sort_keys=True)
    return {"n": len(items), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _params(module: torch.nn.Module) -> list:
    return [[name, list(t.shape)] for name, t in module.state_dict().items()]


def _called_keys(net: GASNet, hw: tuple[int, int]) -> list[str]:
    seen: list[str] = []
    for m in net.modules():
        if hasattr(m, "key_spec"):
            m.register_forward_hook(lambda mod, args, out: seen.append(
                key_of_call(mod, args, "float32", "contiguous").canonical))
    with torch.no_grad():
        net.eval()(torch.randn(1, 3, *hw))
    return seen


def fingerprints() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for lname, layout in LAYOUTS.items():
        genos = [random_genotype(layout, torch.Generator().manual_seed(s)) for s in range(3)]
        for hw, batch, dtype, fmt in CONFIGS:
            sh = cell_shapes(layout, hw, batch, dtype, fmt)  # type: ignore[arg-type]
            tag = f"{lname}/{hw[0]}x{hw[1]}/b{batch}/{dtype}/{fmt}"
            out[f"{tag}/all_keys"] = _digest([k.canonical for k in sh.all_keys()])
            out[f"{tag}/fixed"] = _digest([k.canonical for k in sh.fixed()])
            out[f"{tag}/edges"] = _digest([[[k.canonical if k else None for k in e] for e in c] for c in sh.edges])
            out[f"{tag}/cells_hw"] = _digest([[c.hw_prev_prev, c.hw_in, c.hw_out] for c in sh.cells])
            for i, g in enumerate(genos):
                out[f"{tag}/derived{i}"] = _digest([k.canonical for k in derived_keys(g, sh)])
        torch.manual_seed(0)
        out[f"{lname}/supernet_params"] = _digest(_params(Supernet(layout)))
        for i, g in enumerate(genos):
            torch.manual_seed(0)
            net = GASNet(g)
            out[f"{lname}/gasnet{i}_params"] = _digest(_params(net))
            out[f"{lname}/gasnet{i}_calls"] = _digest(_called_keys(net, CONFIGS[0][0]))
    return out


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(fingerprints(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
