"""CamVid on real files (skipped where the research-use copy is absent), the loader's half-size,
holdout and test-split options, and the CamVid study's orchestration at a tiny size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bench.camvid_study import collapse, draw_random, main
from gas_core.genotype import Genotype
from gas_core.latency import LatencyTerm
from gas_core.search_space import NetworkLayout
from latency_service.testing import child_pids, running
from search_client.data import IGNORE, Augment, CamVid, build_datasets
from search_client.train_cli import eval_app, train_app
from tests.test_search_client import make_camvid

REAL_CAMVID = Path(__file__).resolve().parents[2] / "shared" / "camvid"
needs_camvid = pytest.mark.skipif(not (REAL_CAMVID / "train").is_dir(),
                                  reason=f"the research-use CamVid copy is not at {REAL_CAMVID}")


@needs_camvid
def test_real_camvid_ids_void_sizes_and_half_size() -> None:
    ds = CamVid(REAL_CAMVID, "train", Augment((360, 480), False))
    assert len(ds) == 367 and len(CamVid(REAL_CAMVID, "val", Augment((360, 480), False))) == 101
    for i in (0, 150, 366):
        img, lbl = ds.load(i)
        raw = np.asarray(Image.open(ds.items[i][1]))
        assert img.shape == (3, 360, 480) and img.dtype == torch.uint8 and lbl.shape == (360, 480)
        assert set(np.unique(raw)) <= set(range(12))
        assert (lbl.numpy()[raw == 11] == IGNORE).all() and (lbl.numpy()[raw < 11] == raw[raw < 11]).all()
    half = CamVid(REAL_CAMVID, "train", Augment((180, 240), False), downscale=2)
    img, lbl = half.load(0)
    assert img.shape == (3, 180, 240) and lbl.shape == (180, 240)
    assert set(lbl.unique().tolist()) <= set(range(11)) | {IGNORE}
    # nearest-neighbour labels: every half-size label value is one of the full-size ones
    assert set(lbl.unique().tolist()) <= set(ds.load(0)[1].unique().tolist())
    train, held = build_datasets("camvid", REAL_CAMVID, (180, 240), 0, downscale=2, holdout=62)
    assert len(train) == 305 and len(held) == 62
    assert all(p.name.startswith("0001TP") for p, _ in held.items)
    assert not any(p.name.startswith("0001TP") for p, _ in train.items)
    train, held = build_datasets("camvid", REAL_CAMVID, (180, 240), 0, downscale=2, holdout=62, holdout_at="end")
    assert len(train) == 305 and [p.name for p, _ in held.items][::61] == ["0016E5_06570.png", "0016E5_08640.png"]
    assert max(p.name for p, _ in train.items) == "0016E5_06540.png"


def test_downscale_cache_holdout_and_jpeg_images(tmp_path: Path) -> None:
    make_camvid(tmp_path, h=24, w=32)
    ds = CamVid(tmp_path, "train", Augment((12, 16), False), downscale=2, cache=True)
    a = ds.load(1)
    assert a[0].shape == (3, 12, 16) and a[1].shape == (12, 16) and ds.load(1) is a  # cached
    train, held = build_datasets("camvid", tmp_path, (12, 16), 0, downscale=2, holdout=1)
    assert len(train) == 2 and len(held) == 1 and held.items[0] == ds.items[0] and not held.augment.train
    train, held = build_datasets("camvid", tmp_path, (12, 16), 0, downscale=2, holdout=1, holdout_at="end")
    assert train.items == ds.items[:2] and held.items == ds.items[2:] and train.augment.train
    with pytest.raises(ValueError, match="--holdout 3"):
        build_datasets("camvid", tmp_path, (12, 16), 0, holdout=3)
    with pytest.raises(ValueError, match="downscale"):
        CamVid(tmp_path, "train", Augment((12, 16), False), downscale=0)
    png = tmp_path / "train" / "0001TP_000000.png"
    Image.open(png).save(png.with_suffix(".jpg"), quality=95)
    png.unlink()
    jpg_ds = CamVid(tmp_path, "train", Augment((12, 16), False))
    assert jpg_ds.items[0][0].suffix == ".jpg" and jpg_ds.items[0][1].suffix == ".png"
    assert jpg_ds.load(0)[0].shape == (3, 24, 32)


def test_gas_eval_scores_the_test_split(tmp_path: Path) -> None:
    make_camvid(tmp_path / "cv")
    layout = NetworkLayout(num_cells=4, reduction_cells=(1, 3), stem_channels=(8, 8, 8), head_channels=16,
                           num_classes=11)
    from gas_core.genotype import random_genotype

    g = tmp_path / "g.json"
    g.write_text(random_genotype(layout, torch.Generator().manual_seed(0)).to_json())
    runner = CliRunner()
    r = runner.invoke(train_app, [str(a) for a in (g, "--dataset", "camvid", "--data-root", tmp_path / "cv",
                                                  "--input-size", 12, 16, "--downscale", 2, "--epochs", 1, "--batch", 2,
                                                  "--workers", 0, "--quiet", "--out", tmp_path / "run")])
    assert r.exit_code == 0, r.output
    import shutil

    for sub in ("train", "trainannot", "val", "valannot"):  # a root that holds only the test split
        shutil.rmtree(tmp_path / "cv" / sub)
    r = runner.invoke(eval_app, [str(a) for a in (tmp_path / "run" / "last.pt", "--dataset", "camvid", "--data-root",
                                                 tmp_path / "cv", "--split", "test", "--out", tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["split"] == "test" and report["images"] == 3 and report["input_size"] == [12, 16]
    # where the figures come from: the root's name (not its path), the downscale the checkpoint was
    # trained with, labels at their native 24×32 (logits upsampled from 12×16)
    assert (report["data_root"], report["downscale"], report["batch"]) == ("cv", 2, 1)
    assert (report["label_resolution"], report["label_size"]) == ("native", [24, 32])
    conf = torch.tensor(report["confusion"])
    assert conf.shape == (11, 11) and int(conf.sum()) > 0  # every labelled (non-void) pixel of 3 images at 24×32
    assert int(conf.sum()) <= 3 * 24 * 32
    assert report["pixel_accuracy"] == pytest.approx(float(conf.diag().sum() / conf.sum()))
    rows = conf.sum(1)
    acc = [float(conf[i, i] / rows[i]) for i in range(11) if rows[i] > 0]
    assert report["mean_class_accuracy"] == pytest.approx(sum(acc) / len(acc))
    assert list(report["per_class_accuracy"]) == list(report["per_class_iou"])
    r = runner.invoke(eval_app, [str(a) for a in (tmp_path / "run" / "last.pt", "--dataset", "camvid", "--data-root",
                                                 tmp_path / "cv", "--split", "test", "--label-resolution", "input",
                                                 "--batch", 3, "--out", tmp_path / "ev2")])
    assert r.exit_code == 0, r.output
    small = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert (small["label_resolution"], small["label_size"], small["batch"]) == ("input", [12, 16], 3)
    assert int(torch.tensor(small["confusion"]).sum()) < int(conf.sum())  # a quarter of the pixels
    r = runner.invoke(eval_app, [str(tmp_path / "run" / "last.pt"), "--split", "test", "--out", str(tmp_path / "e2")])
    assert r.exit_code == 2 and "no test split" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_random_b_matches_the_target_latency_on_a_fixed_table() -> None:
    layout = NetworkLayout(num_classes=11)
    L = torch.linspace(1, 50, 8).expand(*layout.alpha_shape).clone()  # ops from cheap to dear, same in every cell
    term = LatencyTerm(L, fixed=1000.0)

    def table_ms(g: Genotype) -> float:
        return float(term.total(g.one_hot())) / 1e3

    g, how, draws = draw_random(layout, term, table_ms, 0, target_ms=2.8)  # about the uniform mean
    assert abs(table_ms(g) / 2.8 - 1) <= 0.05 and how == "uniform" and draws >= 1
    g, how, _ = draw_random(layout, term, table_ms, 0, target_ms=1.6)  # 6 σ below the uniform mean (2.8 ms)
    assert abs(table_ms(g) / 1.6 - 1) <= 0.05 and how == "dirichlet(0.5)"
    with pytest.raises(RuntimeError, match="no random genotype"):
        draw_random(layout, term, table_ms, 0, target_ms=0.5, tries=50)


def test_collapse_counts_cells_whose_edges_agree() -> None:
    layout = NetworkLayout(num_classes=11)
    ops = [["conv_3x3"] * 5 if k % 2 else ["conv_3x3", "skip_connect", "none", "conv_3x3", "conv_3x3"]
           for k in range(layout.num_cells)]
    g = Genotype.model_validate({"layout": layout.model_dump(), "cells": [
        {"type": "reduction" if layout.is_reduction(k) else "normal", "edges": e} for k, e in enumerate(ops)]})
    c = collapse(g)
    assert c["share"] == 0.5 and c["cells"] == list(range(1, 14, 2))


@pytest.mark.slow
def test_study_orchestration_runs_two_networks_and_resume_skips_them(tmp_path: Path) -> None:
    """The tiny scale: table, one GAS search, one latency-matched random net, both trained for one
    step and timed; a second sitting finds every run finished and reruns none."""
    make_camvid(tmp_path / "cv", h=32, w=48)
    out = tmp_path / "study"
    assert main(["--scale", "tiny", "--data-root", str(tmp_path / "cv"), "--out", str(out), "--quiet"]) == 0
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    trained = ["train-search-gas-s0", "train-random-b0", "train-partner-gas-s0"]
    assert set(runs) == {"table-r2", "search-gas-s0", "random-b0", "measure-r2", "partner-gas-s0", *trained,
                         *(f"evalboth-{t}" for t in trained)}
    assert (out / "tables" / "table-r2.json").is_file()  # the pinned table travels with the results
    assert abs(runs["random-b0"]["table_ms"] / runs["search-gas-s0"]["table_ms"] - 1) <= 0.05
    for name in trained:
        assert runs[name]["eval"]["split"] == "val" and (out / runs[name]["checkpoint"]).is_file()
        half = torch.load(out / runs[name]["checkpoint"], weights_only=False)
        assert all(v.dtype == torch.float16 for v in half["model"].values() if v.is_floating_point())
        both = runs[f"evalboth-{name}"]
        assert both["native"]["label_size"] == both["input"]["label_size"] == [32, 48]  # tiny: input = native
    m = runs["measure-r2"]
    timed = {n["name"]: n for n in m["networks"]}
    assert set(timed) == {"search-gas-s0", "random-b0", "uniform-u0", "uniform-u1", "uniform-u2"}
    assert all(len(n["rounds_ms"]) == 3 and n["median_ms"] > 0 for n in timed.values())
    assert m["rounds"] == 3 and len(m["order"]) == 3 and m["sitting_table"]
    p = runs["partner-gas-s0"]
    assert p["source"] == "search-gas-s0" and abs(p["params"] / p["source_params"] - 1) <= 0.10
    assert p["candidates"] and p["draw"] == p["candidates"][0]["draw"]  # any candidate matches at tiny tolerance
    assert (out / "report.md").is_file() and (out / "table3_scatter.png").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert main(["--scale", "tiny", "--data-root", str(tmp_path / "cv"), "--out", str(out), "--quiet"]) == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}


@pytest.mark.slow
def test_study_started_in_the_background_stops_on_sigint(tmp_path: Path) -> None:
    """A script's ``study &`` inherits SIGINT ignored (no job control); the study must still stop
    on ``kill -INT`` as on Ctrl-C: exit 130, its resume hint, and its service stopped with it."""
    make_camvid(tmp_path / "cv", h=32, w=48)
    log = tmp_path / "study.log"
    cmd = [sys.executable, "-m", "bench.camvid_study", "--scale", "tiny", "--data-root", str(tmp_path / "cv"),
           "--out", str(tmp_path / "out"), "--quiet"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 120
        while "run table" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        service = child_pids(proc.pid)
        assert proc.poll() is None and service, log.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            for pid in child_pids(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
    assert "run the same command again to resume" in log.read_text()
    assert not [p for p in service if running(p)]


def test_study_refuses_a_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--scale", "tiny", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1


def test_ggm_share_separates_a_common_push_from_per_edge_ones() -> None:
    from bench.camvid_study import ggm_share

    alpha = torch.randn(3, 5, 8)
    same = alpha + torch.tensor([0, 0, 3.0, 0, 0, 0, 0, 0])  # one op pushed on every edge
    per_edge = alpha + torch.eye(5, 8)  # a different op on each edge
    assert ggm_share(alpha, same)["common"] == pytest.approx([1.0] * 3)
    assert max(ggm_share(alpha, per_edge)["common"]) < 0.3
    assert ggm_share(alpha, same)["gain"][0] == pytest.approx(3.0 * 5**0.5 / float(alpha[0].norm()), rel=1e-5)


def test_search_fits_on_train_only_and_val_only_reports(tmp_path: Path) -> None:
    """Two searches that differ only in their val set end with the same α, GGM and weights: val
    never reaches a gradient, the BN statistics the search goes on with, or the derived net."""
    from search_client.data import Synthetic
    from search_client.search import SearchConfig, search
    from tests.ddp_search import LAYOUT, term_for

    train, val = build_datasets("synthetic", None, (32, 48), 0, (8, 2))
    other_val = Synthetic(3, (64, 64), val.augment, 0, split_seed=7)
    term = term_for(LAYOUT, (32, 48))
    cfg = SearchConfig(epochs=2, batch=4, seed=1, beta=0.05, max_steps=2, lr_a=0.01)
    a = search(cfg, LAYOUT, train, val, term, tmp_path / "a", progress=False)
    b = search(cfg, LAYOUT, train, other_val, term, tmp_path / "b", progress=False)
    sa, sb = a.supernet.state_dict(), b.supernet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and a.genotype == b.genotype
    assert a.history[-1]["val_miou"] != b.history[-1]["val_miou"]  # the report did see each val set
