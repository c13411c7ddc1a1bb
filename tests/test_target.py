"""The latency-target mode (gas_core/target.py): the loss pulls LAT towards T from both sides,
and the derived network's exact table latency lands within ±5 % of T, on a fixed table."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from gas_core.genotype import derive
from gas_core.latency import LatencyTerm, predict_latency_us, work_table
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.target import fit_to_target, target_loss

LAYOUT = NetworkLayout(num_classes=11)
SIZE = (64, 96)


@pytest.fixture(scope="module")
def fixed_table() -> tuple[LatencyTerm, partial]:
    shapes = cell_shapes(LAYOUT, SIZE)
    table = work_table(shapes)
    return LatencyTerm.from_table(shapes, table), partial(predict_latency_us, shapes=shapes, table=table)


def _span(term: LatencyTerm, predict: partial) -> tuple[float, float]:
    """The exact latency of the all-cheapest and all-dearest argmax networks (µs)."""
    lo = predict(derive(-term.L, LAYOUT))
    hi = predict(derive(term.L, LAYOUT))
    return lo, hi


@pytest.mark.parametrize("where", [0.15, 0.5, 0.85])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_derived_network_lands_within_5_percent_of_the_target(fixed_table, where: float, seed: int) -> None:
    """Three targets across the reachable range, from α′ that favour other latencies: the fitted
    genotype's exact table latency is within ±5 % of T, and the fit says what it did."""
    term, predict = fixed_table
    lo, hi = _span(term, predict)
    target = lo + where * (hi - lo)
    alpha = torch.randn(LAYOUT.alpha_shape, generator=torch.Generator().manual_seed(seed)) * 2
    argmax_us = predict(derive(alpha, LAYOUT))
    g, fit = fit_to_target(alpha, LAYOUT, term, target, 0.05, predict)
    got = predict(g)
    assert abs(got / target - 1) <= 0.05, (got, target)
    assert fit.within and fit.fitted_ms == pytest.approx(got / 1e3)
    assert fit.argmax_ms == pytest.approx(argmax_us / 1e3)
    if abs(argmax_us / target - 1) > 0.05:
        assert fit.swaps and fit.logp_cost > 0
    else:
        assert not fit.swaps and g == derive(alpha, LAYOUT)


def test_a_fit_keeps_the_alpha_preferences_it_can(fixed_table) -> None:
    """Already within the band: no swap. Just outside: few swaps, each a single edge, and far
    fewer than the edges there are (it does not redraw the network)."""
    term, predict = fixed_table
    alpha = torch.randn(LAYOUT.alpha_shape, generator=torch.Generator().manual_seed(3))
    argmax_us = predict(derive(alpha, LAYOUT))
    same, fit = fit_to_target(alpha, LAYOUT, term, argmax_us * 1.02, 0.05, predict)
    assert same == derive(alpha, LAYOUT) and fit.swaps == []
    near, fit = fit_to_target(alpha, LAYOUT, term, argmax_us * 0.85, 0.05, predict)
    changed = sum(a != b for c0, c1 in zip(near.cells, derive(alpha, LAYOUT).cells, strict=True)
                  for a, b in zip(c0.edges, c1.edges, strict=True))
    assert fit.within and 0 < changed == len(fit.swaps) < LAYOUT.num_cells * LAYOUT.edges_per_cell // 2


def test_an_unreachable_target_is_reported_not_hidden(fixed_table) -> None:
    term, predict = fixed_table
    lo, _ = _span(term, predict)
    g, fit = fit_to_target(torch.zeros(LAYOUT.alpha_shape), LAYOUT, term, lo * 0.5, 0.05, predict)
    assert not fit.within and fit.fitted_ms > fit.target_ms * 1.05


def test_the_target_loss_pulls_from_both_sides() -> None:
    """∂/∂LAT of λ·|LAT/T − 1| is +λ/T above T and −λ/T below: a slow mixture is pushed down and
    a fast one let grow (β·log LAT only ever pushes down)."""
    ce = torch.tensor(1.0)
    for lat, sign in ((150.0, 1.0), (50.0, -1.0)):
        x = torch.tensor(lat, requires_grad=True)
        target_loss(ce, x, 100.0, 0.1).backward()
        assert x.grad is not None and float(x.grad) == pytest.approx(sign * 0.1 / 100.0)


def test_search_with_a_target_logs_it_and_fits_the_derived_network(tmp_path: Path, fixed_table) -> None:
    """A short search in target mode: every log row carries T, the result carries the fit, and
    the derived genotype is within the band on the table it was searched with."""
    from search_client.data import build_datasets
    from search_client.search import SearchConfig, search

    term, predict = fixed_table
    lo, hi = _span(term, predict)
    target_ms = (lo + 0.3 * (hi - lo)) / 1e3
    train, val = build_datasets("synthetic", None, SIZE, 0, (4, 2))
    cfg = SearchConfig(epochs=1, batch=2, max_steps=1, lr_a=0.01, target_ms=target_ms)
    res = search(cfg, LAYOUT, train, val, term, tmp_path, progress=False, predict_us=predict)
    assert all(h["target_ms"] == target_ms for h in res.history)
    assert res.fit is not None and res.fit.within
    assert abs(predict(res.genotype) / 1e3 / target_ms - 1) <= 0.05
    assert "target_ms" in (tmp_path / "search_log.csv").read_text().splitlines()[0]


# ---------------------------------------------------------------- interleaved measurement


