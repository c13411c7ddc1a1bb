"""FastAPI dependencies: the host service, a DB session per request, and the bearer token."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from latency_service.service import Host


async def get_host(request: Request) -> Host:
    # async (no I/O): a sync dependency costs a thread-pool hop per request
    return request.app.state.host


HostDep = Annotated[Host, Depends(get_host)]


async def get_session(host: HostDep) -> AsyncIterator[Session]:
    """A session per request, opened and closed on the event loop. A sync generator here ran its
    exit on a worker thread: under 64 concurrent requests every worker thread waited for a pooled
    connection that only a finished request's exit, itself waiting for a thread, would return
    (/health took 30 s, the pool's timeout). Creating a session takes no connection; closing one
    hands it back at once, without a thread."""
    session = host.sessions()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False)


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check_bearer(creds: HTTPAuthorizationCredentials | None, accepted: list[str], name: str) -> None:
    """No token: 401 (authenticate); a token that is none of ``accepted``: 403 (not allowed).
    Constant-time comparison; the token itself is never logged or echoed."""
    if creds is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"this route needs 'Authorization: Bearer <{name}>'",
                            headers={"WWW-Authenticate": "Bearer"})
    given = creds.credentials.encode()
    if not any(hmac.compare_digest(given, t.encode()) for t in accepted):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong bearer token")


async def require_token(host: HostDep, creds: Credentials) -> None:
    """Mutating routes need ``Authorization: Bearer <GAS_API_TOKEN>`` when the token is set."""
    if host.settings.api_token is not None:
        _check_bearer(creds, [host.settings.api_token], "GAS_API_TOKEN")


async def require_read(host: HostDep, creds: Credentials) -> None:
    """Read routes are open unless ``GAS_READ_TOKEN`` is set; then they take it or the write token."""
    tokens = host.settings.read_tokens()
    if tokens is not None:
        _check_bearer(creds, tokens, "GAS_READ_TOKEN")


CLIENT_MAX_LEN = 64
"""The job table's client column: an address (IPv6 at most 45 characters) and a token's hash."""


async def client_of(request: Request, host: HostDep, creds: Credentials) -> str:
    """Who is asking, for per-client bounds: the peer address (the proxy's X-Forwarded-For only
    from GAS_FORWARDED_ALLOW_IPS, which uvicorn applies), plus the bearer token's hash when it is
    one of this service's tokens. A token the service does not know names nobody, so made-up
    tokens cannot mint new clients; and clients sharing one configured token stay apart by
    address. Never the token itself."""
    addr = "addr:" + (request.client.host if request.client else "unknown")
    accepted = [t for t in (host.settings.api_token, *(host.settings.read_tokens() or [])) if t is not None]
    if creds is not None and any(hmac.compare_digest(creds.credentials.encode(), t.encode()) for t in accepted):
        addr += "|token:" + hashlib.sha256(creds.credentials.encode()).hexdigest()[:8]
    return addr[:CLIENT_MAX_LEN]


ClientDep = Annotated[str, Depends(client_of)]
TokenDep = Depends(require_token)
ReadDep = Depends(require_read)
READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "GAS_READ_TOKEN is set and the request has no bearer token"},
    403: {"description": "the bearer token is neither GAS_READ_TOKEN nor GAS_API_TOKEN"},
}
TOKEN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "GAS_API_TOKEN is set and the request has no bearer token"},
    403: {"description": "the bearer token is wrong"},
}
