"""GAS on real images: CamVid end to end, and the paper's comparisons, in one resumable command.

    python -m bench.camvid_study --data-root ../shared/camvid --scale cpu --out bench/results/camvid

Stages, each a *run* whose result is written as ``OUT/runs/<name>.json`` the moment it finishes
(a rerun skips finished runs; an unfinished search or training resumes from its checkpoint under
``OUT/work/``, which is not committed):

1. ``table``: start the latency service on embedded SQLite (``OUT/work/gas.db``) and profile this
   host's table at the study's input size through it, as users do.
2. ``recipe``: train one random genotype with the training recipe on train minus its last 62
   images (the end of daylight 0016E5) and score it on those: is the recipe's budget
   long enough that val mIoU stops rising (last tenth of epochs within 1 point)? Val is never seen.
3. ``search-*``: GAS searches (3 seeds, β = 0.005, independent cells + GCN), the Figure 5 variants
   (shared cells; independent with no link, FC, GCN) and the Figure 6 β values, 2 seeds each.
   Weights and α are fitted on the training split only; val only scores the derived path.
4. ``random-*``: random (a) uniform genotypes, and random (b) ones whose table latency lies
   within ±5 % of the GAS nets' mean.
5. ``train-*``: GAS and random nets trained from scratch with the recipe, scored by ``gas-eval``
   on val, final weights saved as float16 under ``OUT/nets/``.
6. ``measure-*``: every network timed end to end by ``POST /measure`` — last, in one go, so no
   training competes with the timing.
7. The report (``OUT/report.md``, ``OUT/*.png``, ``OUT/study.json``) is rewritten from whatever
   has finished after every sitting (``--report-only`` just redraws it).

``--budget-min M`` stops starting work after M minutes (an epoch in progress finishes): the study
runs in sittings. ``--scale gpu`` is the full 360×480 on one GPU (make its ≤ 50 MiB data copy with
``--make-gpu-data DIR``); ``--scale tiny`` exists for the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from bench.camvid_match import MEASURE_RUN, run_measure_sitting, run_partner, target_ms
from bench.common import machine
from gas_core.genotype import Genotype, derive, random_genotype
from gas_core.latency import LatencyTerm, predict_latency_us
from gas_core.network import GASNet
from gas_core.ops import PRIMITIVES
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.table import LatencyTable
from latency_service.testing import local_service
from search_client.cli import fetch_latency_term
from search_client.client import LatencyClient
from search_client.data import SegDataset, build_datasets
from search_client.runtime import ComputeConfig, DistInfo
from search_client.search import SearchConfig, search
from search_client.train import TrainConfig, read_checkpoint, train

log = logging.getLogger("camvid-study")
TABLE_RUN = "table-r2"
"""The run whose table this round reads: round 2 re-profiled it (round 1's was never exported)."""
HoldoutAt = Literal["start", "end"]
NUM_CLASSES = 11


class Scale(BaseModel):
    """Everything a scale decides; the presets below are the study's choices (docs/studies/camvid.md
    says why)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    size: tuple[int, int]
    downscale: int
    compute: ComputeConfig
    search: SearchConfig
    train: TrainConfig
    gas_seeds: list[int]
    random_a: int
    random_b: int
    fig5_seeds: list[int]
    fig5_train: bool
    betas: list[float]
    beta_seeds: list[int]
    recipe_holdout: int
    link_lrs: list[float] = []
    """GCN searches with the link's weights at these learning rates (item 4: does a slower link
    collapse fewer cells?), one per seed of ``link_lr_seeds``"""
    link_lr_seeds: list[int] = []
    service_env: dict[str, str] = {}
    # round 2 (bench/camvid_match.py): measured matching and latency targets
    rounds: int = 10
    """interleaved rounds of every measurement (≥ 10 for a 95 % interval between the 2nd and 9th)"""
    uniform_probe: int = 10
    """uniform genotypes measured to set the targets"""
    partner_batch: int = 6
    partner_tol: float = 0.03
    """a partner's measured latency lies within ±this of its searched network's"""
    partner_batches: int = 6
    target_factors: list[float] = []
    """targets as fractions of the probe's median measured latency"""
    target_seeds: list[int] = []


