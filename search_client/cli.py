"""``gas-search``: hardware-aware GAS search against a live latency service.

Reads the service's device, computes the supernet's latency keys from gas_core's ``cell_shapes``,
fetches the table, asks the service to profile what is missing (progress bar), searches with the
differentiable latency term, derives the network, writes ``genotype.json``, has the service time
it end to end (``POST /measure``) and reports predicted against measured latency.

Compute: ``--device auto|cpu|cuda|cuda:N`` (auto: CUDA when present), ``--amp off|bf16|fp16``,
``--channels-last``, ``--workers N`` DataLoader processes. The table is the service's own device
unless ``--target SLUG[@ENV]`` names another. Data parallel on N GPUs:
``torchrun --nproc_per_node N -m search_client --latency-url URL …`` (NCCL, one GPU per rank).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch.distributed as dist
import typer
from pydantic import ValidationError

from gas_core.devices import resolve_device
from gas_core.errors import one_line
from gas_core.genotype import Genotype
from gas_core.keys import DTYPES, MEMORY_FORMATS, RUNTIMES
from gas_core.latency import LatencyTerm, MissingLatencyKeys, predict_latency_us
from gas_core.progress import progress as progress_bar
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.target import PredictUs
from gas_core.wire import DEPLOYMENT_FILE, Deployment, JobPublic, split_ref
from search_client.cli_common import (
    check_pair_flags,
    config_flags,
    dataset_help,
    fail,
    flag_error,
    known_dataset,
    latency_client,
    setup_logging,
)
from search_client.client import LatencyClient, ServiceError
from search_client.data import DataRootError, SegDataset, build_datasets
from search_client.report import DevicePrediction, Report, format_report, plot_alpha, plot_history
from search_client.runtime import ComputeConfig, DistInfo, init_distributed, run_rank
from search_client.search import SearchConfig, SearchResult, search

log = logging.getLogger("gas-search")
TOOL = "gas-search"


def fetch_latency_term(
    client: LatencyClient, target: str | None, layout: NetworkLayout, size: tuple[int, int], batch: int, dtype: str,
    memory_format: str, progress: bool = True, runtime: str = "eager",
) -> tuple[LatencyTerm, str]:
    """Table → LatencyTerm. ``target`` is ``SLUG`` or ``SLUG@ENVIRONMENT`` (default: the
    service's own device). The service's own device is read in the service's current environment
    (where new profiles land) unless another is named, and its missing keys are profiled. Only
    ``runtime``'s rows are read: a table of another runtime never serves this search."""
    host = client.host()
    slug, env = split_ref(target) if target else (host.device.slug, None)
    own = slug == host.device.slug and env in (None, host.environment.fingerprint)
    if own:
        env = host.environment.fingerprint
    shapes = cell_shapes(layout, size, batch, dtype, memory_format, runtime)  # type: ignore[arg-type]
    keys = shapes.all_keys()

    def lookup() -> dict[str, float]:
        return client.table(slug, dtype=dtype, batch=batch, memory_format=memory_format, environment=env,
                            runtime=runtime).lookup()

    table = lookup()
    missing = [k for k in keys if k.canonical not in table]
    log.info("device %s: %d keys needed, %d in the table, %d missing", slug, len(keys), len(keys) - len(missing),
             len(missing))
    if missing:
        if not own:
            raise ServiceError(f"the table of {target} lacks {len(missing)} keys and {client.base_url} runs on "
                               f"{host.device.slug}@{host.environment.fingerprint}, so it cannot profile them; "
                               f"run gas-search against that table's host")
        job = client.profile(missing)
        told: list[str] = []  # the busy verdict is told once, as soon as the service records it

        def on_poll(j: JobPublic) -> None:
            bar.update(j.done - bar.n)
            busy = next((c for c in j.host_noise.checks if c.busy), None) if j.host_noise is not None else None
            if busy is not None and not told:
                told.append(busy.action)
                log.warning("profiling: %s; the service's GAS_BUSY_POLICY: %s", busy.describe(), busy.action)

        with progress_bar(total=job.total, desc=f"profiling {slug}", unit="key", enabled=progress) as bar:
            done = client.wait_job(job.id, on_poll)
        noise = done.host_noise
        log.info("profiled %d keys: %d re-timed, %d flagged; host reference drift %s", done.total, done.retimed,
                 done.flagged, "n/a" if noise is None else noise.describe())
        for w in done.warnings:
            log.warning("profiling: %s", w)
        table = lookup()
    try:
        return LatencyTerm.from_table(shapes, table), slug
    except MissingLatencyKeys as err:
        raise ServiceError(f"table of {slug} still lacks keys after profiling: {err}") from None


def table_predictor(client: LatencyClient, slug: str, target: str | None, layout: NetworkLayout,
                    dep: Deployment) -> PredictUs:
    """A derived network's exact table latency (µs) on the search's table, for fitting it to a target."""
    host = client.host()
    env = split_ref(target)[1] if target else None
    if slug == host.device.slug and env is None:  # as fetch_latency_term reads the own device
        env = host.environment.fingerprint
    shapes = cell_shapes(layout, dep.input_size, dep.batch, dep.dtype, dep.memory_format, dep.runtime)  # type: ignore[arg-type]
    lookup = client.table(slug, dtype=dep.dtype, batch=dep.batch, memory_format=dep.memory_format, environment=env,
                          runtime=dep.runtime).lookup()
    return lambda g: predict_latency_us(g, shapes, lookup)


def check_table_refs(client: LatencyClient, refs: list[str]) -> None:
    """Fail before a search, not after it, when a ``--predict-on`` table does not exist."""
    if not refs:
        return
    known = {d.slug: {e.fingerprint for e in d.environments} for d in client.devices().devices}
    for ref in refs:
        slug, env = split_ref(ref)
        if slug not in known:
            raise ServiceError(f"--predict-on: unknown device {slug!r}; known: {', '.join(sorted(known)) or 'none'}")
        if env is not None and env not in known[slug]:
            raise ServiceError(f"--predict-on: device {slug!r} has no environment {env!r}; it has "
                               f"{', '.join(sorted(known[slug]))}")


def predict_on_devices(
    client: LatencyClient, refs: list[str], genotype: Genotype, size: tuple[int, int], batch: int, dtype: str,
    memory_format: str, runtime: str = "eager",
) -> list[DevicePrediction]:
    """The derived network's latency predicted from other devices' tables (``DEVICE`` or
    ``DEVICE@ENVIRONMENT``): does a network searched for one GPU stay fast on another? A table
    that lacks some of the network's keys gives no figure, and says how many it lacks."""
    shapes = cell_shapes(genotype.layout, size, batch, dtype, memory_format, runtime)  # type: ignore[arg-type]
    out = []
    for ref in refs:
        slug, env = split_ref(ref)
        table = client.table(slug, dtype=dtype, batch=batch, memory_format=memory_format, environment=env,
                             runtime=runtime)
        try:
            pred: float | None = predict_latency_us(genotype, shapes, table.lookup()) / 1e3
            missing = 0
        except MissingLatencyKeys as err:
            pred, missing = None, len(err.missing)
        out.append(DevicePrediction(device=table.device.slug, environment=table.environment.fingerprint,
                                    predicted_ms=pred, missing_keys=missing))
        log.info("predicted on %s@%s: %s", slug, table.environment.fingerprint,
                 f"{pred:.3f} ms" if pred is not None else f"n/a ({missing} keys missing)")
    return out


COMPUTE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse_device_flags(device: str, target: str | None) -> tuple[str, str | None]:
    """``--device`` names the compute device now; before, it named the table's device slug.
    A value that is no compute device but was given as before still works, with a message."""
    if COMPUTE_SPEC.fullmatch(device) or device.startswith("cuda"):
        return device, target
    if target is not None:
        raise ValueError(f"--device {device!r} is not a compute device (auto, cpu, cuda, cuda:N) and --target is "
                         "set; --device no longer names the table")
    typer.echo(f"gas-search: note: --device names the compute device now (auto, cpu, cuda, cuda:N); reading "
               f"{device!r} as --target {device} (the table's device). Use --target.", err=True)
    return "auto", device


def load_table_term(client: LatencyClient, d: DistInfo, target: str | None, layout: NetworkLayout, dep: Deployment,
                    progress: bool) -> tuple[LatencyTerm, str]:
    """Rank 0 fetches the table (profiling missing keys) and broadcasts L to the other ranks."""
    payload: list = [None]
    if d.main:
        term, slug = fetch_latency_term(client, target, layout, dep.input_size, dep.batch, dep.dtype, dep.memory_format,
                                        progress=progress, runtime=dep.runtime)
        payload = [(term.L, float(term.fixed), slug)]
    if d.world > 1:
        dist.broadcast_object_list(payload, src=0)
    L, fixed, slug = payload[0]
    log.info("latency table %s: fixed parts %.3f ms, L in [%.1f, %.1f] µs", slug, fixed / 1e3, float(L.min()),
             float(L.max()))
    return LatencyTerm(L, fixed), slug


def write_artefacts(result: SearchResult, out: Path, warmup_epochs: int, dep: Deployment) -> Path:
    """genotype.json, and beside it the deployment it was searched for (gas-train carries it to
    the checkpoint, gas-eval measures it); the α and history plots; the target fit."""
    geno_path = out / "genotype.json"
    result.genotype.save(geno_path)
    (out / DEPLOYMENT_FILE).write_text(dep.model_dump_json(indent=2))
    plot_alpha(result.supernet.alpha_prime().cpu(), result.genotype.layout.edge_sources(), out / "alpha.png")
    plot_history(result.history, out / "history.png", warmup_epochs)
    if result.fit is not None:
        (out / "target_fit.json").write_text(result.fit.model_dump_json(indent=2))
    log.info("wrote %s, %s, %s, %s", geno_path, out / DEPLOYMENT_FILE, out / "alpha.png", out / "history.png")
    return geno_path


def measure_and_report(client: LatencyClient, result: SearchResult, geno_path: Path, dep: Deployment,
                       others: list[DevicePrediction], out: Path) -> None:
    """POST /measure on the service's device, then the predicted-vs-measured report."""
    m = client.measure(result.genotype, dep.input_size, batch=dep.batch, dtype=dep.dtype,
                       memory_format=dep.memory_format, runtime=dep.runtime)
    last = result.history[-1]
    report = Report(
        device=m.device, environment=m.environment, input_size=m.input_size, batch=m.batch, dtype=m.dtype,
        memory_format=m.memory_format, runtime=m.runtime, predicted_ms=m.predicted_ms, measured_median_ms=m.median_ms,
        measured_p90_ms=m.p90_ms, fps=m.fps, error_pct=m.error_pct, search_lat_ms=last["derived_lat_ms"],
        val_miou=None if math.isnan(last["val_miou"]) else last["val_miou"], genotype=str(geno_path),
        predicted_on=others, agreement=m.agreement, target=result.fit,
    )
    (out / "report.json").write_text(report.model_dump_json(indent=2))
    typer.echo("\npredicted vs measured (derived network)\n" + format_report(report))
    typer.echo(f"\nreport: {out / 'report.json'}")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(help=__doc__)
@config_flags(search=SearchConfig, compute=ComputeConfig)
def run(
    latency_url: Annotated[str | None, typer.Option(help="latency service base URL, e.g. http://127.0.0.1:8000 "
                                                         "(default GAS_LATENCY_URL)")] = None,
    token: Annotated[str | None, typer.Option(
        help="bearer token for a service that sets GAS_API_TOKEN (profiling missing keys, /measure) or "
        "GAS_READ_TOKEN (default: GAS_API_TOKEN from the environment; prefer the variable, a flag shows in the "
        "process list)")] = None,
    target: Annotated[str | None, typer.Option(
        help="table to search against: DEVICE or DEVICE@ENVIRONMENT (default: the service's own device, whose "
        "missing keys it profiles)")] = None,
    dataset: Annotated[str, typer.Option(help=dataset_help("training data"), callback=known_dataset)] = "synthetic",
    data_root: Annotated[Path | None, typer.Option(help="dataset root in its official layout")] = None,
    input_size: Annotated[tuple[int, int], typer.Option(help="H W of the search crops and of the latency keys")] = (
        128, 256),
    latency_size: Annotated[tuple[int, int] | None, typer.Option(
        help="H W the network will be deployed at (latency keys, /measure); default --input-size")] = None,
    latency_batch: Annotated[int, typer.Option(help="deployment batch for the latency keys and /measure")] = 1,
    dtype: Annotated[str, typer.Option(help=f"deployment dtype: {', '.join(DTYPES)}")] = "float32",
    memory_format: Annotated[str, typer.Option(help=f"deployment memory format: {', '.join(MEMORY_FORMATS)}")] = (
        "contiguous"),
    runtime: Annotated[str, typer.Option(
        help=f"deployment runtime: {', '.join(RUNTIMES)}. The search reads that runtime's table (profiling its "
        "missing keys, each component exported or compiled at its shape) and /measure runs the derived network "
        "under it; GET /device lists the host's runtimes")] = "eager",
    synthetic_size: Annotated[tuple[int, int], typer.Option(help="synthetic train/val sample counts")] = (64, 16),
    downscale: Annotated[int, typer.Option(
        help="shrink every image and label by this factor when loading, before augmentation (CamVid at 2 is "
        "180×240); the weights and α are fitted on the training split only, val is only scored", min=1)] = 1,
    out: Annotated[Path, typer.Option(help="output directory (checkpoint, log CSV, genotype, report, plots)")] = Path(
        "runs/search"),
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt (on any device)")] = False,
    measure: Annotated[bool, typer.Option(help="time the derived network on the service (POST /measure)")] = True,
    predict_on: Annotated[list[str] | None, typer.Option(
        "--predict-on", help="also predict the derived network's latency from this device's table (DEVICE or "
        "DEVICE@ENVIRONMENT, see gas-table devices); repeatable")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    target_fps: Annotated[float | None, typer.Option(
        help="the target as frames per second at the deployment batch: --target-ms = 1000 · batch / FPS "
        "(give one of the two)", min=0.001)] = None,
    *,
    search: dict[str, Any],
    compute: dict[str, Any],
) -> None:
    try:
        compute["device"], target = parse_device_flags(compute["device"], target)
        for ref in [*(predict_on or []), *([target] if target else [])]:
            split_ref(ref)
        d = init_distributed(compute["device"])
        resolve_device(compute["device"], d.local_rank, d.world)
        if dtype not in DTYPES or memory_format not in MEMORY_FORMATS:
            raise ValueError(f"--dtype must be one of {DTYPES} and --memory-format one of {MEMORY_FORMATS}")
        if runtime not in RUNTIMES:
            raise ValueError(f"--runtime {runtime!r}: must be one of {', '.join(RUNTIMES)}")
        if target_fps is not None:
            if search["target_ms"] is not None:
                raise ValueError("--target-fps and --target-ms name the same target: give one of them")
            search["target_ms"] = 1000.0 * latency_batch / target_fps
        cfg, comp = SearchConfig(**search), ComputeConfig(**compute)
        train, val = build_datasets(dataset, data_root, input_size, cfg.seed, synthetic_size, downscale=downscale)
    except ValidationError as err:
        fail(TOOL, flag_error(err))
    except (DataRootError, ValueError) as err:
        fail(TOOL, str(err), 2)
    setup_logging(d.main)
    try:
        dep = Deployment(input_size=latency_size or input_size, batch=latency_batch, dtype=dtype,  # type: ignore[arg-type]
                         memory_format=memory_format, runtime=runtime)  # type: ignore[arg-type]
    except ValidationError as err:
        fail(TOOL, one_line(err, "deployment"))
    client = latency_client(TOOL, latency_url, token)
    try:
        _run(SearchRun(client, d, cfg, comp, target, train, val, dep, out, resume, measure, predict_on or [], quiet))
    except ServiceError as err:
        fail(TOOL, str(err), 1)
    except ValueError as err:
        fail(TOOL, str(err), 2)
    finally:
        client.close()


@dataclass
class SearchRun:
    """Everything one ``gas-search`` invocation works with, once its flags are checked."""

    client: LatencyClient
    d: DistInfo
    cfg: SearchConfig
    compute: ComputeConfig
    target: str | None
    train: SegDataset
    val: SegDataset
    dep: Deployment
    out: Path
    resume: bool
    measure: bool
    predict_on: list[str]
    quiet: bool


def _run(job: SearchRun) -> None:
    """The CLI's steps: fetch the table, search, write the artefacts, measure, report."""
    client, d, cfg, compute, target, train, val, dep, out, resume, measure, predict_on, quiet = (
        job.client, job.d, job.cfg, job.compute, job.target, job.train, job.val, job.dep, job.out, job.resume,
        job.measure, job.predict_on, job.quiet)
    layout = NetworkLayout(num_classes=train.num_classes)
    if d.main:
        check_table_refs(client, predict_on)
    term, slug = load_table_term(client, d, target, layout, dep, progress=not quiet)
    log.info("search: %s; compute %s", cfg.model_dump_json(), compute.model_dump_json())
    predict = table_predictor(client, slug, target, layout, dep) if cfg.target_ms is not None and d.main else None
    result = search(cfg, layout, train, val, term, out, compute=compute, resume=resume, dist_info=d,
                    progress=not quiet, predict_us=predict)
    if not d.main:
        return
    geno_path = write_artefacts(result, out, cfg.warmup_epochs, dep)
    others = predict_on_devices(client, predict_on, result.genotype, dep.input_size, dep.batch, dep.dtype,
                                dep.memory_format, dep.runtime)
    if measure:
        measure_and_report(client, result, geno_path, dep, others, out)
        return
    for p in others:
        typer.echo(f"predicted on {p.device}@{p.environment}: "
                   + (f"{p.predicted_ms:.3f} ms" if p.predicted_ms is not None else
                      f"n/a ({p.missing_keys} keys missing from its table)"))


def main() -> None:
    check_pair_flags(TOOL, app)
    run_rank(app)


if __name__ == "__main__":
    main()
