"""``gas-train``, ``gas-eval``, ``gas-export``: from a searched ``genotype.json`` to a trained,
evaluated, deployable network — the paper's Table 1 row (mIoU, latency, FPS) for your device.

Devices, AMP, DataLoader workers and ``torchrun`` work exactly as in ``gas-search``
(``torchrun --nproc_per_node N -m search_client.train_cli genotype.json …``: NCCL, one GPU per rank;
that module runs gas-train).
Bad input (a missing data root, a genotype whose classes do not match the dataset, a corrupt or
foreign checkpoint) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import platform
from pathlib import Path
from typing import Annotated, Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from pydantic import BaseModel, Field, ValidationError  # noqa: E402

from gas_core.devices import resolve_device
from gas_core.errors import one_line  # noqa: E402
from gas_core.genotype import Genotype  # noqa: E402
from gas_core.network import GASNet  # noqa: E402
from gas_core.wire import DEPLOYMENT_FILE, Deployment  # noqa: E402
from search_client.cli_common import (  # noqa: E402
    check_pair_flags,
    config_flags,
    dataset_help,
    fail,
    flag_error,
    known_dataset,
    latency_client,
    setup_logging,
)
from search_client.client import ServiceError  # noqa: E402
from search_client.data import (  # noqa: E402
    DataRootError,
    SegDataset,
    build_datasets,
    build_eval_dataset,
    dataset_spec,
)
from search_client.export import export  # noqa: E402
from search_client.metrics import class_accuracy, class_iou, mean_class_accuracy, pixel_accuracy
from search_client.runtime import ComputeConfig, init_distributed, run_rank, sharded_loader  # noqa: E402
from search_client.train import (  # noqa: E402
    CheckpointError,
    TrainConfig,
    evaluate_confusion,
    read_checkpoint,
    train,
)

log = logging.getLogger("gas-train")
LabelResolution = Literal["native", "input"]
_DEVICE = ComputeConfig.model_fields["device"]  # gas-eval's one compute flag, its help and default from the model
DOWNSCALE_HELP = ("shrink every image and label by this factor when loading, before augmentation (scale and crop "
                  "then act as at full size): CamVid at 2 is 180×240")


def read_genotype(path: Path) -> Genotype:
    try:
        return Genotype.model_validate_json(path.read_text())
    except OSError as err:
        raise ValueError(f"genotype {path}: {err.strerror}") from None
    except (ValidationError, UnicodeDecodeError) as err:
        detail = one_line(err) if isinstance(err, ValidationError) else "not UTF-8 text"
        raise ValueError(f"genotype {path}: not a GAS genotype ({detail})") from None


def datasets_for(genotype: Genotype, dataset: str, data_root: Path | None, size: tuple[int, int], seed: int,
                 synthetic_size: tuple[int, int], scale: tuple[float, float] = (0.5, 2.0),
                 full_size_labels: bool = False, **data: Any) -> tuple[SegDataset, SegDataset]:
    """The datasets, checked against the genotype: its layout must predict the dataset's classes.
    ``data``: :func:`build_datasets`' keyword options (eval_split, downscale, holdout, holdout_at, cache)."""
    train_ds, val_ds = build_datasets(dataset, data_root, size, seed, synthetic_size, scale, full_size_labels, **data)
    if genotype.layout.num_classes != train_ds.num_classes:
        raise ValueError(f"the genotype's layout predicts {genotype.layout.num_classes} classes but {dataset} has "
                         f"{train_ds.num_classes}; search with a layout of {train_ds.num_classes} classes")
    return train_ds, val_ds


# ---------------------------------------------------------------- gas-train