# Search at the paper's §4.2 values except: 4 weights-only warm-up epochs (a fresh supernet barely
# trains under Gumbel mixtures at λ≈1 in a short run) and α at Adam 0.03 instead of 0.001 with the
# GCN's weights at 0.001: α can then move as far in 10 epochs × 22 steps as the demo's converged
# runs did (0.1 × ~100 steps), which 0.001 cannot (it would move α by at most 0.2).
_SEARCH_CPU = SearchConfig(epochs=10, warmup_epochs=4, batch=16, lr_a=0.03, lr_ggm=0.001)
# Training: the paper's recipe (SGD, poly 0.01 → 0, batch 8, bootstrapping, flip/scale/crop) with
# a budget that fits: 120 epochs ≈ 5,500 steps. The recipe stage checks it on held-out train data.
_TRAIN_CPU = TrainConfig(epochs=120, batch=8, lr=0.01)

SCALES: dict[str, Scale] = {
    "cpu": Scale(name="cpu", size=(180, 240), downscale=2, compute=ComputeConfig(device="cpu", workers=0),
                 search=_SEARCH_CPU, train=_TRAIN_CPU, gas_seeds=[0, 1, 2, 3, 4], random_a=2, random_b=3,
                 fig5_seeds=[0, 1], fig5_train=False, betas=[0.0005, 0.005, 0.05], beta_seeds=[0, 1],
                 recipe_holdout=62, link_lrs=[0.0001], link_lr_seeds=[0], target_factors=[0.65, 0.8],
                 target_seeds=[0, 1]),
    "gpu": Scale(name="gpu", size=(360, 480), downscale=1,
                 compute=ComputeConfig(device="cuda", amp="bf16", channels_last=True, workers=8),
                 search=SearchConfig(epochs=40, warmup_epochs=10, batch=16, lr_a=0.01, lr_ggm=0.001),
                 train=TrainConfig(epochs=400, batch=8, lr=0.01), gas_seeds=[0, 1, 2], random_a=5, random_b=5,
                 fig5_seeds=[0, 1], fig5_train=True, betas=[0.0005, 0.005, 0.05], beta_seeds=[0, 1],
                 recipe_holdout=62, link_lrs=[0.0001], link_lr_seeds=[0, 1], target_factors=[0.65, 0.8],
                 target_seeds=[0, 1]),
    "tiny": Scale(name="tiny", size=(32, 48), downscale=1, compute=ComputeConfig(device="cpu", workers=0),
                  search=SearchConfig(epochs=1, warmup_epochs=0, batch=2, max_steps=1, lr_a=0.03, lr_ggm=0.001),
                  train=TrainConfig(epochs=1, batch=2, max_steps=1, bootstrap_min_kept=16), gas_seeds=[0],
                  random_a=0, random_b=1, fig5_seeds=[], fig5_train=False, betas=[], beta_seeds=[],
                  recipe_holdout=0, rounds=3, uniform_probe=3, partner_batch=3, partner_batches=3, partner_tol=10.0,
                  service_env={"GAS_SAMPLES": "5", "GAS_WARMUP_RUNS": "2", "GAS_WARMUP_MS": "2",
                               "GAS_MIN_SAMPLE_MS": "0.2", "GAS_E2E_SAMPLES": "5", "GAS_E2E_WARMUP_RUNS": "1",
                               "GAS_CPU_THREADS": "1", "GAS_DEVICE": "cpu", "GAS_CONTEXT_MIN_SAMPLE_MS": "0.5",
                               "GAS_RETIME_MAX": "0"}),
}


@dataclass
class Run:
    """One unit of the study: ``go`` returns its result, or None when it stopped unfinished."""

    name: str
    kind: str
    go: Callable[[], dict | None]
    needs: list[str] = field(default_factory=list)


