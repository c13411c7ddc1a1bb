"""HTTP client of the latency service: timeouts, retries with exponential backoff on connection
errors and 5xx, bodies built and read with the API's own models (:mod:`gas_core.wire`; responses
ignore unknown fields, so a newer service stays readable). Imports gas_core, never latency_service."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from gas_core.genotype import Genotype
from gas_core.keys import LatencyKey
from gas_core.progress import wait_until
from gas_core.table import LatencyTable
from gas_core.wire import (
    ComparePublic,
    DevicesPublic,
    HostPublic,
    ImportPublic,
    JobPublic,
    MeasurePublic,
    MeasureRequest,
    ProfileRequest,
)

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)


class ServiceError(RuntimeError):
    """One line a user can act on (unreachable service, unknown device, failed job)."""


def _body(model: type[BaseModel], what: str, **fields: Any) -> dict[str, Any]:
    """A request body checked by the API's own model before it is sent: a bad value is one
    :class:`ServiceError` line naming the field, as the service's 422 would be."""
    try:
        return model(**fields).model_dump(mode="json", exclude_none=True)
    except ValidationError as err:
        raise ServiceError(f"{what}: {_first_error(err)}") from None


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class _Retry(Exception):
    """A failed attempt worth another: a transport error (``response`` None) or a 5xx."""

    def __init__(self, what: str, response: httpx.Response | None) -> None:
        super().__init__(what)
        self.response = response


