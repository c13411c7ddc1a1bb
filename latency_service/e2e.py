"""End-to-end measurement: time a derived network on this host's device, predict it from this
host's table, say whether the two agree beyond their uncertainty, and store the measurement."""

from __future__ import annotations

import hashlib
import json

import torch
from sqlalchemy.orm import Session, sessionmaker

from gas_core.genotype import Genotype
from gas_core.keys import MAX_US
from gas_core.latency import MissingLatencyKeys, predict_latency_us
from gas_core.network import GASNet
from gas_core.quality import HostCheck, ReferencePoint, agreement, judge_host, median_se, predict_with_uncertainty
from gas_core.search_space import cell_shapes
from gas_core.wire import MeasurePublic, MeasureRequest
from latency_service import crud
from latency_service.device import host_load
from latency_service.host import HostSpec
from latency_service.models import utcnow
from latency_service.profiler import Method, time_network, time_reference


def measure(spec: HostSpec, sessions: sessionmaker[Session], req: MeasureRequest) -> MeasurePublic:
    """Time the derived network end to end and predict it from this host's table. Runs on the
    calling thread: the device worker's (in the service's worker process when it has one)."""
    genotype: Genotype = req.genotype
    if req.num_classes is not None:
        genotype = genotype.model_copy(
            update={"layout": genotype.layout.model_copy(update={"num_classes": req.num_classes})}
        )
    net = GASNet(genotype)
    st = spec.settings
    method = Method(warmup_runs=st.e2e_warmup_runs, warmup_ms=st.warmup_ms, samples=st.e2e_samples,
                    min_sample_ms=st.min_sample_ms, max_iters_per_sample=st.max_iters_per_sample)
    shapes = cell_shapes(genotype.layout, req.input_size, req.batch, req.dtype, req.memory_format, req.runtime)
    with sessions() as s:
        rows = crud.row_stats(s, device_id=spec.device_id, environment_id=spec.environment_id)
        noise = crud.latest_host_noise(s, device_id=spec.device_id, environment_id=spec.environment_id)
        quiet = crud.get_calibration(s, environment_id=spec.environment_id)
    # a row beyond the bound (stored before imports were bounded) counts as missing: a sum of
    # 1e308s overflows, and no prediction rests on such a row
    rows = {k: r for k, r in rows.items() if 0 <= r.median_us <= MAX_US}
    predicted: float | None
    missing: list[str] = []
    try:
        predicted = predict_latency_us(genotype, shapes, {k: r.median_us for k, r in rows.items()})
    except MissingLatencyKeys as err:
        predicted, missing = None, [k.canonical for k in err.missing]
    # right before the network: the other processes' load, and the reference workload against
    # while the table was timed and against the host's quiet calibration
    load = host_load() if st.busy_check else None
    now = (ReferencePoint.from_bursts(done=0, at=utcnow(),
                                      burst_medians_us=[b.median_us for b in time_reference(spec.torch_device)])
           if (predicted is not None and noise) or load is not None else None)
    check: HostCheck | None = None
    if now is not None and (load is not None or quiet is not None):
        threads = torch.get_num_threads() if spec.torch_device.type == "cpu" else 1
        check = judge_host(now, load, quiet, threads, st.busy(), action_if_busy="measured anyway")
    timing = time_network(net, req.input_size, req.batch, req.dtype, req.memory_format, spec.torch_device, method,
                          req.runtime)
    summ = timing.summary()
    median = float(summ["median_us"])
    agree = None
    if noise is not None:  # judged by this service's settings, not those the job was stored with
        noise = noise.model_copy(update={"threshold_pct": st.reference_drift_pct, "min_z": st.reference_drift_z})
    shift = None if noise is None or now is None else noise.shift_from_job(now)
    if predicted is not None:
        agree = agreement(
            predict_with_uncertainty(genotype, shapes, rows), median, median_se(timing.samples_us),
            measured_spread=(float(summ["p90_us"]) - float(summ["p10_us"])) / median if median > 0 else None,
            host_drift_pct=None if shift is None else shift.pct,
            host_drift_beyond=shift is not None and noise is not None and noise.beyond(shift), host=check,
        )
    with sessions() as s:
        crud.add_e2e(
            s, device_id=spec.device_id, environment_id=spec.environment_id,
            genotype=json.loads(genotype.model_dump_json()),
            genotype_hash=hashlib.sha256(genotype.model_dump_json().encode()).hexdigest(),
            input_h=req.input_size[0], input_w=req.input_size[1], batch=req.batch, dtype=req.dtype,
            memory_format=req.memory_format, runtime=req.runtime, median_us=median, p90_us=summ["p90_us"],
            mean_us=summ["mean_us"],
            std_us=summ["std_us"], n_samples=summ["n_samples"], iters_per_sample=summ["iters_per_sample"],
            fps=req.batch * 1e6 / median, predicted_us=predicted, samples=timing.samples_us,
        )
    return MeasurePublic(
        device=spec.device.slug, environment=spec.env.fingerprint, input_size=req.input_size, batch=req.batch,
        dtype=req.dtype, memory_format=req.memory_format, runtime=req.runtime, median_ms=median / 1e3,
        p10_ms=float(summ["p10_us"]) / 1e3, p90_ms=float(summ["p90_us"]) / 1e3, mean_ms=float(summ["mean_us"]) / 1e3,
        std_ms=float(summ["std_us"]) / 1e3, n_samples=int(summ["n_samples"]), fps=req.batch * 1e6 / median,
        predicted_ms=None if predicted is None else predicted / 1e3, missing_keys=missing,
        error_pct=None if predicted is None else (predicted - median) / median * 100, agreement=agree,
        host_check=check,
    )