def test_interleaved_measurement_visits_round_robin_and_summarises_rounds() -> None:
    """On a fake timer: each round visits every network once, starting one later each round (so
    each network takes each position equally often); the figure is the median of the rounds with
    the order-statistic interval; τ and the ratio compare the table with those medians."""
    from gas_core.genotype import random_genotype
    from search_client.interleaved import measure_interleaved, median_ci

    gen = torch.Generator().manual_seed(0)
    nets = {name: random_genotype(LAYOUT, gen) for name in ("a", "b", "c")}
    base = {"a": 10.0, "b": 20.0, "c": 30.0}
    calls: list[str] = []
    slow_spell = {4, 5, 6}  # the host slows down for three calls: every network shares it alike

    def fake(g) -> float:
        name = next(n for n, x in nets.items() if x is g)
        k = len(calls)
        calls.append(name)
        return base[name] * (1.5 if k in slow_spell else 1.0) + 0.01 * k

    run = measure_interleaved(nets, fake, rounds=10, predicted_ms={"a": 15.0, "b": 25.0, "c": 60.0})
    assert calls[:6] == ["a", "b", "c", "b", "c", "a"] and len(calls) == 30
    assert run.order == [calls[3 * r: 3 * r + 3] for r in range(10)]
    for name in nets:  # every position equally often, within one
        positions = [r.index(name) for r in run.order]
        assert max(positions.count(p) for p in range(3)) - min(positions.count(p) for p in range(3)) <= 1
    t = run.by_name()
    assert [len(t[n].rounds_ms) for n in nets] == [10, 10, 10]
    assert t["b"].median_ms == pytest.approx(sorted(t["b"].rounds_ms)[4] / 2 + sorted(t["b"].rounds_ms)[5] / 2)
    assert t["b"].ci95_ms == (sorted(t["b"].rounds_ms)[1], sorted(t["b"].rounds_ms)[8])
    assert t["b"].ci95_ms[0] <= t["b"].median_ms <= t["b"].ci95_ms[1]
    assert run.tau_table_vs_measured == pytest.approx(1.0)
    ratios = sorted(p / t[n].median_ms for n, p in (("a", 15.0), ("b", 25.0), ("c", 60.0)))
    assert run.median_ratio_table_over_measured == pytest.approx(ratios[1])
    assert t["b"].floor_ms == min(t["b"].rounds_ms)  # the fastest round: what partners are matched on
    # split halves: the slow spell hit rounds 1 and 2 only, so both halves order a < b < c
    assert run.split_half["floor"]["tau"] == pytest.approx(1.0) and run.split_half["median"]["tau"] == pytest.approx(1.0)
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few rounds for 95 %: the range
    with pytest.raises(ValueError):
        measure_interleaved({}, fake)


# ---------------------------------------------------------------- random partners


def _fake_params(g) -> int:
    """A fixed parameter count: 1,000 per edge that is not skip or none."""
    return 1000 * sum(op not in ("skip_connect", "none") for c in g.cells for op in c.edges)


def test_partners_are_screened_draws_in_order_and_the_first_match_wins(fixed_table) -> None:
    """Screened on a fixed table and fixed parameter counts: every candidate passes the screen,
    the stream is the seed's whatever is asked, it continues from ``start``, and the partner is the
    first candidate in draw order within ±3 % measured, not the closest one."""
    from gas_core.random_search import first_match, screened_draws, within

    term, predict = fixed_table

    def table_ms(g) -> float:
        return predict(g) / 1e3

    ref = screened_draws(LAYOUT, 5, 1, lambda g, n, ms: True, table_ms, _fake_params)[0]
    keep = lambda g, n, ms: within(n, ref.params, 0.10) and within(ms, ref.table_ms, 0.15)  # noqa: E731
    cands = screened_draws(LAYOUT, 7, 6, keep, table_ms, _fake_params)
    assert [c.draw for c in cands] == sorted(c.draw for c in cands)
    assert all(within(c.params, ref.params, 0.10) and within(c.table_ms, ref.table_ms, 0.15) for c in cands)
    assert all(c.params == _fake_params(c.genotype) and c.table_ms == table_ms(c.genotype) for c in cands)
    assert screened_draws(LAYOUT, 7, 3, keep, table_ms, _fake_params) == cands[:3]
    assert screened_draws(LAYOUT, 7, 3, keep, table_ms, _fake_params, start=cands[2].draw + 1) == cands[3:]
    measured = {cands[0].draw: 10.8, cands[1].draw: 10.25, cands[2].draw: 10.01}
    assert first_match(cands, measured, 10.0) is cands[1]  # 10.8 is 8 % off; 10.25 matches first
    assert first_match(cands, {cands[0].draw: 12.0}, 10.0) is None


def test_a_tilt_toward_cheap_ops_reaches_latencies_uniform_draws_rarely_do(fixed_table) -> None:
    from gas_core.genotype import random_genotype
    from gas_core.random_search import tilt_for_latency, tilted_op_probs

    term, predict = fixed_table

    def table_ms(g) -> float:
        return predict(g) / 1e3

    probs = tilted_op_probs(term, 2.0)
    cost = term.L.mean(dim=(0, 1))
    assert torch.allclose(tilted_op_probs(term, 0.0), torch.full_like(probs, 1 / len(probs)))
    assert probs[cost.argmin()] == probs.max() and probs[cost.argmax()] == probs.min()
    gen = torch.Generator().manual_seed(0)
    uniform = sorted(table_ms(random_genotype(LAYOUT, gen)) for _ in range(101))[50]
    target = 0.8 * uniform
    tilt = tilt_for_latency(term, table_ms, LAYOUT, target, seed=1)
    gen = torch.Generator().manual_seed(2)
    drawn = sorted(table_ms(random_genotype(LAYOUT, gen, tilted_op_probs(term, tilt))) for _ in range(101))[50]
    assert tilt > 0 and abs(drawn / target - 1) < 0.05, (tilt, drawn, target)
    assert tilt_for_latency(term, table_ms, LAYOUT, 2 * uniform, seed=1) == 0.0