train_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@train_app.command(help=__doc__)
@config_flags(recipe=TrainConfig, compute=ComputeConfig)
def train_cmd(
    genotype: Annotated[Path, typer.Argument(help="genotype.json written by gas-search")],
    dataset: Annotated[str, typer.Option(help=dataset_help("training data"), callback=known_dataset)] = "synthetic",
    data_root: Annotated[Path | None, typer.Option(help="dataset root in its official layout (Cityscapes: "
                                                        "leftImg8bit/ and gtFine/; CamVid: train/, trainannot/, …)")] = None,
    input_size: Annotated[tuple[int, int], typer.Option(help="H W of the training crops (paper: 769 1537)")] = (
        256, 512),
    synthetic_size: Annotated[tuple[int, int], typer.Option(help="synthetic train/val sample counts")] = (64, 16),
    downscale: Annotated[int, typer.Option(help=DOWNSCALE_HELP, min=1)] = 1,
    holdout: Annotated[int, typer.Option(
        help="score each epoch on N training images (sorted by name; which N: --holdout-at) instead of val, and "
        "train on the rest: for choosing a recipe without looking at val", min=0)] = 0,
    holdout_at: Annotated[Literal["start", "end"], typer.Option(
        help="hold out the first or the last N training images (CamVid: the first 62 are the dusk sequence "
        "0001TP, the last 62 the end of daylight 0016E5, the sequence val comes from)")] = "start",
    init: Annotated[Path | None, typer.Option(help="start from these weights (a state_dict or checkpoint, e.g. "
                                                   "ImageNet-pretrained); tensors are matched by name and shape and "
                                                   "the counts of matched and unmatched ones are logged")] = None,
    out: Annotated[Path, typer.Option(help="output directory: last.pt every epoch, train_log.csv")] = Path(
        "runs/train"),
    resume: Annotated[bool, typer.Option(help="continue from OUT/last.pt (same genotype and recipe)")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    *,
    recipe: dict[str, Any],
    compute: dict[str, Any],
) -> None:
    """Retrain a derived network with the paper's recipe (SGD, poly lr, online bootstrapping)."""
    try:
        geno = read_genotype(genotype)
        dep = Deployment.beside(genotype)  # the search's deployment travels with the checkpoint
        cfg, comp = TrainConfig(**recipe), ComputeConfig(**compute)
        d = init_distributed(comp.device)
        resolve_device(comp.device, d.local_rank, d.world)
        if cfg.batch % (d.world * cfg.accum):
            raise ValueError(f"--batch {cfg.batch} is not divisible by {d.world} ranks × --accum {cfg.accum}")
        train_ds, val_ds = datasets_for(geno, dataset, data_root, input_size, cfg.seed, synthetic_size,
                                        (cfg.scale_min, cfg.scale_max), downscale=downscale, holdout=holdout,
                                        holdout_at=holdout_at)
    except ValidationError as err:
        fail("gas-train", flag_error(err))
    except (DataRootError, ValueError) as err:
        fail("gas-train", str(err))
    setup_logging(d.main)
    try:
        s = train(cfg, geno, train_ds, val_ds, out, comp, d, resume=resume, init=init, progress=not quiet)
    except CheckpointError as err:
        fail("gas-train", str(err))
    if d.main:
        if dep is not None:
            (out / DEPLOYMENT_FILE).write_text(dep.model_dump_json(indent=2))
        last = s.history[-1] if s.history else {}
        typer.echo(f"trained {len(s.history)} epochs: loss {last.get('loss', math.nan):.4f}, val mIoU "
                   f"{last.get('val_miou', math.nan):.3f}; checkpoint {out / 'last.pt'}, log {out / 'train_log.csv'}")


# ---------------------------------------------------------------- gas-eval

eval_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class LatencyRow(BaseModel):
    device: str
    environment: str
    deployment: Deployment | None = Field(default=None, description="what was measured: the search's deployment "
                                          "when deployment.json sits beside the checkpoint, else float32 eager at "
                                          "the input size")
    latency_ms: float
    fps: float
    predicted_ms: float | None
    error_pct: float | None
    within_noise: bool | None
    warnings: list[str] = []


class EvalReport(BaseModel):
    """``eval.json``. Version 2 added where the figures come from (data root's name, downscale,
    the label resolution scored at, batch) and the numbers behind the PNG (pixel accuracy, mean
    class accuracy, per-class accuracy, the confusion matrix)."""

    schema_version: Literal[2] = 2
    kind: Literal["gas-eval"] = "gas-eval"
    checkpoint: str
    dataset: str
    data_root: str | None = Field(description="the data root's folder name (not its path: eval.json gets shared)")
    split: str
    downscale: int = Field(description="factor the images were shrunk by at load")
    input_size: tuple[int, int] = Field(description="H W the network ran at")
    label_resolution: LabelResolution = Field(description="native: logits upsampled to the labels as stored; "
                                              "input: labels resized to the input size")
    label_size: tuple[int, int] = Field(description="H W of the labels the scores were computed at (first image)")
    batch: int
    flip: bool
    scales: list[float]
    images: int
    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float
    per_class_iou: dict[str, float | None]
    per_class_accuracy: dict[str, float | None]
    confusion: list[list[int]] = Field(description="[true class][predicted class] pixel counts, void excluded")
    latency: LatencyRow | None = None


def plot_confusion(conf: torch.Tensor, names: tuple[str, ...], path: Path) -> None:
    """Row-normalised confusion (truth → prediction), so rare classes are as readable as roads."""
    rows = conf.double()
    norm = rows / rows.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(names), 1 + 0.45 * len(names)))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", title="confusion (each row sums to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@eval_app.command(help=__doc__)
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="last.pt written by gas-train")],
    dataset: Annotated[str, typer.Option(help=dataset_help("evaluation data"), callback=known_dataset)] = (
        "synthetic"),
    data_root: Annotated[Path | None, typer.Option(
        help="dataset root in its official layout; only the scored split is read (a root holding just test/ and "
        "testannot/ is enough)")] = None,
    split: Annotated[Literal["val", "test"], typer.Option(
        help="split to score: val, or test where the layout has one (CamVid's SegNet layout: test/ and testannot/)")
    ] = "val",
    downscale: Annotated[int | None, typer.Option(
        help=DOWNSCALE_HELP + " (default: the factor the checkpoint was trained with)", min=1)] = None,
    input_size: Annotated[tuple[int, int] | None, typer.Option(
        help="H W the network runs at (paper: 769 1537). Default: the training crop size")] = None,
    label_resolution: Annotated[LabelResolution, typer.Option(
        help="native: upsample the logits to the labels as stored (CamVid 360×480, Cityscapes 1024×2048), how "
        "published numbers are scored; input: resize the labels to the input size instead (cheaper; what the "
        "CamVid study's first round reported)")] = "native",
    batch: Annotated[int, typer.Option(help="images per forward pass (the split's labels must share one size)",
                                       min=1)] = 1,
    flip: Annotated[bool, typer.Option(help="average with the horizontally flipped image")] = False,
    scales: Annotated[list[float] | None, typer.Option(
        "--scale", help="multi-scale evaluation: input scale factors to average, repeatable (default 1.0)")] = None,
    device: Annotated[str, typer.Option(help=_DEVICE.description)] = _DEVICE.default,
    synthetic_size: Annotated[tuple[int, int], typer.Option(help="synthetic train/val sample counts")] = (64, 16),
    latency_url: Annotated[str | None, typer.Option(
        help="also measure this network on a latency service (POST /measure) and report latency, FPS and the "
        "table's prediction beside the mIoU")] = None,
    token: Annotated[str | None, typer.Option(help="bearer token for that service (default GAS_API_TOKEN)")] = None,
    out: Annotated[Path, typer.Option(help="directory for eval.json and confusion.png")] = Path("runs/eval"),
) -> None:
    """mIoU, pixel and class accuracy, per-class IoU under the dataset's class names and the
    confusion matrix, as JSON and a PNG."""
    try:
        ck = read_checkpoint(checkpoint)
        geno = Genotype.model_validate(ck["genotype"])
        searched_for = Deployment.beside(checkpoint)
        d = init_distributed(device)
        dev = resolve_device(device, d.local_rank, d.world)
        size = input_size or (int(ck["input_size"][0]), int(ck["input_size"][1]))
        factor = downscale or int(ck.get("downscale", 1))
        val_ds = build_eval_dataset(dataset, data_root, size, split, downscale=factor,
                                    native_labels=label_resolution == "native", synthetic_size=synthetic_size[1])
        if geno.layout.num_classes != val_ds.num_classes:
            raise ValueError(f"the genotype's layout predicts {geno.layout.num_classes} classes but {dataset} has "
                             f"{val_ds.num_classes}")
    except (CheckpointError, DataRootError, ValueError, ValidationError) as err:
        fail("gas-eval", one_line(err) if isinstance(err, ValidationError) else str(err))
    setup_logging(d.main)
    model = GASNet(geno)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as err:
        fail("gas-eval", f"checkpoint {checkpoint}: its weights do not fit its genotype ({str(err).splitlines()[0]})")
    model.to(dev)
    val_loader, _ = sharded_loader(val_ds, d, batch, {"num_workers": 0})
    sc = tuple(scales or [1.0])
    try:
        conf = evaluate_confusion(model, val_loader, val_ds.num_classes, dev, d, flip, sc, progress=True)
    except RuntimeError as err:
        if "stack expects each tensor to be equal size" not in str(err):
            raise
        fail("gas-eval", f"--batch {batch}: the {split} labels differ in size; use --batch 1")
    report = eval_report(conf, dataset_spec(dataset).class_names, checkpoint=str(checkpoint), dataset=dataset,
                         data_root=data_root.resolve().name if data_root else None, split=split, downscale=factor,
                         input_size=size, label_resolution=label_resolution,
                         label_size=tuple(val_ds[0][1].shape[-2:]), batch=batch, flip=flip, scales=list(sc),
                         images=len(val_ds))
    if latency_url is not None:
        report.latency = _measure(latency_url, token, geno, searched_for or Deployment(input_size=size))
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(conf, dataset_spec(dataset).class_names, out / "confusion.png")
    (out / "eval.json").write_text(report.model_dump_json(indent=2))
    typer.echo(_format_eval(report))
    typer.echo(f"wrote {out / 'eval.json'} and {out / 'confusion.png'}")


