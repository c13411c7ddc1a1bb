"""``gas-service``: run the latency service, or profile / measure this host without HTTP."""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from gas_core.errors import one_line, pair_flag_error, two_number_flags
from gas_core.genotype import Genotype
from gas_core.keys import DTYPES, MEMORY_FORMATS
from gas_core.progress import progress, wait_until
from gas_core.search_space import NetworkLayout
from gas_core.wire import MeasureRequest, ProfileRequest
from latency_service import db, job_state
from latency_service.bounds import RequestError
from latency_service.core.config import Settings
from latency_service.host import pin_cpus
from latency_service.models import Job
from latency_service.service import Host

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)


def _settings(database_url: str | None, device: str | None, threads: int | None) -> Settings:
    overrides: dict[str, Any] = {k: v for k, v in (("database_url", database_url), ("device", device), ("cpu_threads", threads))
                 if v is not None}
    try:
        settings = Settings(**overrides)
        pin_cpus(settings)  # a CPU set this host lacks is one line here, not a start-up traceback
    except ValidationError as err:
        _fail(one_line(err))
    except ValueError as err:
        _fail(str(err))
    return settings


@contextmanager
def _host(settings: Settings) -> Iterator[Host]:
    """This host's service without HTTP (worker not started); bad input exits 2 with one line."""
    host = Host.start(settings, run_worker=False)
    try:
        yield host
    except RequestError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    finally:
        host.close()


DbOpt = Annotated[
    str | None, typer.Option("--database-url", help="SQLAlchemy URL (default GAS_DATABASE_URL or sqlite:///./gas.db)")
]
DevOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda:N (default GAS_DEVICE or auto)")]
ThrOpt = Annotated[
    int | None, typer.Option("--threads", help="torch CPU threads, fixed for every timing (0 = all CPUs)")
]


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    database_url: DbOpt = None,
    device: DevOpt = None,
    threads: ThrOpt = None,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        help="comma-separated addresses of the reverse proxies whose X-Forwarded-For names the client (default "
        "GAS_FORWARDED_ALLOW_IPS; unset: the header is ignored and the peer address is the client)")] = None,
) -> None:
    """Serve the HTTP API with uvicorn (migrates the database and resumes unfinished jobs first);
    request heads time out after GAS_HEADER_TIMEOUT_S, and tokens in query strings never reach
    the access log (docs/security.md lists every bound)."""
    from latency_service.main import create_app
    from latency_service.server import run

    _require_free_port(host, port)  # the first line a user sees, before any database work
    settings = _settings(database_url, device, threads)
    if forwarded_allow_ips is not None:
        settings = settings.model_copy(update={"forwarded_allow_ips": forwarded_allow_ips})
    _require_reachable(settings)
    run(create_app(settings), settings, host, port)


@app.command()
def profile(
    input_size: Annotated[tuple[int, int], typer.Option(help="network input H W")] = (256, 512),
    batch: Annotated[list[int], typer.Option(help="batch size; repeat for several")] = [1],  # noqa: B006
    dtype: Annotated[list[str], typer.Option(help=f"one of {', '.join(DTYPES)}; repeat for several")] = ["float32"],  # noqa: B006
    memory_format: Annotated[list[str], typer.Option(help=f"one of {', '.join(MEMORY_FORMATS)}")] = ["contiguous"],  # noqa: B006
    layout_json: Annotated[
        Path | None, typer.Option("--layout", help="NetworkLayout JSON (default: the paper's)")
    ] = None,
    force: Annotated[bool, typer.Option(help="re-time keys already stored")] = False,
    database_url: DbOpt = None,
    device: DevOpt = None,
    threads: ThrOpt = None,
) -> None:
    """Profile every key of a layout on this host, with a progress bar, straight into the database."""
    settings = _settings(database_url, device, threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        layout = NetworkLayout.model_validate_json(layout_json.read_text()) if layout_json else NetworkLayout()
        req = ProfileRequest(layout=layout, input_size=input_size, batches=batch, dtypes=dtype,  # type: ignore[arg-type]
                             memory_formats=memory_format, force=force)
    except ValidationError as err:
        _fail(one_line(err, str(layout_json) if layout_json else ""))
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"{layout_json}: {err}")
    _require_reachable(settings)
    with _host(settings) as host:
        job, _ = host.submit_profile(req)
        typer.echo(f"device {host.device.slug}, environment {host.env.fingerprint}: job {job.id}, {job.total} keys")
        host.worker.start()
        def read() -> Job:
            with host.sessions() as s:
                cur = job_state.get(s, job_id=job.id)
                assert cur is not None
                return cur

        with progress(total=job.total, unit="key", desc="profiling") as bar:
            cur = wait_until(read, lambda j: j.state not in ("queued", "running"), poll_s=0.2,
                             on_read=lambda j: bar.update(j.done - bar.n))
        typer.echo(f"job {cur.state}: {cur.total - cur.skipped - len(cur.errors)} timed, {cur.skipped} already stored")
        for e in cur.errors:
            typer.echo(f"  error: {e}", err=True)
        if cur.state != "done":
            raise typer.Exit(1)


