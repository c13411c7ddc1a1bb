"""The load benchmark's baseline: uvicorn, as ``gas-service serve`` runs it, answering one path
with fixed bytes (the table response captured from the service, plain and gzip, same headers).
``python -m bench.static_server --port P --capture DIR`` (DIR holds body, body.gz, media, etag)."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def app_for(capture: Path) -> Starlette:
    body, gz = (capture / "body").read_bytes(), (capture / "body.gz").read_bytes()
    media, etag = (capture / "media").read_text(), (capture / "etag").read_text()
    headers = {"ETag": etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}

    async def table(request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(gz, media_type=media, headers={**headers, "Content-Encoding": "gzip"})
        return Response(body, media_type=media, headers=headers)

    async def health(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    return Starlette(routes=[Route("/table/{device}", table), Route("/health", health)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--capture", type=Path, required=True)
    args = ap.parse_args()
    uvicorn.run(app_for(args.capture), host="127.0.0.1", port=args.port, log_level="info")


if __name__ == "__main__":
    main()