def _server_or_backoff(backoff: Callable[[RetryCallState], float]) -> Callable[[RetryCallState], float]:
    """Wait the backoff, or the last response's ``Retry-After`` (seconds) when that is longer."""

    def wait(state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome is not None else None
        asked = err.response.headers.get("retry-after", "") if isinstance(err, _Retry) and err.response else ""
        return max(backoff(state), float(asked) if asked.isdigit() else 0.0)

    return wait


def check_base_url(url: str) -> None:
    """A malformed service URL fails at once, naming the expected form: without a scheme it was
    retried 4 times (11 s) as a connection error."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ServiceError(f"latency URL {url!r}: expected http://HOST:PORT (or https://…)")


class LatencyClient:
    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0, retries: int = 4,
                 backoff: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        check_base_url(base_url)
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self.sleep: Callable[[float], None] = time.sleep  # between retries; a test records instead
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LatencyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> httpx.Response:
        """One request, retried (tenacity) on a transport error or a 5xx: exponential backoff
        from ``backoff`` s, or the server's ``Retry-After`` when it asks for longer."""
        extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}

        def attempt() -> httpx.Response:
            try:
                r = self.http.request(method, path, **kw, **extra)
            except httpx.TransportError as err:
                raise _Retry(f"{err}", None) from None
            if r.status_code >= 500:
                raise _Retry(f"HTTP {r.status_code}", r)
            return r

        def log_retry(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning("%s %s: %s; retrying in %.1fs", method, path, err, wait)

        try:
            return Retrying(stop=stop_after_attempt(self.retries + 1), retry=retry_if_exception_type(_Retry),
                            wait=_server_or_backoff(wait_exponential(multiplier=self.backoff, exp_base=2)),
                            before_sleep=log_retry, reraise=True, sleep=self.sleep)(attempt)
        except _Retry as last:
            if last.response is None:
                raise ServiceError(f"latency service at {self.base_url} is unreachable: {last}") from None
            raise ServiceError(f"{method} {path} failed with {last.response.status_code}: "
                               f"{last.response.text[:300]}") from None

    def _json(self, r: httpx.Response, model: type[T], what: str) -> T:
        self._check(r, what)
        try:
            return model.model_validate(r.json())
        except (ValueError, ValidationError) as err:  # not JSON, or not this API (another service, a proxy page)
            raise ServiceError(f"{what}: unexpected response from {self.base_url}: {_first_error(err)}") from None

    @staticmethod
    def _check(r: httpx.Response, what: str) -> None:
        """An error as one :class:`ServiceError` line with the service's ``message`` (a service
        older than the one error shape sent ``detail``)."""
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("message") or body.get("detail") or r.text
            except (ValueError, AttributeError):
                detail = r.text
            raise ServiceError(f"{what}: HTTP {r.status_code}: {detail}")

    # ------------------------------------------------------------ routes
    def host(self) -> HostPublic:
        return self._json(self._request("GET", "/device"), HostPublic, "GET /device")

    def table(self, device: str, *, dtype: str | None = None, batch: int | None = None,
              memory_format: str | None = None, environment: str | None = None, op: str | None = None,
              runtime: str | None = None, samples: bool = False) -> LatencyTable:
        """A device's table (its newest environment unless one is named), filtered; with
        ``samples`` every raw sample too — the export artefact."""
        r = self._request("GET", f"/table/{device}", params=self._table_params(dtype, batch, memory_format, environment,
                                                                               op, runtime=runtime, samples=samples))
        return self._json(r, LatencyTable, f"GET /table/{device}")

    def table_csv(self, device: str, *, dtype: str | None = None, batch: int | None = None,
                  memory_format: str | None = None, environment: str | None = None, op: str | None = None,
                  runtime: str | None = None) -> bytes:
        params = self._table_params(dtype, batch, memory_format, environment, op, runtime=runtime, format="csv")
        r = self._request("GET", f"/table/{device}", params=params)
        self._check(r, f"GET /table/{device}")
        return r.content

    @staticmethod
    def _table_params(dtype: str | None, batch: int | None, memory_format: str | None, environment: str | None,
                      op: str | None, **extra: Any) -> dict[str, Any]:
        given = dict(dtype=dtype, batch=batch, memory_format=memory_format, environment=environment, op=op, **extra)
        return {k: v for k, v in given.items() if v is not None}

    def devices(self) -> DevicesPublic:
        return self._json(self._request("GET", "/devices"), DevicesPublic, "GET /devices")

    def compare(self, refs: list[str], *, dtype: str | None = None, batch: int | None = None,
                memory_format: str | None = None, op: str | None = None, runtime: str | None = None) -> ComparePublic:
        params = self._table_params(dtype, batch, memory_format, None, op, runtime=runtime, devices=",".join(refs))
        return self._json(self._request("GET", "/compare", params=params), ComparePublic, "GET /compare")

    def import_table(self, table: LatencyTable, *, force: bool = False) -> ImportPublic:
        r = self._request("POST", "/table/import", params={"force": force}, content=table.model_dump_json(),
                          headers={"Content-Type": "application/json"}, timeout=600)
        return self._json(r, ImportPublic, "POST /table/import")

    def profile(self, keys: list[LatencyKey], force: bool = False) -> JobPublic:
        body = _body(ProfileRequest, "POST /profile", keys=keys, force=force)
        return self._json(self._request("POST", "/profile", json=body), JobPublic, "POST /profile")

    def job(self, job_id: str) -> JobPublic:
        return self._json(self._request("GET", f"/jobs/{job_id}"), JobPublic, f"GET /jobs/{job_id}")

    def wait_job(self, job_id: str, on_progress: Callable[[JobPublic], None] | None = None, poll_s: float = 0.5,
                 timeout_s: float = 24 * 3600) -> JobPublic:
        """Poll ``GET /jobs/{id}`` until the job ends; its record when done, else ServiceError
        with the reason (a job the service stopped — a busy host, its time budget — says why
        last)."""
        try:
            job = wait_until(lambda: self.job(job_id), lambda j: j.state not in ("queued", "running"),
                             timeout_s=timeout_s, poll_s=poll_s, on_read=on_progress)
        except TimeoutError:
            raise ServiceError(f"profiling job {job_id} did not finish in {timeout_s:.0f}s") from None
        if job.state == "done":
            return job
        why = job.errors[-1] if job.errors and job.errors[-1].startswith("stopped") else \
            (job.errors[0] if job.errors else "")
        first = f": {why}" if why else ""
        raise ServiceError(f"profiling job {job_id} {job.state} ({len(job.errors)} errors){first}")

    def measure(self, genotype: Genotype, input_size: tuple[int, int], *, batch: int, dtype: str,
                memory_format: str, runtime: str = "eager") -> MeasurePublic:
        body = _body(MeasureRequest, "POST /measure", genotype=genotype, input_size=input_size, batch=batch,
                     dtype=dtype, memory_format=memory_format, runtime=runtime)
        r = self._request("POST", "/measure", json=body, timeout=1800)
        return self._json(r, MeasurePublic, "POST /measure")