def eval_report(conf: torch.Tensor, names: tuple[str, ...], **where: Any) -> EvalReport:
    """Every score of a confusion matrix [C, C] (rows: truth) under the classes' names."""
    per_class = dict(zip(names, class_iou(conf), strict=True))
    present = [v for v in per_class.values() if v is not None]
    return EvalReport(miou=sum(present) / max(1, len(present)), pixel_accuracy=pixel_accuracy(conf),
                      mean_class_accuracy=mean_class_accuracy(conf), per_class_iou=per_class,
                      per_class_accuracy=dict(zip(names, class_accuracy(conf), strict=True)),
                      confusion=conf.long().tolist(), **where)


def _measure(url: str, token: str | None, geno: Genotype, dep: Deployment) -> LatencyRow:
    """POST /measure of the network as ``dep`` ships it."""
    try:
        with latency_client("gas-eval", url, token) as client:
            m = client.measure(geno, dep.input_size, batch=dep.batch, dtype=dep.dtype, memory_format=dep.memory_format,
                               runtime=dep.runtime)
    except ServiceError as err:
        fail("gas-eval", str(err), 1)
    return LatencyRow(device=m.device, environment=m.environment, deployment=dep, latency_ms=m.median_ms, fps=m.fps,
                      predicted_ms=m.predicted_ms, error_pct=m.error_pct,
                      within_noise=m.agreement.within_noise if m.agreement else None,
                      warnings=m.agreement.warnings if m.agreement else [])


