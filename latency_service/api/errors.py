"""One handler per error type, and one error shape everywhere (:class:`gas_core.wire.ErrorBody`:
``message`` plus per-field ``detail``), documented once for every route as the ``4XX``/``5XX``
responses (:data:`ERROR_RESPONSES`). FastAPI's default 422 echoes the whole offending input
back — 20 MB in, 20 MB out — and raises (a 500) when that input holds NaN or Infinity, which
JSON cannot carry. This one names each field, says what is wrong with it and echoes at most
``ECHO_CHARS`` of the input, as a string."""

from __future__ import annotations

import hmac
import json
import logging
import reprlib
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel
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


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = ECHO_CHARS, ECHO_CHARS, 40
"""Echoes an input without walking all of it: a plain ``repr`` of a 20-million-element list held
the event loop for seconds (and all its memory) just to be cut to 120 characters."""


def _echo(value: Any) -> str:
    text = _REPR.repr(value)
    if isinstance(value, list | dict | tuple | set) and len(value) > 8:
        text += f" ({len(value)} items)"
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"… ({len(text)} characters)"


def summarise_validation(errors: list[Any], prefix: tuple[str, ...] = ()) -> tuple[int, str, list[FieldProblem]]:
    """(status, one line, per-field problems) of a validation error's ``errors()``: 422 naming the
    first fields, or 400 when the body is not JSON at all (saying where the parser stopped).
    ``prefix`` is put before each ``loc`` (``("body",)`` for a body validated outside FastAPI)."""
    detail = [FieldProblem(loc=[p if isinstance(p, int | str) else str(p) for p in (*prefix, *e.get("loc", ()))],
                           field=where(tuple(e.get("loc", ())) or prefix), msg=str(e.get("msg", "")),
                           type=str(e.get("type", "")), input=_echo(e.get("input"))) for e in errors[:MAX_ERRORS]]
    summary = "; ".join(f"{d.field}: {d.msg}" for d in detail[:3])
    if len(errors) > 3:
        summary += f" (and {len(errors) - 3} more)"
    invalid = [e for e in errors if e.get("type") == "json_invalid"]
    if invalid:  # not JSON at all: a 400 saying where the parser stopped, not a schema error
        ctx, loc = invalid[0].get("ctx", {}), invalid[0].get("loc", ())
        at = f", at character {loc[-1]}" if loc else ""
        return status.HTTP_400_BAD_REQUEST, f"body: not valid JSON ({ctx.get('error', 'parse error')}{at})", detail
    return status.HTTP_422_UNPROCESSABLE_CONTENT, summary, detail


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    code, summary, detail = summarise_validation(list(exc.errors()))
    return JSONResponse(status_code=code, content=error_body(summary, detail))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Every ``HTTPException`` (a route's 404/409/422/429/503, the router's 404/405, the auth
    dependency's 401/403) in the one shape, its headers (Retry-After, Allow) kept."""
    assert isinstance(exc, StarletteHTTPException)
    headers = exc.headers
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request.scope))}
    return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail)), headers=headers)


def allowed_methods(scope: Scope) -> list[str]:
    """Every method the path's routes answer: Starlette's 405 names only the first route that
    matched the path (``GET /jobs/{id}``, not its ``DELETE``)."""
    from starlette.routing import Match

    matched = [r for r in leaf_routes(scope["app"].router.routes) if r.matches(scope)[0] is not Match.NONE]
    if not matched:
        return []
    # the most specific template wins: /table/import is its own path, not /table/{device} with device="import"
    fewest = min(r.path.count("{") for r in matched)
    return sorted({m for r in matched if r.path.count("{") == fewest for m in (getattr(r, "methods", None) or ())})


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes gets 413 before it is parsed —
    at once when Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, limit: int, setting: str = "GAS_MAX_BODY_BYTES") -> None:
        self.app, self.limit, self.setting = app, limit, setting

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
        body = json.dumps(error_body(f"body: larger than the limit of {self.limit} bytes ({self.setting})"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})


