"""gas-train, gas-eval, gas-export: a trained network well above chance, the dataset paths on
generated fixtures in their official layouts, online bootstrapping, the BN-folded export, and
one-line errors with exit status 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gas_core.genotype import CellGenotype, Genotype, random_genotype
from gas_core.network import GASNet
from gas_core.runtimes import fold_batchnorm
from gas_core.search_space import NetworkLayout
from search_client.data import CAMVID_CLASSES, CITYSCAPES_CLASSES, IGNORE, build_datasets
from search_client.export import TOLERANCE, export
from search_client.metrics import confusion_metric, miou, summed_confusion
from search_client.train import bootstrapped_ce
from search_client.train_cli import eval_app, export_app, train_app
from tests.test_search_client import make_camvid, make_cityscapes

runner = CliRunner()


def _genotype(num_classes: int, path: Path, seed: int = 0) -> Path:
    layout = NetworkLayout(num_cells=4, reduction_cells=(1, 3), stem_channels=(8, 8, 8), head_channels=16,
                           num_classes=num_classes)
    cells = tuple(CellGenotype(type="reduction" if layout.is_reduction(k) else "normal",
                               edges=("skip_connect", "sep_conv_3x3", "none", "skip_connect", "conv_3x3"))
                  for k in range(layout.num_cells))
    g = Genotype(layout=layout, cells=cells) if seed == 0 else random_genotype(layout, torch.Generator().manual_seed(seed))
    path.write_text(g.to_json())
    return path


def _run(app, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_bootstrapping_keeps_the_stated_fraction() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target.view(-1)[:28] = IGNORE  # 100 labelled pixels of 128
    per_pixel = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none").flatten()
    valid = per_pixel[target.flatten() != IGNORE].sort(descending=True).values
    assert valid.numel() == 100
    assert bootstrapped_ce(logits, target, 0.25, 10) == pytest.approx(float(valid[:25].mean()))  # the fraction
    assert bootstrapped_ce(logits, target, 0.01, 10) == pytest.approx(float(valid[:10].mean()))  # the minimum
    assert bootstrapped_ce(logits, target, 0.25, 1000) == pytest.approx(float(valid.mean()))  # capped at all
    assert bootstrapped_ce(logits, target, 1.0, 1) == pytest.approx(float(valid.mean()))  # plain cross-entropy


def test_bn_folded_exports_equal_eager(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    g = Genotype.model_validate_json(_genotype(4, tmp_path / "g.json", seed=3).read_text())
    torch.manual_seed(0)
    net = GASNet(g)
    for m in net.modules():  # non-trivial statistics, or folding would be tested on identities
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    folded, n = fold_batchnorm(net)

    def bns(m: torch.nn.Module) -> int:
        return sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())

    assert n > 10 and bns(folded) == bns(net) - n  # the rest (FactorizedReduce's) follow no conv directly
    x = torch.randn(3, 3, 32, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5, rtol=1e-4)
    art = export(net, g, (32, 64), tmp_path / "exp", host="test", runs=3)
    assert [c.format for c in art.checks] == ["onnx", "torchscript"]
    assert all(c.passed and c.max_rel_diff <= TOLERANCE for c in art.checks), art.checks
    assert set(art.timing_ms) == {"eager", "eager_bn_folded", "onnxruntime"}
    import onnxruntime as ort  # dynamic batch: a batch of 5 runs through the file exported at 2

    sess = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"image": torch.randn(5, 3, 32, 64).numpy()})[0].shape == (5, 4, 32, 64)
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["batchnorm_folded"] == n


@pytest.mark.slow
def test_train_eval_export_on_synthetic_data_learns(tmp_path: Path) -> None:
    geno = _genotype(4, tmp_path / "g.json")
    out = tmp_path / "run"
    code, text = _run(train_app, geno, "--dataset", "synthetic", "--input-size", 64, 128, "--epochs", 6, "--batch", 8,
                      "--lr", 0.05, "--synthetic-size", 64, 16, "--workers", 0, "--quiet", "--out", out)
    assert code == 0, text
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # poly decay
    _, val = build_datasets("synthetic", None, (64, 128), 0, (64, 16))
    y = torch.stack([val[i][1] for i in range(len(val))])
    metric = confusion_metric(4, "cpu")
    metric.update(torch.zeros_like(y), y)  # everything background
    baseline = miou(summed_confusion(metric))
    assert float(rows[-1]["val_miou"]) > baseline + 0.25, (rows[-1], baseline)

    code, text = _run(train_app, geno, "--dataset", "synthetic", "--input-size", 64, 128, "--epochs", 7, "--batch", 8,
                      "--lr", 0.05, "--synthetic-size", 64, 16, "--workers", 0, "--quiet", "--out", out, "--resume")
    assert code != 0 and "another genotype or recipe" in text  # a different recipe never resumes silently

    code, text = _run(eval_app, out / "last.pt", "--dataset", "synthetic", "--flip", "--scale", 1.0, "--scale", 0.75,
                      "--out", tmp_path / "eval")
    assert code == 0, text
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert list(report["per_class_iou"]) == ["background", "disc", "rectangle", "stripes"]
    assert report["miou"] > baseline + 0.25 and report["flip"] and report["scales"] == [1.0, 0.75]
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    code, text = _run(export_app, out / "last.pt", "--input-size", 64, 128, "--runs", 3, "--out", tmp_path / "exp")
    assert code == 0, text
    assert "onnx" in text and "FAILED" not in text and "onnxruntime" in text

    # --init from the trained checkpoint: every tensor matches by name and shape
    code, text = _run(train_app, geno, "--epochs", 1, "--batch", 8, "--input-size", 64, 128, "--synthetic-size", 16, 8,
                      "--workers", 0, "--quiet", "--init", out / "last.pt", "--out", tmp_path / "init")
    assert code == 0, text


@pytest.mark.parametrize("dataset", ["cityscapes", "camvid"])
def test_dataset_paths_on_official_layouts(dataset: str, tmp_path: Path) -> None:
    root = tmp_path / dataset
    (make_cityscapes if dataset == "cityscapes" else make_camvid)(root)
    classes = CITYSCAPES_CLASSES if dataset == "cityscapes" else CAMVID_CLASSES
    geno = _genotype(len(classes), tmp_path / "g.json")
    code, text = _run(train_app, geno, "--dataset", dataset, "--data-root", root, "--input-size", 16, 32, "--epochs", 1,
                      "--batch", 2, "--workers", 0, "--quiet", "--out", tmp_path / "run")
    assert code == 0, text
    import shutil

    for train_dir in (["leftImg8bit/train", "gtFine/train"] if dataset == "cityscapes" else ["train", "trainannot"]):
        shutil.rmtree(root / train_dir)  # gas-eval reads only the split it scores
    code, text = _run(eval_app, tmp_path / "run" / "last.pt", "--dataset", dataset, "--data-root", root,
                      "--out", tmp_path / "eval")
    assert code == 0, text
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert tuple(report["per_class_iou"]) == classes and report["input_size"] == [16, 32]
    assert report["split"] == "val" and report["label_resolution"] == "native"


def test_bad_inputs_are_one_line_and_exit_2(tmp_path: Path) -> None:
    geno4 = _genotype(4, tmp_path / "g4.json")
    code, text = _run(train_app, geno4, "--dataset", "cityscapes", "--data-root", tmp_path / "nowhere")
    assert code == 2 and str(tmp_path / "nowhere" / "leftImg8bit" / "train") in text and "Traceback" not in text
    make_cityscapes(tmp_path / "cs")
    code, text = _run(train_app, geno4, "--dataset", "cityscapes", "--data-root", tmp_path / "cs")
    assert code == 2 and "predicts 4 classes but cityscapes has 19" in text and len(text.strip().splitlines()) == 1
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    code, text = _run(eval_app, tmp_path / "junk.pt")
    assert code == 2 and "not a readable torch checkpoint" in text and "Traceback" not in text
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    code, text = _run(export_app, tmp_path / "foreign.pt", "--input-size", 8, 8)
    assert code == 2 and "not a gas-train checkpoint" in text
    (tmp_path / "bad.json").write_text("{}")
    code, text = _run(train_app, tmp_path / "bad.json")
    assert code == 2 and "not a GAS genotype" in text


@pytest.mark.slow
def test_torchrun_training_matches_one_process_accumulating(tmp_path: Path) -> None:
    """gas-train under torchrun (2 gloo ranks, 2 images each) reaches the same weights as one
    process accumulating the same 2 micro-batches of 2: the search's sampler and DDP, reused."""
    import socket
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    geno = _genotype(4, tmp_path / "g.json")
    common = [str(geno), "--dataset", "synthetic", "--input-size", "32", "64", "--epochs", "1", "--max-steps", "2",
              "--batch", "4", "--synthetic-size", "16", "4", "--workers", "0", "--device", "cpu", "--quiet"]
    env = {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "search_client.train_cli", *common, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "search_client.train_cli", *common, "--accum", "2", "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    params = {n for n, _ in GASNet(Genotype.model_validate(a["genotype"])).named_parameters()}
    assert a["step"] == b["step"] == 2
    for n in params:  # BN running statistics differ by design (per rank vs per micro-batch); weights do not
        assert torch.allclose(a["model"][n], b["model"][n], atol=1e-5, rtol=1e-4), n
