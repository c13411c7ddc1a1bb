"""One handler per error type. FastAPI's default 422 echoes the whole offending input back —
20 MB in, 20 MB out — and raises (a 500) when that input holds NaN or Infinity, which JSON
cannot carry. This one names each field, says what is wrong with it and echoes at most
``ECHO_CHARS`` of the input, as a string."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

ECHO_CHARS = 120
MAX_ERRORS = 20


def _where(loc: tuple[Any, ...]) -> str:
    """``('body', 'keys', 0, 'c_in')`` → ``body.keys[0].c_in``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"… ({len(text)} characters)"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [{"loc": [p if isinstance(p, int | str) else str(p) for p in e.get("loc", ())],
               "field": _where(tuple(e.get("loc", ()))), "msg": str(e.get("msg", "")), "type": str(e.get("type", "")),
               "input": _echo(e.get("input"))} for e in errors[:MAX_ERRORS]]
    summary = "; ".join(f"{d['field']}: {d['msg']}" for d in detail[:3])
    if len(errors) > 3:
        summary += f" (and {len(errors) - 3} more)"
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
                        content={"message": summary, "detail": detail})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
