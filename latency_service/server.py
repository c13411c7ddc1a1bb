"""The HTTP server around the app: uvicorn with request-head and request-body deadlines and an
access log that never writes a token.

uvicorn (0.54) has no timeout for a request head: a client that opens a connection and sends its
headers a byte at a time holds it open for ever (200 such connections were all still open after
35 s), and any byte cancels the keep-alive timer. :class:`HeadTimeoutH11` closes a connection
whose request head is not complete ``GAS_HEADER_TIMEOUT_S`` after it opened, or after the
previous response on a kept-alive connection. Behind a reverse proxy, set the proxy's own
(nginx ``client_header_timeout``) as well: see docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import unquote_plus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from latency_service.core.config import Settings

log = logging.getLogger(__name__)

QUERY_PARAM = re.compile(r"([?&;])([^=&;\s?]*)=([^&;\s]*)")
SECRET_NAME_PARTS = ("token", "key", "auth", "secret", "pass", "bearer")
"""A query parameter whose name, percent-decoded and lower-cased, contains one of these is a secret."""


def redact_query(text: str) -> str:
    """``text`` (a request line, a URL) with the value of every secret-looking query parameter
    replaced by ``***``: by pattern, not a list of names, since clients spell tokens every way
    (``api_token``, ``apitoken``, ``api-key``, ``auth``, ``?tok%65n=``)."""

    def one(m: re.Match[str]) -> str:
        name = unquote_plus(m.group(2)).lower()
        secret = any(part in name for part in SECRET_NAME_PARTS)
        return f"{m.group(1)}{m.group(2)}={'***' if secret else m.group(3)}"

    return QUERY_PARAM.sub(one, text) if "=" in text else text


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is late."""

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    # ------------------------------------------------------------ the body's deadline
    body_timeout_s: float = 60.0
    _body_timer: asyncio.TimerHandle | None = None

    def handle_events(self) -> None:
        """uvicorn's, then: a request whose head is in and whose body is not gets
        ``body_timeout_s`` for all of it (a complete head with ``Content-Length: 100000`` and no
        body, or a body at 1 byte/s, held a connection for ever); the timer stops when the body
        is complete."""
        super().handle_events()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:
            if getattr(self, "_body_timer", None) is None:
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_late)
        else:
            self._cancel_body_timer()

    def _cancel_body_timer(self) -> None:
        timer = getattr(self, "_body_timer", None)
        if timer is not None:
            timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        log.info("closing a connection from %s: request body not complete within %.0f s",
                 f"{self.client[0]}:{self.client[1]}" if self.client else "?", self.body_timeout_s)
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        """Fired ``head_timeout_s`` after the connection opened or its last response: close it if
        the client has still not sent a whole request head (h11 waits in IDLE until it has)."""
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered (pipelined heads are read after it)
        log.info("closing a connection from %s: no complete request head within %.0f s",
                 f"{self.client[0]}:{self.client[1]}" if self.client else "?", self.head_timeout_s)
        self.transport.close()


class RedactQueryTokens(logging.Filter):
    """Tokens sent in a query string are never written to the access log: :func:`redact_query`
    on the record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


POLL_LINE = re.compile(r'"GET /jobs/[^/ ?]+(?:\?[^ ]*)? HTTP/[\d.]+" 200')


class QuietPolling(logging.Filter):
    """A client waiting for a job polls ``GET /jobs/{id}`` every half second: those answered 200
    are access-log lines only at DEBUG, so the service log shows what happened, not who waited."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("uvicorn.access").isEnabledFor(logging.DEBUG):
            return True
        return not POLL_LINE.search(record.getMessage())


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryTokens) for f in logger.filters):
            logger.addFilter(RedactQueryTokens())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietPolling) for f in access.filters):
        access.addFilter(QuietPolling())


def run(app: Any, settings: Settings, host: str, port: int) -> None:
    """uvicorn on ``host:port``. SIGTERM: half the grace for open requests, half for the worker
    (Host.close), so a container stops inside Docker's 10 s with the key in flight rolled back."""
    import uvicorn

    protocol = type("GasH11Protocol", (HeadTimeoutH11,), {"head_timeout_s": settings.header_timeout_s,
                                                          "body_timeout_s": settings.body_timeout_s})
    # X-Forwarded-For names the client only from configured proxies: uvicorn trusts 127.0.0.1 by
    # default, so any local process could pose as any number of clients (docs/security.md)
    config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(), http=protocol,
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s / 2)),
                            timeout_keep_alive=30, proxy_headers=settings.forwarded_allow_ips is not None,
                            forwarded_allow_ips=settings.forwarded_allow_ips or "")
    server = uvicorn.Server(config)
    install_log_redaction()  # after Config has set up uvicorn's loggers
    server.run()