def _format_eval(r: EvalReport) -> str:
    lines = [f"{r.dataset} {r.split}: {r.images} images at {r.input_size[0]}×{r.input_size[1]}"
             f"{' + flip' if r.flip else ''}{' scales ' + ','.join(map(str, r.scales)) if r.scales != [1.0] else ''}"
             f", scored at {r.label_size[0]}×{r.label_size[1]} ({r.label_resolution} labels)",
             f"  mIoU {r.miou:.4f}   pixel accuracy {r.pixel_accuracy:.4f}   mean class accuracy "
             f"{r.mean_class_accuracy:.4f}"]
    lines += [f"  {n:<14} {'n/a' if v is None else f'{v:.4f}'}" for n, v in r.per_class_iou.items()]
    if r.latency is not None:
        lt = r.latency
        pred = "n/a" if lt.predicted_ms is None else f"{lt.predicted_ms:.3f} ms ({lt.error_pct:+.1f} %)"
        on = f" ({lt.deployment.describe()})" if lt.deployment is not None else ""
        lines.append(f"  {lt.device}{on}: latency {lt.latency_ms:.3f} ms, {lt.fps:.1f} FPS; table predicted {pred}")
        lines += [f"  WARNING: {w}" for w in lt.warnings]
    return "\n".join(lines)


