"""Table imports, decoded, checked and stored in a child process.

A table file is tens of MiB of JSON, and Python's decoders (``json``, pydantic-core) hold the
interpreter lock while they run: decoded in the service's process, a 46 MiB file held every
other request, ``/health`` included, for 1.2–2.5 s (measured on a 2-core EPYC), whether on the
event loop or on a thread. ``POST /table/import`` therefore hands the raw bytes to
:func:`import_file` in a worker process (``anyio.to_process``), which decodes them, checks every
row, merges them in its own database transaction and returns an :class:`ImportOutcome` of a few
hundred bytes. The checks are those of an untrusted file (docs/security.md): raw samples
required, statistics recomputed, nothing dated in the future, canonical keys, a fingerprint that
is its info's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from gas_core.ops import check_key
from gas_core.quality import QualityPolicy, sample_stats
from gas_core.table import LatencyTable, environment_fingerprint
from latency_service import crud, db
from latency_service.models import as_utc

FUTURE_SLACK = timedelta(minutes=5)
"""Clock skew tolerated between the exporting host and this one."""
STAT_RTOL = 1e-4
"""Relative slack between a file's statistics and those recomputed from its samples: the samples
travel as float32 (a stored row's median came from the float64 samples)."""
_ENGINES: dict[str, Engine] = {}


@dataclass
class ImportOutcome:
    """What the route answers: 200 with the counts, or the error's status, message and fields."""

    status: int
    message: str = ""
    detail: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    environment: str = ""


def checked_import(table: LatencyTable) -> tuple[list[str], LatencyTable]:
    """Every row needs its raw samples, its statistics are recomputed from them (a median that
    disagrees is refused, the others replaced), no row may be dated in the future (a date of 9999
    would make it the newest table for ever), its key must be canonical and known, and the
    fingerprint must be its info's. Returns the problems, each naming its field, and the table
    with recomputed statistics."""
    problems: list[str] = []
    now = datetime.now(UTC)
    entries = []
    for i, e in enumerate(table.entries):
        if e.samples_us is None:
            problems.append(f"entries[{i}]: no samples_us; export with samples (gas-table export does)")
            continue
        if len(e.samples_us) != e.n_samples:
            problems.append(f"entries[{i}]: {len(e.samples_us)} samples_us but n_samples={e.n_samples}")
            continue
        stats = sample_stats(e.samples_us)
        if abs(stats["median_us"] - e.median_us) > STAT_RTOL * max(1.0, stats["median_us"]):
            problems.append(f"entries[{i}].median_us: {e.median_us} is not the median of its samples_us "
                            f"({stats['median_us']:.6g})")
        if as_utc(e.created_at) > now + FUTURE_SLACK:
            problems.append(f"entries[{i}].created_at: {e.created_at.isoformat()} is in the future (now "
                            f"{now.isoformat(timespec='seconds')})")
        try:
            check_key(e.latency_key())
        except ValueError as err:
            problems.append(f"entries[{i}]: {err}")
        entries.append(e.model_copy(update=stats))
    if environment_fingerprint(table.environment.info) != table.environment.fingerprint:
        problems.append(f"environment: fingerprint {table.environment.fingerprint} is not that of its info "
                        f"({environment_fingerprint(table.environment.info)}); was the file edited?")
    return problems, table.model_copy(update={"entries": entries})


def import_file(body: bytes, database_url: str, force: bool, policy: QualityPolicy) -> ImportOutcome:
    """Decode, check and merge one table file (run in a worker process: see the module)."""
    from latency_service.api.errors import summarise_validation

    try:  # Python's decoder, as FastAPI's: pydantic-core's stops at 200 levels, before the model's own bound
        table = LatencyTable.model_validate(json.loads(body))
    except json.JSONDecodeError as err:
        return ImportOutcome(400, f"body: not valid JSON ({err.msg}, at character {err.pos})")
    except RecursionError:
        return ImportOutcome(400, "body: nested too deeply to decode")
    except ValidationError as err:
        status, message, detail = summarise_validation(err.errors(), prefix=("body",))
        return ImportOutcome(status, message, [d.model_dump(mode="json") for d in detail])
    problems, table = checked_import(table)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        return ImportOutcome(422, "; ".join(problems[:5]) + more)
    engine = _ENGINES.get(database_url) or _ENGINES.setdefault(database_url, db.make_engine(database_url))
    with db.session_factory(engine)() as session:
        try:
            counts = crud.import_table(session, table=table, force=force, policy=policy)
        except crud.ImportConflict as err:
            session.rollback()
            return ImportOutcome(409, str(err))
        except IntegrityError:
            session.rollback()
            return ImportOutcome(409, "a concurrent write to the same table (a profiling job); retry the import")
    return ImportOutcome(200, counts=counts, device=table.device.slug, environment=table.environment.fingerprint)
