"""``gas-search``: hardware-aware GAS search against a live latency service.

Reads the service's device, computes the supernet's latency keys from gas_core's ``cell_shapes``,
fetches the table, asks the service to profile what is missing (progress bar), searches with the
differentiable latency term, derives the network, writes ``genotype.json``, has the service time
it end to end (``POST /measure``) and reports predicted against measured latency.

Data parallel: ``torchrun --nproc_per_node N -m search_client --latency-url URL …``.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import torch.distributed as dist
import typer
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from gas_core.genotype import Genotype
from gas_core.keys import DTYPES, MEMORY_FORMATS
from gas_core.latency import LatencyTerm, MissingLatencyKeys, predict_latency_us
from gas_core.search_space import NetworkLayout, cell_shapes
from search_client.client import LatencyClient, ServiceError, split_ref
from search_client.data import DataRootError, build_datasets
from search_client.report import DevicePrediction, Report, format_report, plot_alpha, plot_history
from search_client.search import SearchConfig, init_distributed, search

log = logging.getLogger("gas-search")


class ClientSettings(BaseSettings):
    """Secrets and defaults from the environment (``GAS_`` prefix); flags override."""

    model_config = SettingsConfigDict(env_prefix="GAS_", extra="ignore")
    api_token: str | None = None
    latency_url: str | None = None


def fetch_latency_term(
    client: LatencyClient, device: str | None, layout: NetworkLayout, size: tuple[int, int], batch: int, dtype: str,
    memory_format: str, progress: bool = True,
) -> tuple[LatencyTerm, str]:
    """Table → LatencyTerm. When the table is the service's own device, it is read in the
    service's current environment (where new profiles land) and missing keys are profiled."""
    host = client.host()
    slug = device or host.device.slug
    own = slug == host.device.slug
    env = host.environment.fingerprint if own else None
    shapes = cell_shapes(layout, size, batch, dtype, memory_format)  # type: ignore[arg-type]
    keys = shapes.all_keys()

    def lookup() -> dict[str, float]:
        return client.table(slug, dtype=dtype, batch=batch, memory_format=memory_format, environment=env).lookup()

    table = lookup()
    missing = [k for k in keys if k.canonical not in table]
    log.info("device %s: %d keys needed, %d in the table, %d missing", slug, len(keys), len(keys) - len(missing),
             len(missing))
    if missing:
        if not own:
            raise ServiceError(f"the table of {slug} lacks {len(missing)} keys and {client.base_url} runs on "
                               f"{host.device.slug}, so it cannot profile them; run gas-search against {slug}'s host")
        job = client.profile(missing)
        with tqdm(total=job.total, desc=f"profiling {slug}", unit="key", disable=not progress) as bar:
            client.wait_job(job.id, lambda j: bar.update(j.done - bar.n))
        table = lookup()
    try:
        return LatencyTerm.from_table(shapes, table), slug
    except MissingLatencyKeys as err:
        raise ServiceError(f"table of {slug} still lacks keys after profiling: {err}") from None


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
    memory_format: str,
) -> list[DevicePrediction]:
    """The derived network's latency predicted from other devices' tables (``DEVICE`` or
    ``DEVICE@ENVIRONMENT``): does a network searched for one GPU stay fast on another? A table
    that lacks some of the network's keys gives no figure, and says how many it lacks."""
    shapes = cell_shapes(genotype.layout, size, batch, dtype, memory_format)  # type: ignore[arg-type]
    out = []
    for ref in refs:
        slug, env = split_ref(ref)
        table = client.table(slug, dtype=dtype, batch=batch, memory_format=memory_format, environment=env)
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


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(help=__doc__)
def run(
    latency_url: Annotated[str | None, typer.Option(help="latency service base URL, e.g. http://127.0.0.1:8000 "
                                                         "(default GAS_LATENCY_URL)")] = None,
    device: Annotated[str | None, typer.Option(help="device slug whose table to use (default: the service's own)")] = None,
    dataset: Annotated[Literal["synthetic", "cityscapes", "camvid"], typer.Option(help="training data")] = "synthetic",
    data_root: Annotated[Path | None, typer.Option(help="dataset root in its official layout")] = None,
    input_size: Annotated[tuple[int, int], typer.Option(help="H W of the search crops and of the latency keys")] = (
        128, 256),
    latency_size: Annotated[tuple[int, int] | None, typer.Option(
        help="H W the network will be deployed at (latency keys, /measure); default --input-size")] = None,
    latency_batch: Annotated[int, typer.Option(help="deployment batch for the latency keys and /measure")] = 1,
    dtype: Annotated[str, typer.Option(help=f"deployment dtype: {', '.join(DTYPES)}")] = "float32",
    memory_format: Annotated[str, typer.Option(help=f"deployment memory format: {', '.join(MEMORY_FORMATS)}")] = (
        "contiguous"),
    epochs: Annotated[int, typer.Option(help="search epochs (τ anneals 1.0 → 0.03 over them)")] = 10,
    warmup_epochs: Annotated[int, typer.Option(
        help="weights-only epochs on the expected mixture before the search (0 = the paper)")] = 0,
    batch: Annotated[int, typer.Option(help="global batch size over all ranks (paper: 16)")] = 16,
    accum: Annotated[int, typer.Option(help="micro-batches per rank per step (gradient accumulation)")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="cap on steps per epoch (quick runs)")] = None,
    beta: Annotated[float, typer.Option(help="latency weight β in CE + β·log(LAT µs) (paper: 0.005)")] = 0.005,
    seed: Annotated[int, typer.Option(help="seed of init, data order, augmentation and Gumbel noise")] = 0,
    cells: Annotated[Literal["shared", "independent"], typer.Option(help="α per cell or shared per type")] = (
        "independent"),
    ggm: Annotated[Literal["none", "fc", "gcn"], typer.Option(help="link between adjacent cells' α")] = "gcn",
    graph: Annotated[Literal["edge", "op"], typer.Option(help="GCN reasoning graph: edge-similarity or op-identity")] = (
        "edge"),
    synthetic_size: Annotated[tuple[int, int], typer.Option(help="synthetic train/val sample counts")] = (64, 16),
    out: Annotated[Path, typer.Option(help="output directory (checkpoint, log CSV, genotype, report, plots)")] = Path(
        "runs/search"),
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt")] = False,
    measure: Annotated[bool, typer.Option(help="time the derived network on the service (POST /measure)")] = True,
    predict_on: Annotated[list[str] | None, typer.Option(
        "--predict-on", help="also predict the derived network's latency from this device's table (DEVICE or "
        "DEVICE@ENVIRONMENT, see gas-table devices); repeatable")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    d = init_distributed()
    logging.basicConfig(level=logging.INFO if d.main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = ClientSettings()
    url = latency_url or settings.latency_url
    if url is None:
        _fail("--latency-url is required (or set GAS_LATENCY_URL)", 2)
    if dtype not in DTYPES or memory_format not in MEMORY_FORMATS:
        _fail(f"--dtype must be one of {DTYPES} and --memory-format one of {MEMORY_FORMATS}", 2)
    for ref in predict_on or []:
        try:
            split_ref(ref)
        except ValueError as err:
            _fail(f"--predict-on: {err}", 2)
    lat_size = latency_size or input_size
    try:
        train, val = build_datasets(dataset, data_root, input_size, seed, synthetic_size)
    except (DataRootError, ValueError) as err:
        _fail(str(err), 2)
    layout = NetworkLayout(num_classes=train.num_classes)
    cfg = SearchConfig(epochs=epochs, batch=batch, accum=accum, seed=seed, beta=beta, cells=cells, ggm=ggm,
                       graph=graph, max_steps=max_steps, warmup_epochs=warmup_epochs)
    client = LatencyClient(url, token=settings.api_token)
    try:
        payload: list = [None]
        if d.main:
            check_table_refs(client, predict_on or [])
            term, slug = fetch_latency_term(client, device, layout, lat_size, latency_batch, dtype,
                                                    memory_format, progress=not quiet)
            payload = [(term.L, float(term.fixed), slug)]
        if d.world > 1:
            dist.broadcast_object_list(payload, src=0)
        L, fixed, slug = payload[0]
        term = LatencyTerm(L, fixed)
        log.info("latency term: fixed %.3f ms, L in [%.1f, %.1f] µs; β = %g", fixed / 1e3, float(L.min()),
                 float(L.max()), beta)
        result = search(cfg, layout, train, val, term, out, resume=resume, dist_info=d, progress=not quiet)
        if not d.main:
            return
        geno_path = out / "genotype.json"
        result.genotype.save(geno_path)
        plot_alpha(result.supernet.alpha_prime(), out / "alpha.png")
        plot_history(result.history, out / "history.png")
        log.info("wrote %s, %s, %s", geno_path, out / "alpha.png", out / "history.png")
        others = predict_on_devices(client, predict_on or [], result.genotype, lat_size, latency_batch, dtype,
                                    memory_format)
        if not measure:
            for p in others:
                typer.echo(f"predicted on {p.device}@{p.environment}: "
                           + (f"{p.predicted_ms:.3f} ms" if p.predicted_ms is not None else
                              f"n/a ({p.missing_keys} keys missing from its table)"))
            return
        m = client.measure(result.genotype, lat_size, batch=latency_batch, dtype=dtype, memory_format=memory_format)
        last = result.history[-1]
        report = Report(
            device=m.device, environment=m.environment, input_size=m.input_size, batch=m.batch, dtype=m.dtype,
            memory_format=m.memory_format, predicted_ms=m.predicted_ms, measured_median_ms=m.median_ms,
            measured_p90_ms=m.p90_ms, fps=m.fps, error_pct=m.error_pct, search_lat_ms=last["derived_lat_ms"],
            val_miou=None if math.isnan(last["val_miou"]) else last["val_miou"], genotype=str(geno_path),
            predicted_on=others,
        )
        (out / "report.json").write_text(report.model_dump_json(indent=2))
        typer.echo("\npredicted vs measured (derived network)\n" + format_report(report))
        typer.echo(f"\nreport: {out / 'report.json'}")
    except ServiceError as err:
        _fail(str(err), 1)
    except ValueError as err:
        _fail(str(err), 2)
    finally:
        client.close()
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _fail(msg: str, code: int) -> NoReturn:
    typer.echo(f"gas-search: error: {msg}", err=True)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