# ---------------------------------------------------------------- gas-export

EXPORT_EXTRA = "gas-nas[export]"
"""The extra (pyproject.toml) that installs what gas-export imports."""


def missing_modules(*names: str) -> list[str]:
    """The modules of ``names`` that cannot be imported here."""
    return [n for n in names if importlib.util.find_spec(n) is None]


export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@export_app.command(help=__doc__)
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="last.pt written by gas-train")],
    input_size: Annotated[tuple[int, int] | None, typer.Option(
        help="H W the exported network takes (batch is dynamic). Default: the input size of the deployment the "
        "search targeted (deployment.json beside the checkpoint)")] = None,
    runs: Annotated[int, typer.Option(help="timed runs per runtime (median, p10, p90 reported)", min=3)] = 20,
    out: Annotated[Path, typer.Option(help="directory for model.onnx, model.ts and export.json")] = Path(
        "runs/export"),
) -> None:
    """Fold BN, write ONNX (dynamic batch) and TorchScript, check both against eager, time them."""
    missing = missing_modules("onnx", "onnxruntime", "onnxscript")
    if missing:
        fail("gas-export", f"needs {', '.join(missing)}, which a plain install leaves out: pip install "
             f"'{EXPORT_EXTRA}'")
    try:
        ck = read_checkpoint(checkpoint)
        geno = Genotype.model_validate(ck["genotype"])
        model = GASNet(geno)
        model.load_state_dict(ck["model"])
        searched_for = Deployment.beside(checkpoint)
    except (CheckpointError, ValidationError, ValueError) as err:
        fail("gas-export", one_line(err) if isinstance(err, ValidationError) else str(err))
    except RuntimeError as err:
        fail("gas-export", f"checkpoint {checkpoint}: its weights do not fit its genotype ({str(err).splitlines()[0]})")
    if input_size is None and searched_for is None:
        fail("gas-export", "--input-size H W is required: no deployment.json beside the checkpoint says it")
    size = input_size or searched_for.input_size  # type: ignore[union-attr]
    if searched_for is not None:
        typer.echo(f"the search targeted {searched_for.describe()}; exporting at {size[0]}×{size[1]}, float32")
    art = export(model, geno, size, out, host=f"{platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads, torch {torch.__version__}", runs=runs)
    for c in art.checks:
        typer.echo(f"{c.format:<12} {c.path}: max |diff| {c.max_abs_diff:.2e} (relative {c.max_rel_diff:.2e}, "
                   f"tolerance {c.tolerance:.0e}) {'ok' if c.passed else 'FAILED'}")
    for name, t in art.timing_ms.items():
        typer.echo(f"{name:<16} median {t['median']:.3f} ms (p10 {t['p10']:.3f}, p90 {t['p90']:.3f}), batch 1")
    typer.echo(f"folded {art.batchnorm_folded} batch norms; wrote {out / 'export.json'}")
    if not all(c.passed for c in art.checks):
        raise typer.Exit(1)


def train_main() -> None:
    check_pair_flags("gas-train", train_app)
    run_rank(train_app)


def eval_main() -> None:
    check_pair_flags("gas-eval", eval_app)
    run_rank(eval_app)


def export_main() -> None:
    check_pair_flags("gas-export", export_app)
    export_app()


if __name__ == "__main__":
    train_main()