class Gate:
    """Pure ASGI middleware: what may be refused without reading the body is refused before a
    byte of it is read. FastAPI reads and JSON-decodes the whole body on the event loop before it
    runs a route's dependencies, so an anonymous 60 MiB body was parsed (RSS +1.5 GB, /health
    stalled 13 s) only to be answered 401. Here the request is routed first; then

    1. a route that needs a bearer token (its dependencies hold :func:`~latency_service.api.deps.require_token`
       or ``require_read``) without a valid one gets 401/403 at once, and the connection is closed
       (its body stays unread);
    2. a route that takes a JSON body (it documents a 415) gets 415 for another content type and
       400 for two ``Content-Type`` headers (the framework would read one, this check the other).

    Requests that match no route pass through, so the router's own 404 and 405 answer them
    (never a 415 for a path that does not exist). The routes' own dependencies still check the
    token too: the gate is the early refusal, not the only one."""

    BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._needs: dict[int, tuple[str | None, bool, bool]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = _full_match(scope)
            if route is not None:
                auth, json_body, large = self._route_needs(route)
                refusal = (_auth_refusal(scope, auth) if auth is not None else None) or (
                    _content_type_refusal(scope) if json_body and scope["method"] in self.BODY_METHODS else None)
                if refusal is not None:
                    await _send_json(send, *refusal)
                    return
                host = getattr(scope["app"].state, "host", None)
                if json_body and not large and host is not None:  # a small-body route: its own, lower limit
                    await BodyLimit(self.app, host.settings.max_json_body_bytes,
                                    "GAS_MAX_JSON_BODY_BYTES")(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _route_needs(self, route: Any) -> tuple[str | None, bool, bool]:
        """(which token the route needs: "write", "read" or None; whether it takes a JSON body;
        whether that body may be large: ``openapi_extra={"x-large-body": True}``, /table/import)."""
        key = id(route)
        if key not in self._needs:
            from latency_service.api.deps import require_read, require_token

            calls = {d.call for d in getattr(getattr(route, "dependant", None), "dependencies", [])}
            auth = "write" if require_token in calls else "read" if require_read in calls else None
            large = bool((getattr(route, "openapi_extra", None) or {}).get("x-large-body"))
            self._needs[key] = (auth, 415 in getattr(route, "responses", {}), large)
        return self._needs[key]


def leaf_routes(routes: list[Any]) -> list[Any]:
    """The app's routes with included routers opened up (FastAPI ≥ 0.16x wraps each
    ``include_router`` in one object that matches for all its routes); the routers here are
    included without a prefix, so each leaf matches the request's own path."""
    out: list[Any] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += leaf_routes(inner.routes) if inner is not None else [route]
    return out


def _full_match(scope: Scope) -> Any:
    from starlette.routing import Match

    app = scope.get("app")
    for route in leaf_routes(getattr(getattr(app, "router", None), "routes", [])):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
    return None


Refusal = tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]


def _auth_refusal(scope: Scope, need: str) -> Refusal | None:
    """401 without a bearer token, 403 with a wrong one (constant-time comparison), as the
    route's dependency would answer; None when the token is accepted or none is configured."""
    host = getattr(getattr(scope.get("app"), "state", None), "host", None)
    if host is None:
        return None
    accepted = ([host.settings.api_token] if host.settings.api_token is not None else None) if need == "write" \
        else host.settings.read_tokens()
    if accepted is None:
        return None
    name = "GAS_API_TOKEN" if need == "write" else "GAS_READ_TOKEN"
    header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    close = [(b"connection", b"close")]
    if scheme.lower() != "bearer" or not token.strip():
        return 401, error_body(f"this route needs 'Authorization: Bearer <{name}>'"), [
            (b"www-authenticate", b"Bearer"), *close]
    if not any(hmac.compare_digest(token.strip().encode(), t.encode()) for t in accepted):
        return 403, error_body("wrong bearer token"), close
    return None


def _content_type_refusal(scope: Scope) -> Refusal | None:
    types = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"content-type"]
    if len(types) > 1:
        return 400, error_body(f"Content-Type: sent {len(types)} times ({', '.join(map(repr, types))}); send one, "
                               "application/json"), [(b"connection", b"close")]
    raw = types[0] if types else ""
    media = raw.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    got = f"{raw!r}" if raw else "none"
    return 415, error_body(f"Content-Type: expected application/json, got {got}", [FieldProblem(
        loc=["header", "content-type"], field="Content-Type", msg="expected application/json",
        type="unsupported_media_type", input=raw[:ECHO_CHARS])]), [(b"accept", b"application/json"),
                                                                  (b"connection", b"close")]


async def _send_json(send: Send, status_code: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status_code,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database refused or dropped the connection (a restart, a failover, SQLite locked past
    its busy timeout): a 503 the client may retry, not a 500 that looks like a bug here."""
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, str(exc).splitlines()[0])
    return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "1"},
                        content=error_body("database unavailable (restarting or busy); retry shortly"))


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything no other handler took (a database error only one backend raises, a bug): the one
    error shape and a 500, never the framework's plain-text page; the traceback goes to the log."""
    log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, str(exc).splitlines()[:1],
              exc_info=exc)
    return JSONResponse(status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
                        content=error_body(f"internal error ({type(exc).__name__}); see the service log"))


BODY_MODELS: list[type[BaseModel]] = []
"""Request bodies that a route decodes itself (``/table/import``, in a worker process) and names
by ``$ref`` in its ``openapi_extra``: registered as components here, since FastAPI registers only
what a route's parameters declare (an inline schema's ``$defs`` broke ReDoc)."""


def document(app: FastAPI) -> None:
    """Every error response a route names (a 404, a 429 …, with its own description) is given
    the one error body in the OpenAPI schema, so the schema says what the handlers send."""
    generate = app.openapi
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached on the app after the first call; the edit below stays in it
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in BODY_MODELS:  # bodies a route reads itself (no parameter to derive them from)
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in body.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(model.__name__, body)
        for ops in schema["paths"].values():
            for op in ops.values():
                for code, response in op.get("responses", {}).items():
                    if code[0] in "45" and "content" not in response:
                        response["content"] = ref
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, max_body_bytes: int) -> None:
    """The error handler, gzip for large responses when the client accepts it (a table with its
    samples compresses ~3×), the gate (auth and the content type, before any body is read:
    :class:`Gate`), and the body limit outermost, so nothing reads an oversized body."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_exception_handler(Exception, unexpected_error)
    document(app)
    app.add_middleware(GZipMiddleware, minimum_size=4096)
    app.add_middleware(Gate)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
