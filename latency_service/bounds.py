"""What one request may cost, checked before anything is planned or stored: every key within
the width, batch, side and element bounds, a layout bounded before it is expanded, the keys per
job, the jobs per client and the keys queued per device, and a network to measure bounded
before it is built. Each refusal names the field or the setting (README, "Security notes")."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from gas_core.keys import LatencyKey, key_pixels
from gas_core.ops import check_key
from gas_core.runtimes import check_runtime
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.wire import MeasureRequest, ProfileRequest
from latency_service import job_state
from latency_service.core.config import Settings

PLAN_BYTES_PER_KEY = 1400
"""Memory a planned key holds in the plan cache (the parsed key, its canonical string in the
request hash's list): about 28 MB for a 19,836-key body in the probe that found the leak."""


class RequestError(ValueError):
    """Bad input; the message names the field. The API maps it to 422, the CLI to exit 2."""


class Overloaded(RuntimeError):
    """A bound on queued work was reached: the API answers ``status`` with ``Retry-After``."""

    def __init__(self, message: str, status: int, retry_after_s: int) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


def check_key_bounds(s: Settings, key: LatencyKey, where: str) -> None:
    """``key`` is one a GAS network runs and within every width, batch, side and element bound."""
    try:
        check_key(key)
    except ValueError as err:
        raise RequestError(f"{where}: {err}") from None
    for name in ("c_in", "c_out"):
        if getattr(key, name) > s.max_channels:
            raise RequestError(f"{where}.{name}: {getattr(key, name)} exceeds the bound {s.max_channels}")
    if key.batch > s.max_batch:
        raise RequestError(f"{where}.batch: {key.batch} exceeds the bound {s.max_batch}")
    if max(key.h, key.w) > s.max_side:
        raise RequestError(f"{where}.h/w: {key.h}×{key.w} exceeds the bound {s.max_side} per side")
    if key_pixels(key) > s.max_elements:
        raise RequestError(f"{where}: activation of {key_pixels(key)} elements exceeds {s.max_elements}")


def expand(settings: Settings, req: ProfileRequest, device_type: str = "cpu") -> list[LatencyKey]:
    """The request's keys, deduplicated, in order, each checked against the bounds. A layout
    request is deduplicated and bounded *before* it is expanded: its size is known from one
    configuration's keys times the distinct batches, dtypes and memory formats, so a small
    body that asks for millions of keys costs nothing."""
    if req.keys is not None:
        if len(req.keys) > settings.max_keys_per_job:
            raise RequestError(f"keys: {len(req.keys)} exceed the bound "
                               f"GAS_MAX_KEYS_PER_JOB={settings.max_keys_per_job}")
        keys = list(dict.fromkeys(req.keys))
        for i, k in enumerate(keys):
            check_key_bounds(settings, k, f"keys[{i}]")
    else:
        assert req.layout is not None and req.input_size is not None
        keys = _expand_layout(settings, req.layout, req.input_size, req)
    if len(keys) > settings.max_keys_per_job:
        raise RequestError(f"keys: {len(keys)} exceed the bound GAS_MAX_KEYS_PER_JOB={settings.max_keys_per_job}")
    check_runtimes(keys, device_type, "runtimes" if req.keys is None else "keys[{i}].runtime",
                   settings.offered_runtimes())
    return keys


def check_runtimes(keys: list[LatencyKey], device_type: str, where: str, offered: frozenset[str] | None = None) -> None:
    """Every key's runtime can run here at its dtype and memory format; else a refusal naming
    the field (``where``, formatted with the key's index ``i``) and what to install or change."""
    seen: set[tuple[str, str, str]] = set()
    for i, k in enumerate(keys):
        combo = (k.runtime, k.dtype, k.memory_format)
        if combo in seen:
            continue
        seen.add(combo)
        why = check_runtime(k.runtime, device_type, k.dtype, k.memory_format, offered)
        if why is not None:
            raise RequestError(f"{where.format(i=i)}: {why}")


def _expand_layout(st: Settings, layout: NetworkLayout, size: tuple[int, int], req: ProfileRequest) -> list[LatencyKey]:
    h, w = size
    if max(h, w) > st.max_side:
        raise RequestError(f"input_size: {h}×{w} exceeds the bound {st.max_side} per side")
    batches = list(dict.fromkeys(req.batches))
    dtypes = list(dict.fromkeys(req.dtypes))
    formats = list(dict.fromkeys(req.memory_formats))
    runtimes = list(dict.fromkeys(req.runtimes))
    for b in batches:
        if b > st.max_batch:
            raise RequestError(f"batches: {b} exceeds the bound {st.max_batch}")
    try:
        one = cell_shapes(layout, (h, w), max(batches), dtypes[0], formats[0]).all_keys()
    except ValueError as err:  # a key the layout implies fails its own bounds (pydantic's error is one)
        raise RequestError(f"layout: implies a latency key out of bounds ({str(err).splitlines()[0]})") from None
    for k in one:  # channels and the largest activation do not depend on dtype or memory format
        check_key_bounds(st, k, "layout")
    if len(one) * len(batches) * len(dtypes) * len(formats) * len(runtimes) > st.max_keys_per_job:
        raise RequestError(f"layout: {len(one)} keys × {len(batches)} batches × {len(dtypes)} dtypes × "
                           f"{len(formats)} memory formats × {len(runtimes)} runtimes exceed the bound "
                           f"GAS_MAX_KEYS_PER_JOB={st.max_keys_per_job}")
    seen: dict[str, LatencyKey] = {}
    for b in batches:
        for dt in dtypes:
            for mf in formats:
                for rt in runtimes:
                    for k in cell_shapes(layout, (h, w), b, dt, mf, rt).all_keys():
                        seen.setdefault(k.canonical, k)
                    time.sleep(0)  # hand the interpreter lock to the event loop between configurations
    return list(seen.values())


def check_queue(session: Session, st: Settings, *, device_id: int, environment_id: int, client: str | None,
                n_keys: int) -> None:
    """Jobs and queued keys per client (429: one client's share) and keys queued on this device
    (503), each naming its setting."""
    if client is not None:
        held = job_state.active_jobs_of(session, client=client)
        if held >= st.max_jobs_per_client:
            raise Overloaded(f"jobs: this client already has {held} queued or running jobs, the bound "
                             f"GAS_MAX_JOBS_PER_CLIENT={st.max_jobs_per_client}; wait for one to end or cancel "
                             "one (DELETE /jobs/{id})", 429, 30)
        mine = job_state.queued_keys_of(session, client=client)
        if mine + n_keys > st.max_client_keys:
            raise Overloaded(f"keys: this client already has {mine} keys waiting and this request adds {n_keys}, "
                             f"beyond its share GAS_MAX_CLIENT_KEYS={st.max_client_keys}; wait for its jobs to "
                             "drain or cancel one (DELETE /jobs/{id})", 429, 60)
    queued = job_state.queued_keys(session, device_id=device_id, environment_id=environment_id)
    if queued + n_keys > st.max_queued_keys:
        raise Overloaded(f"keys: {queued} keys already wait for this device and this request adds {n_keys}, "
                         f"beyond the bound GAS_MAX_QUEUED_KEYS={st.max_queued_keys}; retry when the queue has "
                         "drained", 503, 60)


def check_measure_bounds(s: Settings, req: MeasureRequest, device_type: str = "cpu") -> None:
    """Every width and the largest activation of the network, before anything is built: the
    keys of ``cell_shapes`` at this input are exactly the components the network runs, so
    each is checked against the channel, side and element bounds (a stem of 8192 channels at
    3584² would otherwise try to allocate tens of GB)."""
    h, w = req.input_size
    if max(h, w) > s.max_side:
        raise RequestError(f"input_size: {h}×{w} exceeds the bound {s.max_side} per side")
    why = check_runtime(req.runtime, device_type, req.dtype, req.memory_format, s.offered_runtimes())
    if why is not None:
        raise RequestError(f"runtime: {why}")
    if req.batch > s.max_batch:
        raise RequestError(f"batch: {req.batch} exceeds the bound {s.max_batch}")
    layout = req.genotype.layout
    if req.num_classes is not None:
        layout = layout.model_copy(update={"num_classes": req.num_classes})
    widths = {"stem_channels": max(layout.stem_channels), "head_channels": layout.head_channels,
              "num_classes": layout.num_classes,
              "init_channels": layout.cell_channels(layout.num_cells - 1) * layout.nodes}
    for name, c in widths.items():
        if c > s.max_channels:
            raise RequestError(f"genotype.layout.{name}: a width of {c} channels exceeds the bound {s.max_channels}")
    for k in cell_shapes(layout, (h, w), req.batch, req.dtype, req.memory_format).all_keys():
        check_key_bounds(s, k, "genotype.layout")
