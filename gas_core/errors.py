"""Validation errors as one line a user can act on (CLIs print this, not pydantic's report)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def two_number_flags(command: Any) -> set[str]:
    """The option names of a click command (and its subcommands) that take two values
    (``--input-size H W``). Duck-typed on click's ``params``/``nargs``/``opts``/``commands``, so
    gas_core needs no CLI library."""
    flags: set[str] = set()
    for p in getattr(command, "params", []):
        if getattr(p, "nargs", 1) == 2 and getattr(p, "opts", None):
            flags.update(p.opts)
    for sub in getattr(command, "commands", {}).values():
        flags |= two_number_flags(sub)
    return flags


def pair_flag_error(argv: Sequence[str], flags: set[str]) -> str | None:
    """The error for a two-number flag given fewer than two integers (``--input-size 64
    --epochs 3``), which click reports as "'--epochs' is not a valid integer", naming the wrong
    flag. None when every such flag has two integers."""
    for i, token in enumerate(argv):
        if token in flags:
            values = list(argv[i + 1:i + 3])
            if len(values) < 2 or not all(v.lstrip("-").isdigit() for v in values):
                got = " ".join(values) if values else "nothing"
                return f"{token} takes two integers, e.g. {token} 96 192 (got {got!r})"
    return None
