"""Validation errors as one line a user can act on (CLIs print this, not pydantic's report)."""

from __future__ import annotations

from pydantic import ValidationError


def where(loc: tuple[int | str, ...]) -> str:
    """``('cells', 0, 'edges', 2)`` → ``cells[0].edges[2]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def one_line(err: ValidationError, what: str = "") -> str:
    """The first problem as ``what: field: message`` and how many more there are."""
    errors = err.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(err)}
    field = where(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    text = ": ".join(p for p in (what, field, msg) if p)
    return text + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else "")
