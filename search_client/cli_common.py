"""What every command-line tool of the client shares: settings from the environment, the
one-line failure, logging, and naming a config field's error by its flag."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, get_type_hints

import typer
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gas_core.errors import one_line, pair_flag_error, two_number_flags
from search_client.client import LatencyClient, ServiceError
from search_client.data import DATASETS


class ClientSettings(BaseSettings):
    """Secrets and defaults from the environment (``GAS_`` prefix); flags override."""

    model_config = SettingsConfigDict(env_prefix="GAS_", extra="ignore")
    api_token: str | None = None
    latency_url: str | None = None
    client_retries: int = Field(4, ge=0, le=20, description="retries of a request that met a transport error or a 5xx")
    client_backoff_s: float = Field(0.5, ge=0, le=60, description="first wait between retries; doubles each time")


def fail(tool: str, msg: str, code: int = 2) -> NoReturn:
    """``TOOL: error: MSG`` on stderr and exit ``code`` (2: bad input, 1: the work failed)."""
    typer.echo(f"{tool}: error: {msg}", err=True)
    raise typer.Exit(code)


def check_pair_flags(tool: str, app: typer.Typer, argv: list[str] | None = None) -> None:
    """Before the app parses: a two-number flag (``--input-size H W``) given one number is named
    with the form it expects (click would blame the flag after it). Exits 2."""
    err = pair_flag_error(sys.argv[1:] if argv is None else argv, two_number_flags(typer.main.get_command(app)))
    if err is not None:
        typer.echo(f"{tool}: error: {err}", err=True)
        sys.exit(2)


def known_dataset(name: str) -> str:
    """``--dataset``'s check against the dataset registry (:data:`search_client.data.DATASETS`)."""
    if name not in DATASETS:
        raise typer.BadParameter(f"unknown dataset {name!r}; use {', '.join(DATASETS)}")
    return name


def dataset_help(what: str) -> str:
    return f"{what}: {', '.join(DATASETS)}"


def flag_error(err: ValidationError) -> str:
    """A config model's validation error, named by the flag of its field (``--lr-a: …``)."""
    e = err.errors()[0]
    return f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else one_line(err)


def setup_logging(info: bool = True, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """INFO when ``info`` (rank 0 of a run, ``--verbose``), else WARNING; httpx's per-request lines off."""
    logging.basicConfig(level=logging.INFO if info else logging.WARNING, format=fmt, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def latency_client(tool: str, url: str | None, token: str | None, **kw: object) -> LatencyClient:
    """A client for ``--latency-url`` (or ``GAS_LATENCY_URL``) with ``--token`` (or ``GAS_API_TOKEN``)."""
    try:
        settings = ClientSettings()
    except ValidationError as err:
        e = err.errors()[0]
        fail(tool, f"GAS_{str(e['loc'][0]).upper()}: {e['msg']}")
    url = url or settings.latency_url
    if url is None:
        fail(tool, "--latency-url is required (or set GAS_LATENCY_URL)")
    kw = {"retries": settings.client_retries, "backoff": settings.client_backoff_s, **kw}
    try:
        return LatencyClient(url, token=token or settings.api_token, **kw)  # type: ignore[arg-type]
    except ServiceError as err:
        fail(tool, str(err))


def config_flags(**models: type[BaseModel]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: the command gains one ``--flag`` per field of each model (help from the field's
    description, default from its default), so a config's defaults and help live only on the
    model. The command receives, per model name, a dict of those fields' values, and validates it
    itself (a bad value is then a one-line error naming its flag, see :func:`flag_error`)."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(fn, eval_str=True)
        hints = get_type_hints(fn, include_extras=True)
        fields = {group: [(n, f) for n, f in model.model_fields.items() if n != "schema_version"]
                  for group, model in models.items()}
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own.parameters.values()
                  if p.name not in models]
        taken = {p.name for p in params}
        for group, items in fields.items():
            for name, f in items:
                if name in taken:
                    raise ValueError(f"{fn.__name__}: flag --{name} of {group} is declared twice")
                taken.add(name)
                annotation = Annotated[f.annotation, typer.Option(help=f.description or name)]  # type: ignore[name-defined]
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                                default=f.default))

        @functools.wraps(fn)
        def command(**kw: Any) -> None:
            grouped = {group: {n: kw.pop(n) for n, _ in items} for group, items in fields.items()}
            fn(**kw, **grouped)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the generated signature, not the wrapped one
        return command

    return deco
