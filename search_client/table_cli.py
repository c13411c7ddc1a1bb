"""``gas-table``: look at, compare, export and import latency tables of a GAS latency service.

A table is DEVICE (its newest environment) or DEVICE@ENVIRONMENT (a fingerprint from
``gas-table devices``). Every command talks to the service at --latency-url (or GAS_LATENCY_URL);
``import`` needs GAS_API_TOKEN when the service sets one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from gas_core.keys import RUNTIMES, without_runtime
from gas_core.table import TABLE_KIND, TABLE_SCHEMA_VERSION, LatencyTable, TableEnvironment, compare_tables
from gas_core.wire import ComparePublic, PairComparison, TableRef, split_ref
from search_client.cli_common import fail, latency_client, setup_logging
from search_client.client import LatencyClient, ServiceError
from search_client.report import plot_compare

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__, no_args_is_help=True,
                  rich_markup_mode="markdown")
# Piped or redirected, rich assumes 80 columns and cuts table cells to "…": there, tables get the
# width they need (a terminal keeps its own width and wraps)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 240)

Url = Annotated[str | None, typer.Option("--latency-url", help="service base URL (default GAS_LATENCY_URL)")]
Token = Annotated[str | None, typer.Option(
    "--token", help="bearer token for a service that sets GAS_API_TOKEN or GAS_READ_TOKEN (default: GAS_API_TOKEN "
    "from the environment; prefer the variable, a flag shows in the process list)")]
DtypeOpt = Annotated[str | None, typer.Option(help="only rows of this dtype")]
BatchOpt = Annotated[int | None, typer.Option(help="only rows of this batch", min=1)]
FormatOpt = Annotated[str | None, typer.Option("--memory-format", help="only rows of this memory format")]
OpOpt = Annotated[str | None, typer.Option(help="only rows of this op")]
RuntimeOpt = Annotated[str | None, typer.Option(
    help=f"only rows of this runtime: {', '.join(RUNTIMES)} (GET /device lists a host's)")]


def _client(url: str | None, token: str | None) -> LatencyClient:
    return latency_client("gas-table", url, token)


def _ref(ref: str) -> tuple[str, str | None]:
    try:
        return split_ref(ref)
    except ValueError as exc:
        fail("gas-table", str(exc), 2)


def _runtime(name: str | None, flag: str = "--runtime") -> str | None:
    if name is not None and name not in RUNTIMES:
        fail("gas-table", f"{flag} {name!r}: must be one of {', '.join(RUNTIMES)}", 2)
    return name


def _us(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log HTTP retries")] = False) -> None:
    setup_logging(verbose, fmt="%(levelname)s %(name)s: %(message)s")


@app.command()
def devices(latency_url: Url = None, token: Token = None) -> None:
    """Every device in the service's database, with its environments and their row counts."""
    with _client(latency_url, token) as c:
        try:
            result = c.devices()
        except ServiceError as exc:
            fail("gas-table", str(exc), 1)
    t = Table(title="devices")
    for col in ("device", "kind", "environment", "rows"):
        t.add_column(col, justify="right" if col == "rows" else "left", no_wrap=True)
    t.add_column("name", overflow="fold")
    t.add_column("environment info", overflow="fold")
    for d in result.devices:
        envs: list[TableEnvironment | None] = list(d.environments) or [None]
        for i, e in enumerate(envs):
            info = "" if e is None else ", ".join(f"{k}={v}" for k, v in sorted(e.info.items()))
            t.add_row(d.slug if i == 0 else "", d.kind if i == 0 else "", "—" if e is None else e.fingerprint,
                      "0" if e is None else str(e.entries or 0), d.name if i == 0 else "", info)
    out.print(t)


