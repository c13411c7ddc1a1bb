"""What a newcomer hit (docs/contributing.md): a URL without a scheme, a port in use, and a log
flooded by job polling — each answered in one line, at once."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from typer.testing import CliRunner


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost", "ftp://x:1", "http://"])
def test_a_malformed_latency_url_fails_at_once(url: str) -> None:
    from search_client.client import LatencyClient, ServiceError

    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="expected http://HOST:PORT"):
        LatencyClient(url)
    assert time.monotonic() - t0 < 1  # not four retries of a connection error


def test_a_port_in_use_is_the_first_line_before_any_database_work(tmp_path) -> None:
    from latency_service.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = tmp_path / "never.db"
        r = CliRunner().invoke(app, ["serve", "--port", str(port), "--database-url", f"sqlite:///{db}"])
    assert r.exit_code == 2 and r.output.splitlines()[0].startswith("error: --host 127.0.0.1 --port")
    assert "cannot listen" in r.output and not db.exists()  # nothing migrated


def test_job_polling_is_not_an_info_line() -> None:
    from latency_service.server import QuietPolling

    def record(method: str, path: str, status: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", method, path, "1.1", status), None)

    f = QuietPolling()
    assert not f.filter(record("GET", "/jobs/6abcc81c-bdfd-441e", 200))
    assert f.filter(record("GET", "/jobs/6abcc81c-bdfd-441e", 404))  # a problem stays visible
    assert f.filter(record("POST", "/profile", 202)) and f.filter(record("GET", "/jobs", 200))
