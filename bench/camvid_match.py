"""The CamVid study's second round: networks matched on *measured* latency and size.

Three kinds of run, each resumable like the rest of :mod:`bench.camvid_study`:

* ``measure-r2``: one sitting, on a quiet host, that (1) re-profiles the study's keys into a
  second, fresh database (the *sitting table*: the same method, the same hour as the measurement)
  and (2) times every network of the study round-robin, ≥ 10 rounds, through ``POST /measure``
  (:mod:`search_client.interleaved`), beside a probe of uniform random genotypes that sets the
  latency targets. It reports Kendall τ and the median ratio of table against measured for both
  tables, so a table that does not rank the networks is seen before anything is matched on it.
* ``partner-<net>``: the random partner of a searched network: uniform (or, below the reach of
  uniform draws, cheap-tilted) candidates screened on parameters (±10 %) and on the table scaled
  to the host (±10 %), then measured interleaved with the searched network; the first candidate
  in draw order within ±3 % of its measured floor (fastest round: search_client/interleaved.py
  says why not the median) is the partner (gas_core/random_search.py).
* ``search-t<f>-s<seed>``: GAS with ``--target-ms`` at f × the uniform probe's median measured
  latency, converted to the table's scale by the probe's own table/measured ratio.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from bench.camvid_round2 import floor_of
from gas_core.genotype import Genotype, random_genotype
from gas_core.random_search import (
    Candidate,
    count_params,
    first_match,
    screened_draws,
    tilt_for_latency,
    tilted_op_probs,
    within,
)
from latency_service.testing import local_service
from search_client.client import LatencyClient
from search_client.interleaved import InterleavedRun, measure_interleaved, summarise

if TYPE_CHECKING:
    from bench.camvid_study import Study

log = logging.getLogger("camvid-study")
PARTNER_PARAMS_TOL = 0.10
SCREEN_LATENCY_TOL = 0.10
MEASURE_RUN = "measure-r2"
PROBE_SEED = 30_000


def probe_genotypes(st: Study) -> dict[str, Genotype]:
    """The uniform random genotypes whose measured median sets the targets (never trained)."""
    return {f"uniform-u{i}": random_genotype(st.layout, torch.Generator().manual_seed(PROBE_SEED + i))
            for i in range(st.scale.uniform_probe)}


def study_networks(st: Study) -> dict[str, Genotype]:
    """Every network the study has derived or drawn so far, by the run that made it."""
    out: dict[str, Genotype] = {}
    for path in sorted((st.out / "runs").glob("*.json")):
        name = path.stem
        if name.startswith(("search-", "random-", "partner-")) and name != "random-recipe":
            res = st.result(name)
            if res is not None and "genotype" in res:
                out[name] = Genotype.model_validate(res["genotype"])
    return out


def _measurer(c: LatencyClient, size: tuple[int, int]) -> Callable[[Genotype], float]:
    return lambda g: c.measure(g, size, batch=1, dtype="float32", memory_format="contiguous").median_ms


def _progress(total: int) -> Callable[[int, str], None]:
    count = [0]

    def on_call(r: int, name: str) -> None:
        count[0] += 1
        if count[0] % 25 == 1:
            log.info("measuring: round %d, call %d of %d (%s)", r + 1, count[0], total, name)

    return on_call


def run_measure_sitting(st: Study) -> dict:
    """Re-profile the study's keys into a fresh database, then every network interleaved."""
    nets = {**study_networks(st), **probe_genotypes(st)}
    sitting_db = st.work / f"{MEASURE_RUN}-sitting.db"
    sitting_db.unlink(missing_ok=True)  # a fresh table each sitting: a rerun re-profiles
    (st.work / "sitting").mkdir(parents=True, exist_ok=True)
    with local_service(f"sqlite:///{sitting_db.resolve()}", st.work / "sitting",
                       {"GAS_DEVICE": "cpu", **st.scale.service_env}, log=st.work / "sitting-service.log") as url:
        from search_client.cli import fetch_latency_term

        with LatencyClient(url, timeout=600) as c:
            (_, slug), wall = st.timed(f"{MEASURE_RUN}-profile", lambda: fetch_latency_term(
                c, None, st.layout, st.scale.size, 1, "float32", "contiguous", progress=st.progress))
            sitting = c.table(slug, dtype="float32", batch=1, memory_format="contiguous",
                              environment=c.host().environment.fingerprint).lookup()
    pinned = {n: st.table_ms(g) for n, g in nets.items()}
    sitting_ms = {n: st.table_ms(g, sitting) for n, g in nets.items()}
    with st.client() as c:
        run, measure_wall = st.timed(MEASURE_RUN, lambda: measure_interleaved(
            nets, _measurer(c, st.scale.size), st.scale.rounds, pinned, _progress(len(nets) * st.scale.rounds)))
    return {**run.model_dump(mode="json"), **summarise_tables(run, sitting_ms), "sitting_table": sitting,
            "params": {n: count_params(g) for n, g in nets.items()}, "genotypes":
            {n: g.model_dump(mode="json") for n, g in nets.items() if n.startswith("uniform-")},
            "profile_wall_s": wall, "measure_wall_s": measure_wall}


