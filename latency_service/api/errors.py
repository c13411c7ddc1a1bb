"""One handler per error type, and one error shape everywhere (:class:`gas_core.wire.ErrorBody`:
``message`` plus per-field ``detail``), documented once for every route as the ``4XX``/``5XX``
responses (:data:`ERROR_RESPONSES`). FastAPI's default 422 echoes the whole offending input
back — 20 MB in, 20 MB out — and raises (a 500) when that input holds NaN or Infinity, which
JSON cannot carry. This one names each field, says what is wrong with it and echoes at most
``ECHO_CHARS`` of the input, as a string."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gas_core.errors import where
from gas_core.wire import ErrorBody, FieldProblem

log = logging.getLogger(__name__)
ECHO_CHARS = 120
MAX_ERRORS = 20


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "the request is at fault: `message` says how in one line, `detail` "
            "names each field at fault (empty when no field is)"},
    "5XX": {"model": ErrorBody, "description": "the service cannot answer now (database or device worker "
            "unavailable); `Retry-After` says when to try again"},
}


def error_body(message: str, detail: list[FieldProblem] | None = None) -> dict[str, Any]:
    return ErrorBody(message=message, detail=detail or []).model_dump(mode="json")


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"… ({len(text)} characters)"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [FieldProblem(loc=[p if isinstance(p, int | str) else str(p) for p in e.get("loc", ())],
                           field=where(tuple(e.get("loc", ()))), msg=str(e.get("msg", "")),
                           type=str(e.get("type", "")), input=_echo(e.get("input"))) for e in errors[:MAX_ERRORS]]
    summary = "; ".join(f"{d.field}: {d.msg}" for d in detail[:3])
    if len(errors) > 3:
        summary += f" (and {len(errors) - 3} more)"
    unparseable = any(d.type == "json_invalid" for d in detail)
    if unparseable:  # not JSON at all: a 400 saying where the parser stopped, not a schema error
        ctx = next(e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid")
        summary = f"body: not valid JSON ({ctx.get('error', 'parse error')}, at character {errors[0]['loc'][-1]})"
    return JSONResponse(status_code=status.HTTP_400_BAD_REQUEST if unparseable else
                        status.HTTP_422_UNPROCESSABLE_CONTENT, content=error_body(summary, detail))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Every ``HTTPException`` (a route's 404/409/422/429/503, the router's 404/405, the auth
    dependency's 401/403) in the one shape, its headers (Retry-After, Allow) kept."""
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail)), headers=exc.headers)


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes gets 413 before it is parsed —
    at once when Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._too_large(send)
            return
        seen, answered = 0, False

        async def counted() -> Message:
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer now; the app sees a disconnect and whatever it says is dropped
                    answered = True
                    await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(error_body(f"body: larger than the limit of {self.limit} bytes (GAS_MAX_BODY_BYTES)"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})


class JsonOnly:
    """Pure ASGI middleware: a POST, PUT or PATCH whose body is not declared JSON gets 415 naming
    the type expected (every such route here takes a JSON body). Without it a JSON body sent as
    ``text/plain``, as a form or without a type got a 422 "Input should be a valid dictionary"
    that said nothing about the content type."""

    METHODS = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in self.METHODS:
            raw = dict(scope.get("headers", [])).get(b"content-type", b"").decode("latin-1")
            media = raw.split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                got = f"{raw!r}" if raw else "none"
                body = json.dumps(error_body(f"Content-Type: expected application/json, got {got}", [FieldProblem(
                    loc=["header", "content-type"], field="Content-Type", msg="expected application/json",
                    type="unsupported_media_type", input=raw[:ECHO_CHARS])])).encode()
                await send({"type": "http.response.start", "status": 415,
                            "headers": [(b"content-type", b"application/json"), (b"accept", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database refused or dropped the connection (a restart, a failover, SQLite locked past
    its busy timeout): a 503 the client may retry, not a 500 that looks like a bug here."""
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, str(exc).splitlines()[0])
    return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "1"},
                        content=error_body("database unavailable (restarting or busy); retry shortly"))


def document(app: FastAPI) -> None:
    """Every error response a route names (a 404, a 429 …, with its own description) is given
    the one error body in the OpenAPI schema, so the schema says what the handlers send."""
    generate = app.openapi
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached on the app after the first call; the edit below stays in it
        for ops in schema["paths"].values():
            for op in ops.values():
                for code, response in op.get("responses", {}).items():
                    if code[0] in "45" and "content" not in response:
                        response["content"] = ref
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, max_body_bytes: int) -> None:
    """The error handler, gzip for large responses when the client accepts it (a table with its
    samples compresses ~3×), 415 for a body that is not JSON, and the body limit outermost, so
    nothing reads an oversized body."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OperationalError, database_unavailable)
    document(app)
    app.add_middleware(GZipMiddleware, minimum_size=4096)
    app.add_middleware(JsonOnly)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
