"""Deployment export of a trained network: batch norm folded into the convolutions (as real-time
segmentation repositories time their networks), ONNX with a dynamic batch and TorchScript, each
checked against eager, and ONNX Runtime's timing beside eager on this host."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from gas_core.genotype import Genotype
from gas_core.quality import quantile
from gas_core.runtimes import ONNX_OPSET, fold_batchnorm

TOLERANCE = 1e-4
"""Largest |export − eager| / max|eager| accepted (float32; folding reorders the arithmetic)."""


class ExportCheck(BaseModel):
    format: Literal["onnx", "torchscript"]
    path: str
    max_abs_diff: float
    max_rel_diff: float = Field(description="max |export − eager| / max |eager|")
    tolerance: float
    passed: bool


class ExportArtefact(BaseModel):
    schema_version: Literal[1] = 1
    kind: Literal["gas-export"] = "gas-export"
    genotype: Genotype
    input_size: tuple[int, int]
    num_classes: int
    batchnorm_folded: int = Field(description="BatchNorm layers folded into their convolutions")
    onnx_opset: int
    checks: list[ExportCheck]
    timing_ms: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per runtime: median, p10, p90 of one forward pass at batch 1 on this host")
    host: str


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = float((a - b).abs().max())
    return d, d / max(float(b.abs().max()), 1e-12)


def time_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median, p10 and p90 of ``runs`` wall-clock runs after ``warmup`` (every run kept)."""
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e3)
    return {"median": quantile(xs, 0.5), "p10": quantile(xs, 0.1), "p90": quantile(xs, 0.9), "runs": float(runs)}


def export(model: nn.Module, genotype: Genotype, input_size: tuple[int, int], out: Path, host: str,
           runs: int = 20) -> ExportArtefact:
    """Fold BN, write ``out/model.onnx`` and ``out/model.ts``, check both against eager (the
    unfolded network) on a random batch of 2, time eager and ONNX Runtime at batch 1, and write
    ``out/export.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    folded, n_folded = fold_batchnorm(model)
    x = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        checks = []
        onnx_path, ts_path = out / "model.onnx", out / "model.ts"
        torch.onnx.export(folded, (x,), str(onnx_path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
        import onnx
        import onnxruntime as ort

        onnx.checker.check_model(str(onnx_path), full_check=True)  # the graph is valid ONNX, shapes inferred

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
        checks.append(_check("onnx", onnx_path, got, ref))
        traced = torch.jit.trace(folded, x)
        traced.save(str(ts_path))
        checks.append(_check("torchscript", ts_path, torch.jit.load(str(ts_path))(x), ref))
        one = x[:1]
        timing = {"eager": time_ms(lambda: model(one), runs), "eager_bn_folded": time_ms(lambda: folded(one), runs),
                  "onnxruntime": time_ms(lambda: sess.run(None, {"image": one.numpy()}), runs)}
    art = ExportArtefact(genotype=genotype, input_size=input_size, num_classes=int(ref.shape[1]),
                         batchnorm_folded=n_folded, onnx_opset=ONNX_OPSET, checks=checks, timing_ms=timing, host=host)
    (out / "export.json").write_text(art.model_dump_json(indent=2))
    return art


def _check(fmt: Literal["onnx", "torchscript"], path: Path, got: torch.Tensor, ref: torch.Tensor) -> ExportCheck:
    abs_d, rel_d = _diff(got, ref)
    return ExportCheck(format=fmt, path=str(path), max_abs_diff=abs_d, max_rel_diff=rel_d, tolerance=TOLERANCE,
                       passed=rel_d <= TOLERANCE)