class Study:
    """The runs of one scale over one output directory, and what they share (datasets, the
    service, the latency term)."""

    def __init__(self, scale: Scale, data_root: Path, out: Path, budget_s: float | None, progress: bool) -> None:
        self.scale, self.data_root, self.out, self.progress = scale, data_root, out, progress
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.layout = NetworkLayout(num_classes=NUM_CLASSES)
        self.work = out / "work"
        self.url: str | None = None
        self._data: dict[tuple[int, str], tuple[SegDataset, SegDataset]] = {}
        self._term: tuple[LatencyTerm, dict[str, float], str] | None = None

    # -- shared pieces
    def result(self, name: str) -> dict | None:
        path = self.out / "runs" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def datasets(self, holdout: int = 0, at: HoldoutAt = "end") -> tuple[SegDataset, SegDataset]:
        if (holdout, at) not in self._data:
            self._data[holdout, at] = build_datasets("camvid", self.data_root, self.scale.size, 0,
                                                     downscale=self.scale.downscale, holdout=holdout, holdout_at=at,
                                                     cache=True)
        return self._data[holdout, at]

    def client(self) -> LatencyClient:
        if self.url is None:
            raise RuntimeError("the latency service is not running")
        return LatencyClient(self.url, timeout=600)

    def table(self) -> tuple[LatencyTerm, dict[str, float], str]:
        """The latency term of the study's layout and the table behind it: the table of the
        study's current round (``runs/table-r2.json`` names it), so every search, every random
        draw and every table latency of a round read one table, even after the host's environment
        fingerprint changed (a new torch, an added runtime). The table is exported to
        ``OUT/tables/`` (committed) when profiled and imported from there into a fresh database
        in later sittings; profiled here when there is none. (Round 1's table, ``runs/table.json``,
        lived only in the uncommitted ``work/gas.db`` and is lost: its runs keep the table
        latencies they were given.)"""
        if self._term is None:
            pinned = self.result(TABLE_RUN)
            with self.client() as c:
                env = pinned["environment"] if pinned else c.host().environment.fingerprint
                target = f"{pinned['device']}@{env}" if pinned else None
                if pinned:
                    self._import_pinned(c, pinned["device"], env)
                term, slug = fetch_latency_term(c, target, self.layout, self.scale.size, 1, "float32", "contiguous",
                                                progress=self.progress)
                table = c.table(slug, dtype="float32", batch=1, memory_format="contiguous", environment=env,
                                samples=True)
            if not pinned:
                export = self.out / "tables" / f"{TABLE_RUN}.json"
                export.parent.mkdir(parents=True, exist_ok=True)
                export.write_text(table.model_dump_json(indent=1))
            self._term = (term, table.lookup(), slug)
        return self._term

    def _import_pinned(self, c: LatencyClient, slug: str, env: str) -> None:
        """Bring the pinned table back from its committed export when this sitting's database
        lacks it (``work/`` is not committed)."""
        have = {e.fingerprint for d in c.devices().devices if d.slug == slug for e in d.environments}
        if env in have:
            return
        export = self.out / "tables" / f"{TABLE_RUN}.json"
        if not export.is_file():
            raise RuntimeError(f"the study's table {slug}@{env} is in neither the database nor {export}")
        c.import_table(LatencyTable.model_validate_json(export.read_text()), force=True)
        log.info("imported the study's table %s@%s from %s", slug, env, export)

    def table_ms(self, g: Genotype, lookup: dict[str, float] | None = None) -> float:
        """``g``'s whole-network latency from the study's table (or ``lookup``), ms."""
        shapes = cell_shapes(self.layout, self.scale.size)
        return predict_latency_us(g, shapes, self.table()[1] if lookup is None else lookup) / 1e3

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def timed(self, name: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``fn()`` and the wall seconds spent on ``name`` over every sitting so far."""
        path = self.work / name / "wall_s.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        before = float(path.read_text()) if path.is_file() else 0.0
        t0 = time.perf_counter()
        try:
            return fn(), before + time.perf_counter() - t0
        finally:
            path.write_text(str(before + time.perf_counter() - t0))

    # -- the units
    def run_table(self) -> dict:
        (term, lookup, slug), wall = self.timed(TABLE_RUN, self.table)
        with self.client() as c:
            host = c.host()
        return {"device": slug, "environment": host.environment.fingerprint, "keys": len(lookup),
                "fixed_ms": float(term.fixed) / 1e3, "L_min_us": float(term.L.min()), "L_max_us": float(term.L.max()),
                "wall_s": wall}

    def run_search(self, name: str, cfg: SearchConfig) -> dict | None:
        train_ds, val_ds = self.datasets()
        term = self.table()[0]
        res, wall = self.timed(name, lambda: search(
            cfg, self.layout, train_ds, val_ds, term, self.work / name, compute=self.scale.compute, resume=True,
            progress=self.progress, deadline=self.deadline, predict_us=lambda g: self.table_ms(g) * 1e3))
        if len(res.history) < cfg.warmup_epochs + cfg.epochs:
            return None
        g = res.genotype
        last = res.history[-1]
        with torch.no_grad():
            alpha, alpha_prime = res.supernet.alphas().cpu(), res.supernet.alpha_prime().cpu()
        return {"config": cfg.model_dump(mode="json"), "genotype": g.model_dump(mode="json"),
                "table_ms": self.table_ms(g), "val_miou_derived": last["val_miou"], "top_prob": last["top_prob"],
                "collapse": collapse(g), "ggm_share": ggm_share(alpha, alpha_prime),
                "collapse_of_alpha": collapse(derive(alpha, self.layout)), "history": res.history, "wall_s": wall,
                "alpha": alpha.tolist(), "alpha_prime": alpha_prime.tolist(),
                "fit": None if res.fit is None else res.fit.model_dump(mode="json")}

    def run_random(self, name: str, index: int, matched: bool) -> dict:
        target = None
        if matched:
            gas = [self.result(f"search-gas-s{s}") for s in self.scale.gas_seeds]
            target = sum(r["table_ms"] for r in gas if r) / len(gas)
        g, how, draws = draw_random(self.layout, self.table()[0], self.table_ms, 10_000 + index, target)
        return {"genotype": g.model_dump(mode="json"), "table_ms": self.table_ms(g), "target_ms": target,
                "sampler": how, "draws": draws, "collapse": collapse(g)}

    def run_train(self, name: str, source: str, holdout: int = 0, at: HoldoutAt = "end") -> dict | None:
        src = self.result(source)
        assert src is not None
        g = Genotype.model_validate(src["genotype"])
        cfg = self.scale.train
        train_ds, val_ds = self.datasets(holdout, at)
        work = self.work / name
        s, wall = self.timed(name, lambda: train(
            cfg, g, train_ds, val_ds, work, self.scale.compute, DistInfo(), resume=True, progress=self.progress,
            deadline=self.deadline))
        if len(s.history) < cfg.epochs:
            return None
        curve = [h["val_miou"] for h in s.history]
        tail = curve[-max(1, len(curve) // 10):]
        out = {"source": source, "genotype": src["genotype"], "table_ms": src["table_ms"], "config":
               cfg.model_dump(mode="json"), "history": s.history, "params": sum(p.numel() for p in GASNet(g).parameters()),
               "last_tenth_range": max(tail) - min(tail), "best_epoch_miou": max(curve), "final_epoch_miou": curve[-1],
               "wall_s": wall, "holdout": holdout, "holdout_at": at if holdout else None}
        if holdout == 0:
            out["eval"] = self.gas_eval(work / "last.pt", work / "eval", "input")
            out["checkpoint"] = str(save_half(work / "last.pt", self.out / "nets" / f"{name}.pt").relative_to(self.out))
        return out

    def gas_eval(self, ckpt: Path, out: Path, labels: str) -> dict:
        """``gas-eval`` on val, as a user runs it, scoring against labels at the input size (what
        round 1 reported) or at their native 360×480 (how published numbers are scored)."""
        cmd = [sys.executable, "-c", "import sys; from search_client.train_cli import eval_main; "
               "sys.argv[0] = 'gas-eval'; eval_main()", str(ckpt), "--dataset", "camvid", "--data-root",
               str(self.data_root), "--split", "val", "--device", self.scale.compute.device, "--label-resolution",
               labels, "--batch", "4" if labels == "input" else "1", "--out", str(out)]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"gas-eval {ckpt} failed: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads((out / "eval.json").read_text())

    def run_eval_both(self, train_run: str) -> dict:
        """A trained network's committed weights scored both ways (round 2: native labels)."""
        res = self.result(train_run)
        assert res is not None and "checkpoint" in res
        ckpt = self.out / res["checkpoint"]
        return {"source": train_run, **{labels: self.gas_eval(ckpt, self.work / f"eval-{labels}-{train_run}", labels)
                                        for labels in ("native", "input")}}

    def run_measure(self, source: str) -> dict:
        src = self.result(source)
        assert src is not None
        g = Genotype.model_validate(src["genotype"])
        with self.client() as c:
            m = c.measure(g, self.scale.size, batch=1, dtype="float32", memory_format="contiguous")
        return {"source": source, **m.model_dump(mode="json")}


def collapse(g: Genotype) -> dict:
    """Cells whose edges all chose one op (the deep-cell collapse), and the ops of each cell."""
    same = [len(set(c.edges)) == 1 for c in g.cells]
    return {"share": sum(same) / len(same), "cells": [k for k, s in enumerate(same) if s],
            "ops": [list(c.edges) for c in g.cells]}


def ggm_share(alpha: torch.Tensor, alpha_prime: torch.Tensor) -> dict:
    """Where the link between cells pushes α′ [cells, edges, ops], per cell: ``gain`` = ‖Δ‖ / ‖α‖
    with Δ = α′ − α (how much of α′ the GGM wrote), and ``common`` = the share of ‖Δ‖² that is the
    same vector on every edge (1: the GGM adds one op preference to all five edges, which makes
    them all choose the same op whatever α says)."""
    delta = alpha_prime - alpha
    mean = delta.mean(dim=1, keepdim=True)  # [cells, 1, ops]
    total = delta.pow(2).sum(dim=(1, 2))
    common = (mean.pow(2).sum(dim=(1, 2)) * delta.shape[1] / total.clamp(min=1e-12)).tolist()
    gain = (delta.flatten(1).norm(dim=1) / alpha.flatten(1).norm(dim=1).clamp(min=1e-12)).tolist()
    return {"gain": gain, "common": common}


def draw_random(layout: NetworkLayout, term: LatencyTerm, table_ms: Callable[[Genotype], float], seed: int,
                target_ms: float | None, tol: float = 0.05, tries: int = 20_000) -> tuple[Genotype, str, int]:
    """A random genotype: uniform per edge; with ``target_ms``, the first uniform draw whose
    table latency lies within ±``tol`` of it. Where uniform draws never get there (a searched net
    much faster than the average), each draw first picks its own op probabilities from a
    Dirichlet(0.5) — still random architectures, from a wider spread of latencies."""
    gen = torch.Generator().manual_seed(seed)
    if target_ms is None:
        return random_genotype(layout, gen), "uniform", 1
    for how in ("uniform", "dirichlet(0.5)"):
        for i in range(tries):
            probs = None if how == "uniform" else torch.distributions.Dirichlet(
                torch.full((len(PRIMITIVES),), 0.5)).sample()
            g = random_genotype(layout, gen, probs)
            if abs(float(term.total(g.one_hot())) / 1e3 / target_ms - 1) > 3 * tol:
                continue  # cheap pre-filter: the term's sum is within a few % of the exact one
            if abs(table_ms(g) / target_ms - 1) <= tol:
                return g, how, i + 1
    raise RuntimeError(f"no random genotype within ±{tol:.0%} of {target_ms:.3f} ms in {2 * tries} draws")


def save_half(ckpt: Path, dest: Path) -> Path:
    """The trained weights as float16 (integers kept) with the genotype and recipe: what
    ``gas-eval`` needs to re-score the network, small enough to commit."""
    ck = read_checkpoint(ckpt)
    ck["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
    ck.pop("opt", None)
    ck.pop("scaler", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, dest)
    return dest


def plan(st: Study) -> list[Run]:
    """Every run in the order it is worth having: the table, the recipe check, Table 3 (GAS
    searches, random picks, training, alternating GAS and random), Figure 5, Figure 6, timing."""
    sc = st.scale
    runs = [Run(TABLE_RUN, "table", st.run_table)]
    if sc.recipe_holdout:
        runs += [Run("random-recipe", "random", lambda: st.run_random("random-recipe", 999, False), [TABLE_RUN]),
                 Run("train-recipe", "recipe", lambda: st.run_train("train-recipe", "random-recipe", sc.recipe_holdout),
                     ["random-recipe"]),
                 # The first check held out the dusk sequence 0001TP: a domain shift, not a plateau test.
                 Run("train-recipe-0001TP", "recipe", lambda: st.run_train(
                     "train-recipe-0001TP", "random-recipe", sc.recipe_holdout, "start"), ["random-recipe"])]

    def search_run(name: str, **over: Any) -> Run:
        cfg = sc.search.model_copy(update=over)
        cfg = SearchConfig.model_validate(cfg.model_dump())  # re-resolves the GGM default for shared cells
        return Run(f"search-{name}", "search", lambda: st.run_search(f"search-{name}", cfg), [TABLE_RUN])

    gas = [f"gas-s{s}" for s in sc.gas_seeds]
    runs += [search_run(n, seed=s) for n, s in zip(gas, sc.gas_seeds, strict=True)]
    rb = [f"random-b{i}" for i in range(sc.random_b)]
    ra = [f"random-a{i}" for i in range(sc.random_a)]
    runs += [Run(n, "random", partial(st.run_random, n, i, True), [f"search-{g}" for g in gas])
             for i, n in enumerate(rb)]
    runs += [Run(n, "random", partial(st.run_random, n, 100 + i, False), [TABLE_RUN]) for i, n in enumerate(ra)]
    trained = interleave([f"search-{g}" for g in gas], rb, ra)
    runs += [Run(f"train-{src}", "train", partial(st.run_train, f"train-{src}", src), [src]) for src in trained]
    fig5 = [search_run(f"{v}-s{s}", seed=s, **over) for s in sc.fig5_seeds for v, over in
            (("shared", {"cells": "shared", "ggm": None}), ("none", {"ggm": "none"}), ("fc", {"ggm": "fc"}))]
    fig5 += [search_run(f"gas-s{s}", seed=s) for s in sc.fig5_seeds if s not in sc.gas_seeds]
    runs += fig5
    # Item 4's evidence: the links chained through α′ (this code's first form), which collapsed cells.
    runs += [search_run(f"{v}chain-s{s}", seed=s, ggm=v, ggm_source="alpha_prime") for v, seeds in
             (("gcn", sc.fig5_seeds), ("fc", sc.fig5_seeds[:1])) for s in seeds]
    if sc.fig5_train:
        runs += [Run(f"train-{r.name}", "train", partial(st.run_train, f"train-{r.name}", r.name), [r.name])
                 for r in fig5]
    runs += [search_run(f"beta{b:g}-s{s}", seed=s, beta=b) for b in sc.betas if b != sc.search.beta
             for s in sc.beta_seeds]
    runs += [search_run(f"gcnlr{lr:g}-s{s}", seed=s, lr_ggm=lr) for lr in sc.link_lrs for s in sc.link_lr_seeds]
    networks = [r.name for r in runs if r.kind in ("search", "random") and r.name != "random-recipe"]
    # round 1 timed each network alone at the end; round 2 times them interleaved (measure-r2)
    runs += [Run(f"measure-{n}", "measure", partial(st.run_measure, n), [n]) for n in networks
             if st.result(f"measure-{n}") is not None]
    return runs + plan_round2(st, [r.name for r in runs if r.kind == "train"])


def plan_round2(st: Study, trained: list[str]) -> list[Run]:
    """Round 2 (bench/camvid_match.py): the measuring sitting, a measured-latency partner for
    every GAS search, GAS at latency targets with partners from cheap-tilted draws, training,
    and every trained network scored against native-resolution labels."""
    sc = st.scale
    gas = [f"search-gas-s{s}" for s in sc.gas_seeds]
    runs = [Run(MEASURE_RUN, "measure", partial(run_measure_sitting, st), [TABLE_RUN, *gas])]

    def partner(source: str, seed: int, tilted: bool) -> list[Run]:
        name = "partner-" + source.removeprefix("search-")
        return [Run(name, "random", partial(run_partner, st, name, source, seed, tilted), [MEASURE_RUN, source]),
                Run(f"train-{name}", "train", partial(st.run_train, f"train-{name}", name), [name])]

    for i, s in enumerate(sc.gas_seeds):
        runs += partner(f"search-gas-s{s}", 40_000 + i, tilted=False)
    for f in sc.target_factors:
        for s in sc.target_seeds:
            name = f"search-t{f:g}-s{s}"
            runs.append(Run(name, "search", partial(_target_search, st, name, f, s), [MEASURE_RUN]))
            runs += partner(name, 50_000 + int(100 * f) * 10 + s, tilted=True)
            runs.append(Run(f"train-{name}", "train", partial(st.run_train, f"train-{name}", name), [name]))
    trained = [*trained, *(r.name for r in runs if r.kind == "train")]
    runs += [Run(f"evalboth-{t}", "eval", partial(st.run_eval_both, t), [t]) for t in trained]
    return runs


def _target_search(st: Study, name: str, factor: float, seed: int) -> dict | None:
    cfg = st.scale.search.model_copy(update={"seed": seed, "target_ms": target_ms(st, factor)})
    res = st.run_search(name, SearchConfig.model_validate(cfg.model_dump()))
    return None if res is None else {**res, "target_factor": factor}


def interleave(*lists: list[str]) -> list[str]:
    out: list[str] = []
    for i in range(max(map(len, lists), default=0)):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out


def execute(st: Study, only: list[str] | None) -> dict[str, str]:
    """Run what is not finished, in plan order; returns each run's status."""
    status: dict[str, str] = {}
    for run in plan(st):
        path = st.out / "runs" / f"{run.name}.json"
        if only and not any(run.name.startswith(o) for o in only):
            continue
        if path.is_file():
            status[run.name] = "done"
            continue
        if any(st.result(n) is None for n in run.needs):
            status[run.name] = "waiting for " + ", ".join(n for n in run.needs if st.result(n) is None)
            continue
        if st.out_of_time():
            status[run.name] = "not started (budget spent)"
            continue
        log.info("run %s", run.name)
        t0 = time.perf_counter()
        result = run.go()
        if result is None:
            status[run.name] = "unfinished (resumes next sitting)"
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": run.name, "kind": run.kind, "scale": st.scale.name, "machine": machine(),
                                   **result}, indent=1))
        tmp.replace(path)
        status[run.name] = "done"
        log.info("run %s finished in %.0f s", run.name, time.perf_counter() - t0)
    return status


