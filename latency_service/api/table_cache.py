"""Serving a table: one rendering per table version (its bytes, gzip bytes and ETag), and which
answer each request saw last, kept valid until this host writes into the rows it reads. Used by
the table route and by the cached-read fast path (:mod:`latency_service.api.fastpath`)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from gas_core.keys import LatencyKey
from latency_service.core.lru import LRU


@dataclass(frozen=True)
class Rendered:
    """One table response, rendered once: its bytes, gzip-compressed bytes and ETag."""

    body: bytes
    gzip_body: bytes
    media: str
    etag: str
    environment: str

    @classmethod
    def of(cls, body: bytes, media: str, environment: str) -> Rendered:
        media = f"{media}; charset=utf-8" if media.startswith("text/") else media
        return cls(body, gzip.compress(body, 6), media, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', environment)

    def nbytes(self) -> int:
        """Memory the response holds: its plain and compressed bodies."""
        return len(self.body) + len(self.gzip_body)

    def answer(self, if_none_match: str | None, accept_encoding: str | None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for a request with these headers: 304 when its ETag matches,
        gzip bytes when the client accepts them. One place for both ways a table is served (the
        route and the cached-read fast path)."""
        headers = {"ETag": self.etag, "X-GAS-Environment": self.environment, "Cache-Control": "no-cache",
                   "Vary": "Accept-Encoding"}
        if if_none_match is not None and etag_matches(if_none_match, self.etag):
            return 304, headers, b""
        if accept_encoding is not None and "gzip" in accept_encoding.lower():
            return 200, {**headers, "Content-Type": self.media, "Content-Encoding": "gzip"}, self.gzip_body
        return 200, {**headers, "Content-Type": self.media}, self.body


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*`` matches any current representation, and If-None-Match uses the
    weak comparison, so ``W/"x"`` matches ``"x"``."""
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in [t.removeprefix("W/") for t in tags]


@dataclass(frozen=True)
class TableScope:
    """Which rows a table request reads: one device and environment, each filter ``None`` for
    any. A write outside it (another batch, dtype, op) leaves that request's answer valid."""

    device_id: int
    environment_id: int
    dtype: str | None = None
    batch: int | None = None
    memory_format: str | None = None
    op: str | None = None
    runtime: str | None = None

    def touched_by(self, write: TableWrite | None) -> bool:
        if write is None:  # rows unknown (an import, flags set on a stretch of keys)
            return True
        k = write.key
        return (write.device_id == self.device_id and write.environment_id == self.environment_id
                and all(f is None or f == v for f, v in ((self.dtype, k.dtype), (self.batch, k.batch),
                                                         (self.memory_format, k.memory_format), (self.op, k.op),
                                                         (self.runtime, k.runtime))))


@dataclass(frozen=True)
class TableWrite:
    """One row this host stored."""

    device_id: int
    environment_id: int
    key: LatencyKey


class TableCache:
    """Rendered tables by version, and which version each request saw last. A request seen less
    than ``ttl_s`` ago with no write by this host *to the rows it reads* since is answered without
    touching the database: under load the device/environment/version queries, not the bytes, were
    what cost (64 clients: p50 0.26–0.56 s, p99 1.8–4.0 s on a 44 KB table), and while a job runs
    a write lands every ~0.1 s. Rows written by other hosts of a fleet show within ``ttl_s``."""

    WRITE_LOG = 4096
    """Writes remembered to decide whether a remembered answer is still valid; an answer older
    than the log is treated as stale."""

    def __init__(self, ttl_s: float, size: int = 256, capacity_bytes: int = 64 * 2**20) -> None:
        self.ttl_s = ttl_s
        # bounded in bytes too: 64 variants of a 10,000-row table with its samples held 370 MB
        # under a count bound alone. ``_recent`` points at the same Rendered objects, so only
        # ``_rendered`` is weighed; a remembered answer whose bytes were dropped is re-rendered.
        self._rendered = LRU(size, capacity=capacity_bytes, weigh=Rendered.nbytes)
        self._recent = LRU(size, capacity=capacity_bytes, weigh=lambda entry: Rendered.nbytes(entry[0]))
        self._generation = 0
        self._writes: deque[tuple[int, TableWrite | None]] = deque(maxlen=self.WRITE_LOG)
        self._lock = threading.Lock()  # the worker thread writes, the event loop reads
        self._inflight: dict[Hashable, tuple[int, asyncio.Future[Rendered]]] = {}

    @property
    def generation(self) -> int:
        """Bumped by every write of this host; read it *before* a lookup that ``remember`` records."""
        return self._generation

    async def current(self, request: Hashable, lookup: Callable[[int], Awaitable[Rendered]]) -> Rendered:
        """The rendered table for ``request``: remembered, else from one ``lookup(generation)``
        shared by every request that misses meanwhile. While a job writes rows, each write makes
        the next reads miss at once; 64 clients each querying the database for the same answer
        was most of the service's cost under load. Event-loop only (no lock needed); a client
        that disconnects does not cancel the lookup the others wait on."""
        hit = self.recent(request)
        if hit is not None:
            return hit
        gen = self._generation
        flight = self._inflight.get(request)
        if flight is None or flight[0] != gen:  # none, or started before a write: its answer may be stale
            fut = asyncio.ensure_future(lookup(gen))
            self._inflight[request] = (gen, fut)
            fut.add_done_callback(lambda done: self._forget(request, done))
            flight = (gen, fut)
        return await asyncio.shield(flight[1])

    def _forget(self, request: Hashable, done: asyncio.Future[Rendered]) -> None:
        if self._inflight.get(request, (0, None))[1] is done:
            del self._inflight[request]

    def rendered(self, version: Hashable) -> Rendered | None:
        return self._rendered.get(version)  # type: ignore[no-any-return]

    def put(self, version: Hashable, rendered: Rendered) -> Rendered:
        return self._rendered.put(version, rendered)  # type: ignore[no-any-return]

    def recent(self, request: Hashable) -> Rendered | None:
        """The remembered answer to ``request`` if its TTL holds and no write since touched its rows."""
        hit = self._recent.get(request)
        if hit is None:
            return None
        rendered, generation, expires, scope = hit
        if time.monotonic() >= expires:
            return None
        with self._lock:
            now = self._generation
            if generation != now:
                if not self._writes or self._writes[0][0] > generation + 1:
                    return None  # writes since then have left the log
                if any(gen > generation and scope.touched_by(w) for gen, w in self._writes):
                    return None
        if generation != now:  # still valid: the writes since were elsewhere; skip them next time
            self._recent.put(request, (rendered, now, expires, scope))
        return rendered  # type: ignore[no-any-return]

    def remember(self, request: Hashable, rendered: Rendered, generation: int, scope: TableScope) -> None:
        """``rendered`` answers ``request`` until the TTL passes or this host writes into ``scope``
        after ``generation`` (the generation read before the lookup: a write during it is not missed)."""
        self._recent.put(request, (rendered, generation, time.monotonic() + self.ttl_s, scope))

    def invalidate(self, write: TableWrite | None = None) -> None:
        """This host wrote ``write`` (``None``: rows it cannot name): answers that read it are stale."""
        with self._lock:
            self._generation += 1
            self._writes.append((self._generation, write))
