"""What a newcomer hit (docs/contributing.md): a URL without a scheme, a port in use, and a log
flooded by job polling — each answered in one line, at once."""

from __future__ import annotations

import logging
import socket
import sys
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


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_off_a_terminal_is_a_line_every_tenth_or_few_seconds() -> None:
    """Redirected to a file: no carriage-return frames, at most a line per tenth of the total or
    per ``every_s`` (injected clock), the last state once, and transient bars silent."""
    import io

    from gas_core.progress import LineProgress, progress

    out = io.StringIO()
    clock = _Clock()
    bar = LineProgress(None, 100, "evaluating", "img", 5.0, out, clock)
    with bar:
        for _ in range(100):
            clock.t += 0.01  # one second in all: only the tenths write
            bar.update()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[0].startswith("evaluating: 10/100 (10 %) img") and lines[-1].startswith("evaluating: 100/100 (100 %)")
    out = io.StringIO()
    slow = LineProgress(None, None, "profiling", "key", 5.0, out, clock)
    for _ in range(3):
        clock.t += 6  # no total: a line per every_s
        slow.update()
    slow.close()
    assert len(out.getvalue().splitlines()) == 3
    quiet = io.StringIO()
    assert list(progress(range(5), desc="epoch", transient=True, file=quiet)) == list(range(5))
    assert quiet.getvalue() == ""


def test_compare_says_what_each_table_holds_when_no_key_matches() -> None:
    """gas-table compare of tables profiled at other sizes: it names each one's deployments and
    largest side instead of printing an empty table."""
    from pathlib import Path

    from gas_core.table import LatencyTable
    from search_client.table_cli import _what_it_holds

    h200 = LatencyTable.model_validate_json((Path(__file__).resolve().parents[1] / "bench/results/gpu/table.json")
                                            .read_text())

    class Stub:
        def table(self, slug: str, **kw: object) -> LatencyTable:
            return h200

    held = _what_it_holds(Stub(), "nvidia-h200", {}, None)  # type: ignore[arg-type]
    assert "up to 769×1537" in held or "up to 385×769" in held, held
    assert "float32 b1 contiguous eager" in held


def test_a_two_number_flag_given_one_number_names_its_form(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 37: ``--input-size 64 --epochs 3`` said "'--epochs' is not a valid integer"."""
    import typer

    from gas_core.errors import pair_flag_error, two_number_flags
    from latency_service import cli as service_cli
    from search_client import cli as search_cli

    flags = two_number_flags(typer.main.get_command(search_cli.app))
    assert {"--input-size", "--latency-size", "--synthetic-size"} <= flags
    assert pair_flag_error(["--input-size", "96", "192", "--epochs", "3"], flags) is None
    assert pair_flag_error(["--input-size", "64", "--epochs", "3"], flags) == (
        "--input-size takes two integers, e.g. --input-size 96 192 (got '64 --epochs')")
    assert pair_flag_error(["--synthetic-size", "8"], flags) == (
        "--synthetic-size takes two integers, e.g. --synthetic-size 96 192 (got '8')")
    for main, argv, tool in ((search_cli.main, ["gas-search", "--input-size", "64", "--epochs", "3"], "gas-search"),
                             (service_cli.main, ["gas-service", "profile", "--input-size", "64"], "gas-service")):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"{tool}: error: --input-size takes two integers") and "\n" not in err


def test_wait_until_reads_until_the_state_ends_and_gives_up_at_its_deadline() -> None:
    """The one wait-for-a-job loop (client, service CLI, test harness), on an injected clock."""
    from gas_core.progress import wait_until

    now = [0.0]
    states = iter(["queued", "running", "running", "done"])
    seen: list[str] = []
    end = wait_until(lambda: next(states), lambda s: s == "done", poll_s=2.0, on_read=seen.append,
                     clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert end == "done" and seen == ["queued", "running", "running", "done"] and now[0] == 6.0
    now[0] = 0.0
    with pytest.raises(TimeoutError, match="after 5 s"):
        wait_until(lambda: "running", lambda s: s == "done", timeout_s=5, poll_s=2.0,
                   clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] == 6.0  # read at 0, 2, 4, 6: past the deadline at 6
