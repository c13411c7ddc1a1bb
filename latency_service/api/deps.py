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


def require_token(host: HostDep, creds: Credentials) -> None:
    """Mutating routes need ``Authorization: Bearer <GAS_API_TOKEN>`` when the token is set."""
    if host.settings.api_token is not None:
        _check_bearer(creds, [host.settings.api_token], "GAS_API_TOKEN")


def require_read(host: HostDep, creds: Credentials) -> None:
    """Read routes are open unless ``GAS_READ_TOKEN`` is set; then they take it or the write token."""
    st = host.settings
    if st.read_token is not None:
        _check_bearer(creds, [t for t in (st.read_token, st.api_token) if t is not None], "GAS_READ_TOKEN")


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