@app.command()
def show(
    table: Annotated[str, typer.Argument(help="DEVICE or DEVICE@ENVIRONMENT")],
    latency_url: Url = None, token: Token = None, dtype: DtypeOpt = None, batch: BatchOpt = None,
    memory_format: FormatOpt = None,
    op: OpOpt = None,
    runtime: RuntimeOpt = None,
    sort: Annotated[Literal["key", "median", "op"], typer.Option(help="row order")] = "key",
    limit: Annotated[int | None, typer.Option(help="print at most this many rows", min=1)] = None,
) -> None:
    """A table's rows: median, p10, p90 (µs), sample count and verdict per key, filtered as GET /table.
    A flagged row (⚑) was stored although unstable; its reasons are listed under the table."""
    slug, env = _ref(table)
    _runtime(runtime)
    with _client(latency_url, token) as c:
        try:
            t = c.table(slug, dtype=dtype, batch=batch, memory_format=memory_format, environment=env, op=op,
                        runtime=runtime)
        except ServiceError as exc:
            fail("gas-table", str(exc), 1)
    rows = t.entries
    order = {"key": lambda e: e.key, "median": lambda e: -e.median_us, "op": lambda e: (e.op, e.key)}[sort]
    rows = sorted(rows, key=order)[:limit]
    uniform = {(e.batch, e.dtype, e.memory_format, e.runtime) for e in rows}
    per_row = len(uniform) > 1
    shown = f", first {len(rows)}" if limit and len(rows) < len(t.entries) else ""
    title = f"{t.device.slug}@{t.environment.fingerprint} — {len(t.entries)} rows{shown}"
    if not per_row and rows:
        b, dt, mf, rtm = uniform.pop()
        title += f" (batch {b}, {dt}, {mf}, {rtm})"
    rt = Table(title=title)
    rt.add_column("op", no_wrap=True)
    cols = ["c_in→c_out", "h×w", "s", "n", *(["b", "dtype", "format", "runtime"] if per_row else []), "median µs", "p10 µs",
            "p90 µs", "samples", "flag"]
    for col in cols:
        rt.add_column(col, justify="left" if col in ("dtype", "format", "runtime") else "right", no_wrap=True)
    for e in rows:
        rt.add_row(e.op, f"{e.c_in}→{e.c_out}", f"{e.h}×{e.w}", str(e.stride), str(e.n_inputs),
                   *([str(e.batch), e.dtype, e.memory_format, e.runtime] if per_row else []), _us(e.median_us), _us(e.p10_us),
                   _us(e.p90_us), str(e.n_samples), "⚑" if e.flagged else "")
    out.print(rt)
    flagged = [e for e in t.entries if e.flagged]
    if flagged:
        out.print(f"[bold yellow]{len(flagged)} of {len(t.entries)} rows flagged[/] (unstable when timed; "
                  "predictions that use them are unreliable; re-profile with force on a quiet host):")
        for e in flagged[:20]:
            reasons = "; ".join(e.quality.reasons) if e.quality else "flagged"
            out.print(f"  ⚑ {e.key}: {reasons}", highlight=False, markup=False)
        if len(flagged) > 20:
            out.print(f"  … and {len(flagged) - 20} more", highlight=False)
    out.print(f"environment: {', '.join(f'{k}={v}' for k, v in sorted(t.environment.info.items()))}", highlight=False)


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="reference table: DEVICE or DEVICE@ENVIRONMENT")],
    b: Annotated[str, typer.Argument(help="compared table; ratios are B / A")],
    latency_url: Url = None, token: Token = None, dtype: DtypeOpt = None, batch: BatchOpt = None,
    memory_format: FormatOpt = None,
    op: OpOpt = None,
    runtime: RuntimeOpt = None,
    runtime_b: Annotated[str | None, typer.Option(
        help="compare runtimes: A's rows under --runtime (default eager), B's under this one, matched by every "
        "other part of the key; A and B may then be the same table (eager against onnxruntime on one CPU)")] = None,
    plot: Annotated[Path, typer.Option(help="PNG: per-op ratio bars and a log–log scatter of A against B")] = Path(
        "compare.png"),
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the full comparison as JSON")] = None,
) -> None:
    """Compare two tables over the keys both hold: geometric-mean ratio B / A, Spearman and Kendall
    rank correlation of the latencies (does the ranking of ops hold?), and a per-op summary."""
    for ref in (a, b):
        _ref(ref)
    _runtime(runtime)
    _runtime(runtime_b, "--runtime-b")
    filters: dict[str, Any] = {"dtype": dtype, "batch": batch, "memory_format": memory_format, "op": op}
    with _client(latency_url, token) as c:
        try:
            if runtime_b is None:
                result = c.compare([a, b], **filters, runtime=runtime)
            else:
                result = compare_runtimes(c, (a, runtime or "eager"), (b, runtime_b), filters)
        except ServiceError as exc:
            fail("gas-table", str(exc), 1)
    pair = result.pairs[0]
    name_a, name_b = (f"{r.device}@{r.environment}" + (f" ({r.runtime})" if r.runtime else "") for r in (pair.a, pair.b))
    out.print(f"[bold]A[/bold] {name_a} ({pair.a.entries} rows)   [bold]B[/bold] {name_b} ({pair.b.entries} rows)",
              highlight=False)
    out.print(f"common keys {pair.common_keys}, only in A {pair.only_a}, only in B {pair.only_b}", highlight=False)
    rho = "—" if pair.spearman is None else f"{pair.spearman:.3f}"
    tau = "—" if pair.kendall is None else f"{pair.kendall:.3f}"
    out.print(f"geomean ratio B/A {_ratio(pair.geomean_ratio)}   Spearman ρ {rho}   Kendall τ {tau}", highlight=False)
    t = Table(title="per op (B / A)")
    for col in ("op", "keys", "geomean", "min", "max"):
        t.add_column(col, justify="left" if col == "op" else "right")
    for name, s in pair.per_op.items():
        t.add_row(name, str(s.keys), _ratio(s.geomean_ratio), _ratio(s.min_ratio), _ratio(s.max_ratio))
    out.print(t)
    if pair.common_keys:
        plot_compare(pair, name_a, name_b, plot)
        out.print(f"plot: {plot}", highlight=False)
    elif pair.a.entries and pair.b.entries:
        with _client(latency_url, token) as c:
            held = [_what_it_holds(c, ref, filters, runtime) for ref in (a, b)]
        out.print(f"no key is in both tables, so there is nothing to compare (and no plot): A holds {held[0]}; B "
                  f"holds {held[1]}. A key is an op at one exact shape: tables profiled at other input sizes, "
                  "batches, dtypes or memory formats share none; profile one at the other's (gas-service profile "
                  "--input-size H W …) or narrow both with --dtype/--batch/--memory-format.", highlight=False)
    if json_out is not None:
        json_out.write_text(result.model_dump_json(indent=2))
        out.print(f"json: {json_out}", highlight=False)


