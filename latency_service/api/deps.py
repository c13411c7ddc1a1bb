"""FastAPI dependencies: the host service, a DB session per request, and the bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from latency_service.service import Host


def get_host(request: Request) -> Host:
    return request.app.state.host


HostDep = Annotated[Host, Depends(get_host)]


def get_session(host: HostDep) -> Iterator[Session]:
    with host.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False)


def require_token(
    host: HostDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Mutating routes need ``Authorization: Bearer <GAS_API_TOKEN>`` when the token is set: none
    is 401 (authenticate), a wrong one 403 (authenticated, not allowed)."""
    token = host.settings.api_token
    if token is None:
        return
    if creds is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this route needs 'Authorization: Bearer <GAS_API_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong bearer token")


def require_read(
    host: HostDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Read routes are open unless ``GAS_READ_TOKEN`` is set; then they take it, or the write
    token (``GAS_API_TOKEN``): 401 without a token, 403 with another one."""
    read = host.settings.read_token
    if read is None:
        return
    if creds is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this route needs 'Authorization: Bearer <GAS_READ_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
    given = creds.credentials.encode()
    if not any(t is not None and hmac.compare_digest(given, t.encode()) for t in (read, host.settings.api_token)):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong bearer token")


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