@app.command()
def measure(
    genotype: Annotated[Path, typer.Argument(help="genotype.json written by gas-search")],
    input_size: Annotated[tuple[int, int], typer.Option(help="network input H W")] = (256, 512),
    batch: int = 1,
    dtype: str = "float32",
    memory_format: str = "contiguous",
    database_url: DbOpt = None,
    device: DevOpt = None,
    threads: ThrOpt = None,
) -> None:
    """Time a derived network end to end on this host and print it beside the table's prediction (JSON)."""
    settings = _settings(database_url, device, threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        geno = Genotype.load(genotype)
    except ValidationError as err:
        _fail(one_line(err, str(genotype)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        _fail(f"{genotype}: cannot read a genotype from it ({type(err).__name__}: {err})")
    try:
        req = MeasureRequest(genotype=geno, input_size=input_size, batch=batch, dtype=dtype,  # type: ignore[arg-type]
                             memory_format=memory_format)  # type: ignore[arg-type]
    except ValidationError as err:
        _fail(one_line(err))
    _require_database(settings)
    with _host(settings) as host:
        host.check_measure_bounds(req)
        result = host.measure(req)
    sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    if result.predicted_ms is None:
        typer.echo(f"warning: this host's table lacks {len(result.missing_keys)} keys of the network, so there is no "
                   f"prediction; run `gas-service profile --input-size {input_size[0]} {input_size[1]} --batch {batch} "
                   f"--dtype {dtype} --memory-format {memory_format}` first", err=True)


def _fail(msg: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _require_free_port(host: str, port: int) -> None:
    """A port in use is one line and exit 2 before the database is touched (it was line 22 of 28,
    after the migration)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as err:
            _fail(f"--host {host} --port {port}: cannot listen there ({err.strerror}); pick another --port")


def _require_reachable(settings: Settings) -> None:
    """Connect once (retrying for GAS_DB_WAIT_S): an unreachable database is one line and exit
    1 here, not a traceback from inside the server's start-up."""
    try:
        db.wait_for(settings.database_url, settings.db_wait_s)
    except OperationalError as err:
        waited = f" after {settings.db_wait_s:g} s" if settings.db_wait_s else ""
        reason = str(err.orig or err).strip().splitlines()[0]
        _fail(f"database {db.redact(settings.database_url)} is unreachable{waited}: {reason} "
              "(check GAS_DATABASE_URL; GAS_DB_WAIT_S retries at start-up)", 1)


def _require_database(settings: Settings) -> None:
    """Measuring against a SQLite file that does not exist would create an empty one and print a
    null prediction: say where the table was looked for instead."""
    url = settings.database_url
    if url.startswith("sqlite") and ":memory:" not in url:
        path = Path(url.split("///", 1)[-1])
        if not path.is_file():
            _fail(f"no latency table at {url} ({path.resolve()} does not exist): run `gas-service profile` first, or "
                  "give --database-url / GAS_DATABASE_URL")


def main() -> None:
    """``gas-service``: a two-number flag given one number is named with its form first."""
    err = pair_flag_error(sys.argv[1:], two_number_flags(typer.main.get_command(app)))
    if err is not None:
        typer.echo(f"gas-service: error: {err}", err=True)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
