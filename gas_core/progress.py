"""Progress that suits where it goes: a tqdm bar on a terminal, and plain lines in a log.

Redirected to a file, a tqdm bar writes a carriage-return frame per update — several kB of
``evaluating: 12%|…`` per run — and a log's last line is then a frame, not the result. Off a
terminal, :func:`progress` instead writes one line every ``every_s`` seconds or every tenth of
the total (whichever comes first), and nothing at all for bars that are only ever transient
(``transient=True``: an epoch's steps, whose result the epoch's own log line gives).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class LineProgress:
    """The part of tqdm's interface the project uses (``update``, ``n``, ``total``, iteration,
    a context manager), writing a line now and then instead of a bar."""

    def __init__(self, iterable: Iterable[Any] | None, total: float | None, desc: str, unit: str, every_s: float,
                 file: IO[str], clock: Any = time.monotonic) -> None:
        self.iterable, self.desc, self.unit, self.every_s, self.file, self.clock = iterable, desc, unit, every_s, file, clock
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n = total, 0
        self._t0 = self._last = clock()
        self._last_tenth = 0
        self._written = 0
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += int(n)
        now = self.clock()
        tenth = int(10 * self.n / self.total) if self.total else 0
        if now - self._last >= self.every_s or tenth > self._last_tenth:
            self._write(now)
            self._last, self._last_tenth = now, tenth

    def _write(self, now: float) -> None:
        self._written = self.n
        rate = self.n / max(now - self._t0, 1e-9)
        of = f"/{self.total:g} ({100 * self.n / self.total:.0f} %)" if self.total else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}, {rate:.2f} {self.unit}/s", file=self.file, flush=True)

    def set_postfix(self, **values: Any) -> None:
        """Shown on a terminal bar only; a log line keeps to the count."""

    def close(self) -> None:
        if not self._closed and self.n != self._written:  # the last state, once
            self._write(self.clock())
        self._closed = True

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent(LineProgress):
    def _write(self, now: float) -> None:
        self._written = self.n


def progress(iterable: Iterable[T] | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, transient: bool = False, every_s: float = 5.0,
             file: IO[str] | None = None) -> Any:
    """A tqdm bar on a terminal; off one, a :class:`LineProgress` (silent when ``transient`` or
    not ``enabled``). Use like tqdm: ``for x in progress(xs, desc=…)`` or ``with progress(total=n)
    as bar: bar.update(k)``."""
    out = file if file is not None else sys.stderr
    if enabled and out.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=not transient, file=out)
    cls = _Silent if transient or not enabled else LineProgress
    return cls(iterable, total, desc, unit, every_s, out)


def wait_until(read: Callable[[], T], ended: Callable[[T], bool], *, timeout_s: float = math.inf,
               poll_s: float = 0.5, on_read: Callable[[T], None] | None = None,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """Read a state every ``poll_s`` until ``ended`` says so, and return it; ``on_read`` sees every
    read (a progress bar). Raises ``TimeoutError`` after ``timeout_s``. The one wait-for-a-job
    loop of the client, the service's CLI and the test harness."""
    deadline = clock() + timeout_s
    while True:
        state = read()
        if on_read is not None:
            on_read(state)
        if ended(state):
            return state
        if clock() > deadline:
            raise TimeoutError(f"still not ended after {timeout_s:.0f} s")
        sleep(poll_s)