def summarise_tables(run: InterleavedRun, sitting_ms: dict[str, float]) -> dict[str, Any]:
    """Kendall τ and median ratio of each table against measured — the pinned table (the run's
    predictions) and the sitting's — over every network and over the uniform probe alone, for
    the median of rounds and for the floor (fastest round)."""
    from gas_core.table import kendall_tau

    t = run.by_name()
    names = list(t)
    probe = [n for n in names if n.startswith("uniform-")]
    pinned = {n: p for n in names if (p := t[n].predicted_ms) is not None}
    out: dict[str, Any] = {"sitting_table_ms": sitting_ms}
    for label, table in (("pinned", pinned), ("sitting", sitting_ms)):
        for group, members in (("all", names), ("probe", probe)):
            for stat, key in (("", "median_ms"), ("_floor", "floor_ms")):
                pairs = [(table[n], getattr(t[n], key)) for n in members if n in table]
                out[f"tau_{label}_{group}{stat}"] = kendall_tau([p for p, _ in pairs], [m for _, m in pairs])
                out[f"ratio_{label}_{group}{stat}"] = statistics.median(p / m for p, m in pairs) if pairs else None
    return out


def reanalyse(res: dict) -> dict:
    """A stored measuring sitting's summaries recomputed from its rounds (no timing): floors,
    split halves, and τ and ratios for both statistics, for runs stored before they existed."""
    got = {n["name"]: n["rounds_ms"] for n in res["networks"]}
    predicted = {n["name"]: n["predicted_ms"] for n in res["networks"] if n["predicted_ms"] is not None}
    run = summarise(got, res["order"], predicted)
    return {**res, **run.model_dump(mode="json"), **summarise_tables(run, res["sitting_table_ms"])}


def uniform_median_ms(st: Study) -> tuple[float, float]:
    """The probe's median measured latency (each genotype's floor), and the probe's median ratio
    of the pinned table to those floors: what converts a measured target to the table's scale."""
    res = st.result(MEASURE_RUN)
    assert res is not None
    probe = [n for n in res["networks"] if n["name"].startswith("uniform-")]
    return (statistics.median(floor_of(n) for n in probe),
            statistics.median(n["predicted_ms"] / floor_of(n) for n in probe))


def floor_ratio(st: Study) -> float:
    """The pinned table over the measured floor, median over every network of the sitting."""
    res = st.result(MEASURE_RUN)
    assert res is not None
    return statistics.median(n["predicted_ms"] / floor_of(n) for n in res["networks"])


def run_partner(st: Study, name: str, source: str, seed: int, tilted: bool) -> dict | None:
    """The partner of ``source``: screened candidates measured interleaved with it, in batches,
    until one lies within ±3 % of its measured latency; the first in draw order wins."""
    src = st.result(source)
    assert src is not None
    g_src = Genotype.model_validate(src["genotype"])
    params_src = count_params(g_src)
    ratio = floor_ratio(st)
    expect_ms = st.table_ms(g_src) / ratio  # where the screen looks, on the host's scale
    term = st.table()[0]
    probs = None
    if tilted:
        tilt = tilt_for_latency(term, st.table_ms, st.layout, st.table_ms(g_src), seed)
        probs = tilted_op_probs(term, tilt)

    def keep(g: Genotype, n: int, ms: float) -> bool:
        return within(n, params_src, PARTNER_PARAMS_TOL) and within(ms / ratio, expect_ms, SCREEN_LATENCY_TOL)

    tried: list[dict] = []
    start = 0
    for batch in range(st.scale.partner_batches):
        cands = screened_draws(st.layout, seed, st.scale.partner_batch, keep, st.table_ms, probs=probs, start=start)
        start = cands[-1].draw + 1
        nets = {source: g_src, **{f"draw{c.draw}": c.genotype for c in cands}}
        with st.client() as c:
            run = measure_interleaved(nets, _measurer(c, st.scale.size), st.scale.rounds)
        t = run.by_name()
        got = {c.draw: t[f"draw{c.draw}"].floor_ms for c in cands}
        tried += [_candidate_row(c, t[f"draw{c.draw}"].model_dump(mode="json")) for c in cands]
        target = t[source].floor_ms
        match = first_match(cands, got, target, st.scale.partner_tol)
        log.info("%s: batch %d, %s floor %.3f ms; candidates' floors %s", name, batch, source, target,
                 ", ".join(f"{got[c.draw]:.3f}" for c in cands))
        if match is not None:
            return {"source": source, "genotype": match.genotype.model_dump(mode="json"),
                    "table_ms": match.table_ms, "params": match.params, "source_params": params_src,
                    "draw": match.draw, "seed": seed, "sampler": "tilted" if tilted else "uniform",
                    "op_probs": None if probs is None else probs.tolist(), "source_measured": t[source].model_dump(
                        mode="json"), "measured": t[f"draw{match.draw}"].model_dump(mode="json"),
                    "candidates": tried, "batches": batch + 1}
    raise RuntimeError(f"{name}: no candidate within ±{st.scale.partner_tol:.0%} of {source} in "
                       f"{st.scale.partner_batches} batches of {st.scale.partner_batch}")


def _candidate_row(c: Candidate, timing: dict) -> dict:
    return {"draw": c.draw, "params": c.params, "table_ms": c.table_ms, "measured": timing}


def target_ms(st: Study, factor: float) -> float:
    """``factor`` × the uniform probe's median measured latency, on the table's scale."""
    median, ratio = uniform_median_ms(st)
    return factor * median * ratio
