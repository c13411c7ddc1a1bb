"""What every command-line tool of the client shares: settings from the environment, the
one-line failure, logging, and naming a config field's error by its flag."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from gas_core.errors import one_line
from search_client.client import LatencyClient


class ClientSettings(BaseSettings):
    """Secrets and defaults from the environment (``GAS_`` prefix); flags override."""

    model_config = SettingsConfigDict(env_prefix="GAS_", extra="ignore")
    api_token: str | None = None
    latency_url: str | None = None


def fail(tool: str, msg: str, code: int = 2) -> NoReturn:
    """``TOOL: error: MSG`` on stderr and exit ``code`` (2: bad input, 1: the work failed)."""
    typer.echo(f"{tool}: error: {msg}", err=True)
    raise typer.Exit(code)


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
    settings = ClientSettings()
    url = url or settings.latency_url
    if url is None:
        fail(tool, "--latency-url is required (or set GAS_LATENCY_URL)")
    return LatencyClient(url, token=token or settings.api_token, **kw)  # type: ignore[arg-type]