def make_gpu_data(src: Path, dest: Path, quality: int = 90) -> int:
    """A copy of CamVid train and val for a GPU host: images re-encoded as JPEG at ``quality``
    (labels kept as lossless PNG); returns its size in bytes (≤ 50 MiB at the default)."""
    from PIL import Image

    total = 0
    for split in ("train", "val"):
        for sub, is_label in ((split, False), (f"{split}annot", True)):
            (dest / sub).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / sub).glob("*.png")):
                out = dest / sub / (f.name if is_label else f"{f.stem}.jpg")
                if is_label:
                    out.write_bytes(f.read_bytes())
                else:
                    Image.open(f).convert("RGB").save(out, quality=quality)
                total += out.stat().st_size
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/camvid"),
                    help="CamVid in the SegNet layout (train/ trainannot/ val/ valannot/)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu: 180×240 on this machine; gpu: "
                    "360×480 on one GPU; tiny: the tests' smoke size")
    ap.add_argument("--out", type=Path, default=Path("bench/results/camvid"), help="results (runs/, nets/, report)")
    ap.add_argument("--budget-min", type=float, default=None, help="stop starting work after this many minutes "
                    "(the epoch in progress finishes; the next sitting resumes)")
    ap.add_argument("--only", nargs="+", default=None, help="run only the runs whose names start with these")
    ap.add_argument("--report-only", action="store_true", help="redraw the report from the finished runs")
    ap.add_argument("--make-gpu-data", type=Path, default=None, metavar="DIR",
                    help="write the ≤ 50 MiB copy of CamVid that --scale gpu ships to a GPU host, then exit")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bench.camvid_report import write_report

    if args.make_gpu_data is not None:
        size = make_gpu_data(args.data_root, args.make_gpu_data)
        print(f"wrote {args.make_gpu_data}: {size / 2**20:.1f} MiB (JPEG images, PNG labels)")
        return 0
    if not args.report_only and not (args.data_root / "train").is_dir():
        print(f"camvid_study: error: --data-root {args.data_root}: no train/ directory (CamVid SegNet layout)",
              file=sys.stderr)
        return 2
    scale = SCALES[args.scale]
    args.out.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    if not args.report_only:
        st = Study(scale, args.data_root, args.out, None if args.budget_min is None else 60 * args.budget_min,
                   progress=not args.quiet)
        st.work.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM stops like Ctrl-C: each run's wall time is saved
        # A shell without job control starts a background `cmd &` with SIGINT ignored, and Python
        # then keeps it ignored: `kill -INT` did nothing to a study started that way.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with local_service(f"sqlite:///{(st.work / 'gas.db').resolve()}", st.work,
                           {"GAS_DEVICE": "cuda:0" if scale.compute.device == "cuda" else "cpu",
                            **scale.service_env}, log=st.work / "service.log") as url:
            st.url = url
            status = execute(st, args.only)
        for name, s in status.items():
            print(f"{name:<28} {s}")
    write_report(args.out, scale.name)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM → KeyboardInterrupt, so the ``finally`` blocks run: the run in progress records the
    wall time it spent (``timed``), the local service stops, and the next sitting resumes from the
    last finished epoch or step."""
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("camvid_study: stopped; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