def _what_it_holds(c: LatencyClient, ref: str, filters: dict, runtime: str | None) -> str:
    """A table's deployments in words: dtype, batch, memory format, runtime, and its largest key
    side (the network input for the stem), e.g. ``float32 b1 contiguous eager up to 769×1537``."""
    slug, env = split_ref(ref)
    t = c.table(slug, environment=env, runtime=runtime, **filters)
    kinds: dict[tuple[str, int, str, str], tuple[int, int]] = {}
    for e in t.entries:
        k = (e.dtype, e.batch, e.memory_format, e.runtime)
        h, w = kinds.get(k, (0, 0))
        kinds[k] = (max(h, e.h), max(w, e.w))
    return "; ".join(f"{d} b{b} {m} {r} up to {h}×{w}" for (d, b, m, r), (h, w) in sorted(kinds.items())) or "no rows"


def compare_runtimes(c: LatencyClient, a: tuple[str, str], b: tuple[str, str], filters: dict) -> ComparePublic:
    """Two tables (or one) under two runtimes, key by key: each row matched by its key without
    the runtime part, so a ratio is what the runtime changes at that exact shape."""
    refs, maps = [], []
    for ref, runtime in (a, b):
        slug, env = split_ref(ref)
        t = c.table(slug, environment=env, runtime=runtime, **filters)
        refs.append(TableRef(device=t.device.slug, environment=t.environment.fingerprint, entries=len(t.entries),
                             runtime=runtime))
        maps.append({without_runtime(e.key): (e.op, e.median_us) for e in t.entries})
    pair = PairComparison(a=refs[0], b=refs[1], **compare_tables(maps[0], maps[1]).model_dump())
    return ComparePublic(tables=refs, pairs=[pair])


@app.command()
def export(
    table: Annotated[str, typer.Argument(help="DEVICE or DEVICE@ENVIRONMENT")],
    format: Annotated[Literal["json", "csv"], typer.Option(
        help="json: the versioned artefact (identity, method, every raw sample) that `import` reads; "
             "csv: one flat row per key")] = "json",
    output: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default DEVICE-ENV.FORMAT)")] = None,
    latency_url: Url = None, token: Token = None, dtype: DtypeOpt = None, batch: BatchOpt = None,
    memory_format: FormatOpt = None,
    op: OpOpt = None,
    runtime: RuntimeOpt = None,
) -> None:
    """Write a table to a file."""
    slug, env = _ref(table)
    _runtime(runtime)
    with _client(latency_url, token) as c:
        try:
            if format == "json":
                t = c.table(slug, dtype=dtype, batch=batch, memory_format=memory_format, environment=env, op=op,
                            runtime=runtime, samples=True)
                path = output or Path(f"{t.device.slug}-{t.environment.fingerprint}.json")
                body, rows = t.model_dump_json(indent=1).encode(), len(t.entries)
            else:
                body = c.table_csv(slug, dtype=dtype, batch=batch, memory_format=memory_format, environment=env, op=op,
                                   runtime=runtime)
                path = output or Path(f"{slug}{'-' + env if env else ''}.csv")
                rows = max(0, body.count(b"\n") - 1)
        except ServiceError as exc:
            fail("gas-table", str(exc), 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(body)
    tmp.replace(path)
    out.print(f"wrote {rows} rows to {path}", highlight=False)


def read_table_file(path: Path) -> LatencyTable:
    """Parse an export; ``ValueError`` with a message a user can act on."""
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (a JSON export is); `gas-table import` reads the JSON written "
                         "by `gas-table export --format json`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg} at line {e.lineno}); `gas-table import` reads the JSON "
                         "written by `gas-table export --format json`") from None
    if not isinstance(raw, dict) or raw.get("kind") != TABLE_KIND:
        raise ValueError(f"{path} is not a GAS latency table export (kind must be {TABLE_KIND!r})")
    if raw.get("schema_version") != TABLE_SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {raw.get('schema_version')!r}; this gas-table reads version "
                         f"{TABLE_SCHEMA_VERSION}")
    try:
        return LatencyTable.model_validate(raw)
    except ValidationError as e:
        first = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:3])
        raise ValueError(f"{path} is not a valid table export ({e.error_count()} problems): {first}") from None


@app.command(name="import")
def import_(
    file: Annotated[Path, typer.Argument(help="a JSON export (gas-table export --format json)")],
    force: Annotated[bool, typer.Option(help="let the file's rows replace stored rows even when these are newer")] = (
        False),
    latency_url: Url = None, token: Token = None,
) -> None:
    """Merge an exported table into the service's database (device and environment are created if
    new). A stored row is replaced only by a newer one unless --force; re-importing a file changes
    nothing. Prints how many rows were added, replaced, kept (stored newer) and skipped (identical)."""
    try:
        table = read_table_file(file)
    except ValueError as exc:
        fail("gas-table", str(exc), 2)
    with _client(latency_url, token) as c:
        try:
            r = c.import_table(table, force=force)
        except ServiceError as exc:
            fail("gas-table", str(exc), 1)
    made = [w for w, flag in (("device", r.created_device), ("environment", r.created_environment)) if flag]
    out.print(f"{r.device}@{r.environment}: {r.added} added, {r.replaced} replaced, {r.kept} kept, {r.skipped} skipped"
              + (f" (new {' and '.join(made)})" if made else ""), highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
