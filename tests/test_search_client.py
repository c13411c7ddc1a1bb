"""search_client: datasets in their official layouts, the HTTP client, the search loop, the
gas-search CLI against a live service, and DDP equivalence under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from gas_core.genotype import Genotype, random_genotype
from gas_core.ops import PRIMITIVES
from gas_core.search_space import NetworkLayout
from gas_core.supernet import Supernet
from latency_service.testing import Server, stop_server
from search_client.cli import fetch_latency_term
from search_client.client import LatencyClient, ServiceError
from search_client.data import (
    CITYSCAPES_ID_TO_TRAIN,
    IGNORE,
    Augment,
    CamVid,
    Cityscapes,
    DataRootError,
    Synthetic,
    augment_by_interpolate,
    build_datasets,
)
from search_client.metrics import class_iou, confusion_metric, miou, summed_confusion
from search_client.search import SearchConfig, search
from tests.support import start_server

REPO = Path(__file__).resolve().parent.parent
SMALL = NetworkLayout(num_cells=4, reduction_cells=(1, 3), stem_channels=(8, 8, 8), head_channels=8, num_classes=4)


# ---------------------------------------------------------------- data


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_cityscapes(root: Path, h: int = 24, w: int = 48) -> None:
    rng = np.random.default_rng(0)
    ids = np.array(list(CITYSCAPES_ID_TO_TRAIN) + [0, 1, 4, 255], dtype=np.uint8)
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for city in cities:
            for n in range(2):
                stem = f"{city}_{n:06d}_000019"
                _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                     rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", rng.choice(ids, (h, w)))


def make_camvid(root: Path, h: int = 24, w: int = 32) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        for n in range(3):
            _png(root / split / f"0001TP_{n:06d}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            _png(root / f"{split}annot" / f"0001TP_{n:06d}.png", rng.integers(0, 12, (h, w), dtype=np.uint8))


def test_cityscapes_layout_and_train_ids(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    ds = Cityscapes(tmp_path, "train", Augment((16, 16), True))
    assert len(ds) == 4 and ds.num_classes == 19
    img, lbl = ds.load(0)
    raw = np.asarray(Image.open(ds.items[0][1]))
    expect = np.vectorize(lambda v: CITYSCAPES_ID_TO_TRAIN.get(int(v), IGNORE))(raw)
    assert np.array_equal(lbl.numpy(), expect)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y.shape == (16, 16) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= set(range(19)) | {IGNORE}
    val = Cityscapes(tmp_path, "val", Augment((12, 24), False))
    assert len(val) == 2 and val[1][0].shape == (3, 12, 24)


def test_camvid_layout_and_void(tmp_path: Path) -> None:
    make_camvid(tmp_path)
    ds = CamVid(tmp_path, "train", Augment((16, 16), True))
    assert len(ds) == 3 and ds.num_classes == 11
    _, lbl = ds.load(0)
    raw = np.asarray(Image.open(ds.items[0][1]))
    assert (lbl.numpy()[raw == 11] == IGNORE).all() and (lbl.numpy()[raw < 11] == raw[raw < 11]).all()
    tr, va = build_datasets("camvid", tmp_path, (16, 16), 0)
    assert len(tr) == 3 and len(va) == 3


def test_wrong_data_root_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match=str(tmp_path / "leftImg8bit" / "train")):
        Cityscapes(tmp_path, "train", Augment((8, 8), True))
    with pytest.raises(DataRootError, match="trainannot"):
        (tmp_path / "train").mkdir()
        CamVid(tmp_path, "train", Augment((8, 8), True))
    with pytest.raises(DataRootError, match="--data-root"):
        build_datasets("cityscapes", None, (8, 8), 0)


def test_augmentation_is_reproducible_and_in_range() -> None:
    ds = Synthetic(4, (40, 60), Augment((32, 32), True), seed=5)
    a, b = ds[1], ds[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a[0])
    assert a[0].shape == (3, 32, 32)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_computes_only_the_crop_yet_equals_resizing_the_whole_image(dtype: torch.dtype) -> None:
    """Sampling only the output pixels gives what resizing the whole image and cropping gives:
    every scale (down, up, ×2 exactly, padded when smaller than the crop), both flips, odd
    sizes, uint8 images as loaded from PNGs and float ones, and the validation resize."""
    g = torch.Generator().manual_seed(0)
    for h, w in ((37, 53), (64, 128), (20, 30)):
        raw = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        img = raw if dtype == torch.uint8 else raw.float() / 255
        lbl = torch.randint(0, 20, (h, w), generator=g, dtype=torch.uint8)
        for aug in (Augment((24, 40), True), Augment((24, 40), True, scale=(2.0, 2.0)),
                    Augment((48, 64), True, scale=(0.5, 0.75)), Augment((16, 24), False),
                    Augment((16, 24), False, keep_label=True)):
            for seed in range(12):
                got = aug(img, lbl, torch.Generator().manual_seed(seed))
                want = augment_by_interpolate(aug, img, lbl, torch.Generator().manual_seed(seed))
                assert got[0].dtype == torch.float32 and got[1].dtype == torch.long
                assert got[0].shape == want[0].shape and torch.allclose(got[0], want[0], atol=1e-5), (h, w, seed)
                assert torch.equal(got[1], want[1]), (h, w, seed)


def _conf(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    m = confusion_metric(num_classes, "cpu")
    m.update(pred, target)
    return summed_confusion(m)


def test_miou() -> None:
    y = torch.tensor([[0, 1], [1, IGNORE]])
    assert miou(_conf(torch.tensor([[0, 1], [1, 0]]), y, 2)) == 1.0
    assert miou(_conf(torch.tensor([[1, 1], [1, 1]]), y, 2)) == pytest.approx((0 + 2 / 3) / 2)
    assert torch.equal(_conf(torch.tensor([[1, 1], [0, 0]]), y, 2), torch.tensor([[0, 1], [1, 1]]))  # rows: truth


def test_miou_is_torchmetrics_macro_jaccard() -> None:
    """One convention: the mIoU of the accumulated matrix equals torchmetrics' macro Jaccard index
    (void ignored, a class in neither truth nor prediction left out, one in truth only scored 0)."""
    from torchmetrics.classification import MulticlassJaccardIndex

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 4, (3, 16, 16), generator=gen), torch.randint(0, 5, (3, 16, 16), generator=gen)
    target[0, :4] = IGNORE
    ref = MulticlassJaccardIndex(6, average="macro", ignore_index=IGNORE)(pred, target)
    assert miou(_conf(pred, target, 6)) == pytest.approx(float(ref), abs=1e-6)
    assert class_iou(_conf(pred, target, 6))[5] is None and class_iou(_conf(pred, target, 6))[4] == 0.0


# ---------------------------------------------------------------- client


def test_unreachable_service_is_one_clear_error() -> None:
    with LatencyClient("http://127.0.0.1:1", retries=1, backoff=0.01) as c, pytest.raises(ServiceError) as err:
        c.host()
    assert "unreachable" in str(err.value) and "\n" not in str(err.value)


def test_client_retries_5xx_with_backoff() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"device": {"slug": "s", "kind": "cpu", "name": "n"},
                                         "environment": {"fingerprint": "f"}, "torch_device": "cpu",
                                         "added_by_a_newer_service": 1})

    with LatencyClient("http://svc", backoff=0.01, transport=httpx.MockTransport(handler)) as c:
        waits: list[float] = []
        c.sleep = waits.append
        assert c.host().device.slug == "s"  # the API's own model, tolerant of fields it does not know
    assert len(calls) == 3 and waits == [0.01, 0.02]  # exponential backoff
    with LatencyClient("http://svc", transport=httpx.MockTransport(lambda r: httpx.Response(200, text="<html>"))) as c:
        with pytest.raises(ServiceError, match="GET /device: unexpected response") as err:
            c.host()
        assert "\n" not in str(err.value)
        with pytest.raises(ServiceError, match="POST /measure: dtype: Input should be"):
            c.measure(random_genotype(NetworkLayout(num_cells=3, reduction_cells=(1,)), torch.Generator().manual_seed(0)),
                      (32, 48), batch=1, dtype="float63", memory_format="contiguous")
    with LatencyClient("http://svc", retries=1, backoff=0.01,
                       transport=httpx.MockTransport(lambda r: httpx.Response(500, text="boom"))) as c:
        with pytest.raises(ServiceError, match="500"):
            c.host()


def test_client_retries_and_backoff_come_from_the_settings(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``GAS_CLIENT_RETRIES`` and ``GAS_CLIENT_BACKOFF_S`` reach every CLI's client; a bad value is
    one line naming the variable, not a traceback."""
    import typer

    from search_client.cli_common import latency_client

    monkeypatch.setenv("GAS_CLIENT_RETRIES", "2")
    monkeypatch.setenv("GAS_CLIENT_BACKOFF_S", "0.25")
    with latency_client("gas-x", "http://127.0.0.1:9", None) as c:
        assert (c.retries, c.backoff) == (2, 0.25)
    monkeypatch.setenv("GAS_CLIENT_RETRIES", "-1")
    with pytest.raises(typer.Exit) as exit_:
        latency_client("gas-x", "http://127.0.0.1:9", None)
    err = capsys.readouterr().err
    assert exit_.value.exit_code == 2 and err.startswith("gas-x: error: GAS_CLIENT_RETRIES:") and err.count("\n") == 1


def test_client_honours_retry_after() -> None:
    """A 503 with ``Retry-After: 7`` waits 7 s (recorded, not slept), not the 0.01 s backoff; a
    4xx is never retried."""
    answers = iter([httpx.Response(503, headers={"Retry-After": "7"}, json={"message": "busy"}),
                    httpx.Response(404, json={"schema_version": 1, "message": "unknown device 'x'", "detail": []})])
    with LatencyClient("http://svc", backoff=0.01, transport=httpx.MockTransport(lambda r: next(answers))) as c:
        waits: list[float] = []
        c.sleep = waits.append
        with pytest.raises(ServiceError, match="HTTP 404: unknown device 'x'$"):
            c.table("x")
    assert waits == [7.0]


# ---------------------------------------------------------------- search against a live service


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("svc")
    srv = start_server(f"sqlite:///{tmp / 'gas.db'}", tmp)
    yield srv
    stop_server(srv)


@pytest.mark.slow
def test_fetch_latency_term_profiles_missing_keys(live: Server) -> None:
    with LatencyClient(live.url) as c:
        term, slug = fetch_latency_term(c, None, SMALL, (32, 64), 1, "float32", "contiguous", progress=False)
        assert slug.startswith("cpu-") and term.L.shape == SMALL.alpha_shape and float(term.fixed) > 0
        assert (term.L >= 0).all() and (term.L[..., 0] == 0).all()  # 'none' costs nothing, nothing is negative
        # real timings: a tiny conv's paired (context) median can sit at the timer's floor, 0 µs, so
        # only "some conv was timed" is asserted, never a figure
        assert (term.L[..., PRIMITIVES.index("conv_3x3")] > 0).any()
        with pytest.raises(ServiceError, match="unknown"):
            fetch_latency_term(c, "no-such-device", SMALL, (32, 64), 1, "float32", "contiguous", progress=False)


@pytest.mark.slow
def test_beta_lowers_the_predicted_latency(live: Server, tmp_path: Path) -> None:
    """Same seed, real table of this host: a latency-weighted search ends cheaper.

    β = 2 rather than the paper's 0.005–0.05: at this size the β·log LAT gradient on α is far
    smaller than CE's (rms 4e-5 vs 6e-3 at β = 0.05), which needs ~10⁴ steps to show — the length
    of the paper's searches, not of a unit test. At β = 0.5 the outcome still hung on the table
    measured in the run (10 fresh tables: the derived LAT fell by less than 10 % in 3; one CI run
    failed); at β = 2 it fell to 0.35–0.51 × in 10 of 10. bench/beta_sweep.py covers the paper's values."""
    with LatencyClient(live.url) as c:
        term, _ = fetch_latency_term(c, None, SMALL, (32, 64), 1, "float32", "contiguous", progress=False)
    train, val = build_datasets("synthetic", None, (32, 64), 0, (16, 4))
    lat = {}
    for beta in (0.0, 2.0):
        cfg = SearchConfig(epochs=4, batch=4, seed=0, beta=beta, max_steps=8, lr_a=0.01)
        res = search(cfg, SMALL, train, val, term, tmp_path / f"b{beta}", progress=False)
        lat[beta] = (res.history[-1]["expected_lat_ms"], res.history[-1]["derived_lat_ms"])
    assert lat[2.0][0] < lat[0.0][0], lat  # expected LAT under softmax(α′)
    assert lat[2.0][1] < 0.9 * lat[0.0][1], lat  # LAT of the derived (argmax) network


def test_resume_continues_exactly(tmp_path: Path) -> None:
    from tests.ddp_search import LAYOUT, term_for

    train, val = build_datasets("synthetic", None, (32, 48), 0, (8, 2))
    term = term_for(LAYOUT, (32, 48))
    cfg = SearchConfig(epochs=3, batch=4, seed=1, beta=0.05, max_steps=2, lr_a=0.01)
    full = search(cfg, LAYOUT, train, val, term, tmp_path / "full", progress=False)
    search(cfg, LAYOUT, train, val, term, tmp_path / "cut", progress=False, until_epoch=1)
    resumed = search(cfg, LAYOUT, train, val, term, tmp_path / "cut", resume=True, progress=False)
    assert torch.allclose(full.supernet.alpha, resumed.supernet.alpha, atol=1e-6)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert len((tmp_path / "cut" / "search_log.csv").read_text().strip().splitlines()) == 4
    other = cfg.model_copy(update={"beta": 0.0})
    with pytest.raises(ValueError, match="another configuration"):
        search(other, LAYOUT, train, val, term, tmp_path / "cut", resume=True, progress=False)


def test_fp16_resumes_a_checkpoint_written_without_a_scaler() -> None:
    """A run without fp16 saves a disabled scaler's empty state; under fp16 (enabled scaler) it must
    resume with a fresh scale, not fail in torch (found on an H200: CPU checkpoint → cuda fp16)."""
    from search_client.runtime import restore_scaler

    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    fresh = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(saved)  # what resuming did before
    restore_scaler(fresh, saved)
    assert fresh.get_scale() == 1024.0
    restore_scaler(fresh, None)  # a checkpoint from before scalers were saved
    used = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    restore_scaler(fresh, used.state_dict())
    assert fresh.get_scale() == 8.0


def _gas_search(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search_client", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_gas_search_end_to_end(live: Server, tmp_path: Path) -> None:
    out = tmp_path / "run"
    slug = httpx.get(live.url + "/device").json()["device"]["slug"]
    r = _gas_search("--latency-url", live.url, "--input-size", "32", "64", "--epochs", "2", "--batch", "4",
                    "--max-steps", "2", "--synthetic-size", "8", "4", "--out", str(out), "--quiet",
                    "--predict-on", slug, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "predicted vs measured" in r.stdout
    g = Genotype.load(out / "genotype.json")
    assert g.layout.num_cells == 14 and g.layout.num_classes == 4
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["measured_median_ms"] > 0 and report["predicted_ms"] > 0
    assert report["fps"] == pytest.approx(1e3 / report["measured_median_ms"])
    # --predict-on this very device: the same table, so the same plain sum as /measure's prediction
    assert [p["device"] for p in report["predicted_on"]] == [slug]
    assert report["predicted_on"][0]["predicted_ms"] == pytest.approx(report["predicted_ms"], rel=1e-9)
    assert f"predicted on {slug}@" in r.stdout
    assert len((out / "search_log.csv").read_text().strip().splitlines()) == 3
    for png in ("alpha.png", "history.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_gas_search_to_a_target_end_to_end(live: Server, tmp_path: Path) -> None:
    """--target-fps (→ --target-ms) through the CLI: the search log carries T, and the derived
    network's table latency, as /measure predicts it, lies within ±5 % of T."""
    from gas_core.genotype import derive
    from gas_core.latency import predict_latency_us
    from gas_core.search_space import cell_shapes

    layout = NetworkLayout(num_classes=4)
    with LatencyClient(live.url) as c:
        term, slug = fetch_latency_term(c, None, layout, (32, 64), 1, "float32", "contiguous", progress=False)
        lookup = c.table(slug, dtype="float32", batch=1, memory_format="contiguous",
                         environment=c.host().environment.fingerprint).lookup()
    shapes = cell_shapes(layout, (32, 64))
    lo, hi = (predict_latency_us(derive(sign * term.L, layout), shapes, lookup) for sign in (-1, 1))
    target_ms = (lo + 0.4 * (hi - lo)) / 1e3
    out = tmp_path / "run"
    r = _gas_search("--latency-url", live.url, "--input-size", "32", "64", "--epochs", "1", "--batch", "4",
                    "--max-steps", "1", "--synthetic-size", "8", "4", "--out", str(out), "--quiet",
                    "--target-fps", f"{1e3 / target_ms:.6f}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    fit = report["target"]
    assert fit["within"] and fit["target_ms"] == pytest.approx(target_ms, rel=1e-5)
    assert abs(report["predicted_ms"] / target_ms - 1) <= 0.05, (report["predicted_ms"], target_ms)
    assert "target latency (table)" in r.stdout and (out / "target_fit.json").is_file()
    import csv

    rows = list(csv.DictReader((out / "search_log.csv").open()))
    assert float(rows[0]["target_ms"]) == pytest.approx(target_ms, rel=1e-5)
    r = _gas_search("--latency-url", live.url, "--target-fps", "30", "--target-ms", "20", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2 and "give one of them" in r.stderr


@pytest.mark.slow
def test_gas_search_errors_are_one_line(live: Server, tmp_path: Path) -> None:
    """Each bad invocation, as a real process: its exit code and one line naming the problem.
    The processes run side by side (each mostly imports torch)."""
    size = ("--input-size", "32", "64")
    fast_fail = {"GAS_CLIENT_RETRIES": "1", "GAS_CLIENT_BACKOFF_S": "0.01"}
    cases: list[tuple[tuple[str, ...], dict[str, str] | None, int, str]] = [
        (("--latency-url", "http://127.0.0.1:1", "--epochs", "1"), fast_fail, 1, "unreachable"),
        (("--latency-url", live.url, "--target", "no-such-device", *size), None, 1, "no-such-device"),
        (("--latency-url", live.url, "--device", "no-such-device", *size), None, 1,
         "reading 'no-such-device' as --target"),
        (("--latency-url", live.url, "--device", "cuda:7", *size), None, 2, "--device cuda:7"),
        (("--latency-url", live.url, "--runtime", "tvm", *size), None, 2, "--runtime 'tvm': must be one of eager"),
        (("--latency-url", live.url, "--epochs", "0", *size), None, 2,
         "--epochs: Input should be greater than or equal to 1"),
        (("--latency-url", live.url, "--predict-on", "no-such-gpu", *size), None, 1,
         "--predict-on: unknown device 'no-such-gpu'"),
        (("--latency-url", live.url, "--dataset", "cityscapes", "--data-root", str(tmp_path / "nope")), None, 2,
         "leftImg8bit"),
        (("--latency-url", live.url, "--batch", "5", "--accum", "2", *size, "--synthetic-size", "8", "4", "--quiet"),
         None, 2, "divisible"),
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda c: _gas_search(*c[0], cwd=tmp_path, env=c[1]), cases))
    for (args, _, code, says), r in zip(cases, results, strict=True):
        assert r.returncode == code and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])


@pytest.mark.slow
def test_ddp_matches_single_process_accumulation(tmp_path: Path) -> None:
    """torchrun with 2 gloo ranks (local batch 2) gives the same α and GGM weights as one process
    accumulating 2 micro-batches of 2 with the same per-slot Gumbel draws."""
    script = str(REPO / "tests" / "ddp_search.py")
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_port()), script, str(tmp_path / "ddp"), "1"], capture_output=True, text=True,
                         timeout=600, env=env, cwd=REPO)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, script, str(tmp_path / "one"), "2"], capture_output=True, text=True,
                         timeout=600, env=env, cwd=REPO)
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "ddp" / "alpha.pt")
    b = torch.load(tmp_path / "one" / "alpha.pt")
    from gas_core.supernet import Supernet
    from tests.ddp_search import LAYOUT

    torch.manual_seed(3)
    alpha0 = Supernet(LAYOUT).alpha.detach()
    assert (a["alpha"] - alpha0).abs().max() > 1e-3  # the steps really moved α
    assert torch.allclose(a["alpha"], b["alpha"], atol=1e-5), (a["alpha"] - b["alpha"]).abs().max()
    for k in a["ggm"]:
        assert torch.allclose(a["ggm"][k], b["ggm"][k], atol=1e-5), k
    # validation sharded over the 2 ranks (5 images: 3 + 2) with all-reduced confusion matrices
    # scores what the single process scores on all 5
    assert a["val_miou"] == pytest.approx(b["val_miou"], abs=1e-6) and a["val_miou"][0] > 0


def _port() -> int:
    from latency_service.testing import free_port

    return free_port()


def test_synthetic_data_is_learnable() -> None:
    """A derived GASNet trained for a few dozen steps segments the synthetic scenes far above
    the all-background baseline."""
    from gas_core.genotype import CellGenotype, Genotype
    from gas_core.network import GASNet

    torch.manual_seed(0)
    layout = NetworkLayout(num_classes=Synthetic.num_classes)
    cells = tuple(CellGenotype(type="reduction" if layout.is_reduction(k) else "normal",
                               edges=("skip_connect", "sep_conv_3x3", "none", "skip_connect", "conv_3x3"))
                  for k in range(layout.num_cells))
    net = GASNet(Genotype(layout=layout, cells=cells))
    train, val = build_datasets("synthetic", None, (64, 128), 0, (64, 16))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    from search_client.data import collate

    def score() -> float:
        net.eval()
        metric = confusion_metric(4, "cpu")
        with torch.no_grad():
            for i in range(0, len(val), 8):
                x, y = collate(val, range(i, i + 8))
                metric.update(net(x).argmax(1), y)
        net.train()
        return miou(summed_confusion(metric))

    _, y = collate(val, range(len(val)))
    baseline = miou(_conf(torch.zeros_like(y), y, 4))
    for epoch in range(5):
        train.set_epoch(epoch)
        for i in range(0, len(train), 8):
            x, y = collate(train, range(i, i + 8))
            loss = torch.nn.functional.cross_entropy(net(x), y, ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert score() > baseline + 0.3, (score(), baseline)


# ---------------------------------------------------------------- devices, data pipeline, paper defaults


def test_search_config_holds_the_papers_defaults_and_the_cli_reads_them() -> None:
    """§4.2: batch 16; α by Adam (lr 0.001, betas (0.5, 0.999), wd 1e-4); weights by SGD
    (momentum 0.9, wd 0.001, cosine 0.025 → 0.001); Gumbel λ 1.0 → 0.03; β = 0.005; GCN d = 64,
    γ = 0.5; 14 cells of N = 2 nodes, C = 8. The CLI's defaults are SearchConfig's, not copies."""
    import typer.main

    from search_client.cli import app
    from search_client.runtime import ComputeConfig

    c = SearchConfig()
    assert (c.batch, c.lr_a, c.betas_a, c.wd_a) == (16, 1e-3, (0.5, 0.999), 1e-4)
    assert (c.momentum, c.wd_w, c.lr_w, c.lr_w_min) == (0.9, 1e-3, 0.025, 0.001)
    assert (c.tau_start, c.tau_end, c.beta, c.ggm_dim, c.gamma) == (1.0, 0.03, 0.005, 64, 0.5)
    assert (c.cells, c.ggm, c.graph, c.warmup_epochs, c.accum) == ("independent", "gcn", "edge", 0, 1)
    assert SearchConfig(cells="shared").ggm == "none" and SearchConfig(cells="shared", ggm="fc").ggm == "fc"
    assert c.ggm_source == "alpha"  # eq. 5 feeds each link the previous cell's own α
    # a config stored before ggm_source existed was run with links chained through α′
    assert SearchConfig.model_validate({**c.model_dump(exclude={"ggm_source"}), "schema_version": 1}) == \
        c.model_copy(update={"ggm_source": "alpha_prime"})
    lay = NetworkLayout()
    assert (lay.num_cells, lay.nodes, lay.init_channels) == (14, 2, 8)
    params = {p.name: p for p in typer.main.get_command(app).params}
    for model in (SearchConfig, ComputeConfig):  # every field is a flag, its default and help the field's
        for name, f in model.model_fields.items():
            if name == "schema_version":
                assert name not in params
                continue
            default = params[name].default
            assert (tuple(default) if isinstance(default, list) else default) == f.default, name
            assert params[name].help == f.description, name
    assert params["ggm"].default is None  # resolved by SearchConfig from --cells
    assert params["device"].default == "auto" and params["amp"].default == "off"


def test_dataloader_yields_the_in_loop_batches() -> None:
    """Worker processes (persistent, across epochs) produce what the training process would make
    itself: the epoch travels with each index, so augmentation stays seeded by (seed, epoch,
    index). Labels are equal; images to float rounding (a worker runs torch on one thread, and
    bilinear resizing rounds differently with two: up to 7e-7 here)."""
    from search_client.data import collate
    from search_client.runtime import DistInfo, make_loaders, rank_micro_batches

    train, val = build_datasets("synthetic", None, (32, 48), 7, (12, 5))
    cfg = SearchConfig(batch=4, accum=2, seed=7)
    d = DistInfo(rank=1, world=2)  # rank 1's slice: micro-batches of 1, two per step
    loaders = make_loaders(cfg, train, val, d, torch.device("cpu"), workers=2)
    for epoch in (0, 1, 2):
        loaders.set_epoch(epoch)
        got = list(loaders.train)
        want = rank_micro_batches(len(train), cfg, d, epoch)
        assert len(got) == len(want) == 3 * 2
        train.set_epoch(epoch)
        for (x, y), idx in zip(got, want, strict=True):
            ex, ey = collate(train, [i for _, i in idx])
            assert torch.equal(y, ey) and torch.allclose(x, ex, rtol=0, atol=1e-5)
    assert [len(x) for x, _ in loaders.val] == [2]  # rank 1 of 2 scores val images 1 and 3 (its shard)
    x0, _ = next(iter(loaders.val))
    assert torch.allclose(x0, collate(val, [1, 3])[0], rtol=0, atol=1e-5)


def test_device_flags() -> None:
    from gas_core.devices import resolve_device
    from search_client.cli import parse_device_flags

    assert parse_device_flags("cuda:1", "cpu-x@abc") == ("cuda:1", "cpu-x@abc")
    assert parse_device_flags("cpu-intel-xeon-2t", None) == ("auto", "cpu-intel-xeon-2t")  # the old spelling
    with pytest.raises(ValueError, match="no longer names the table"):
        parse_device_flags("cpu-intel-xeon-2t", "other")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("fp16", False)])
def test_search_under_autocast_and_channels_last_runs_on_cpu(tmp_path: Path, amp: str, channels_last: bool) -> None:
    """The AMP / channels-last path is the loop's, not a branch: here on the CPU (fp16 with the
    gradient scaler), on CUDA in test_cuda_search_amp_and_checkpoint_moves."""
    from search_client.runtime import ComputeConfig
    from tests.ddp_search import LAYOUT, term_for

    train, val = build_datasets("synthetic", None, (32, 48), 0, (8, 2))
    cfg = SearchConfig(epochs=2, batch=4, seed=1, beta=0.05, max_steps=2, lr_a=0.05)
    res = search(cfg, LAYOUT, train, val, term_for(LAYOUT, (32, 48)), tmp_path, progress=False,
                 compute=ComputeConfig(device="cpu", amp=amp, channels_last=channels_last, workers=0))  # type: ignore[arg-type]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["val_miou"]) for h in res.history)
    assert res.supernet.alpha.dtype == torch.float32
    torch.manual_seed(1)
    assert not torch.equal(res.supernet.alpha, Supernet(LAYOUT).alpha)  # α moved


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_search_amp_and_checkpoint_moves(tmp_path: Path, amp: str) -> None:
    """A search on cuda:0 (supernet, term, batches and Gumbel noise there); its checkpoint resumes
    on the CPU, and a CPU checkpoint resumes on the GPU."""
    from search_client.runtime import ComputeConfig
    from tests.ddp_search import LAYOUT, term_for

    train, val = build_datasets("synthetic", None, (32, 48), 0, (8, 2))
    cfg = SearchConfig(epochs=2, batch=4, seed=1, beta=0.05, max_steps=2, lr_a=0.05)
    gpu = ComputeConfig(device="cuda:0", amp=amp, channels_last=True, workers=1)  # type: ignore[arg-type]
    cpu = ComputeConfig(device="cpu", workers=0)
    term = term_for(LAYOUT, (32, 48))
    res = search(cfg, LAYOUT, train, val, term, tmp_path / "a", compute=gpu, until_epoch=1, progress=False)
    assert res.supernet.alpha.device.type == "cuda" and math.isfinite(res.history[0]["loss"])
    moved = search(cfg, LAYOUT, train, val, term, tmp_path / "a", compute=cpu, resume=True, progress=False)
    assert moved.supernet.alpha.device.type == "cpu" and [h["epoch"] for h in moved.history] == [1, 2]
    search(cfg, LAYOUT, train, val, term, tmp_path / "b", compute=cpu, until_epoch=1, progress=False)
    back = search(cfg, LAYOUT, train, val, term, tmp_path / "b", compute=gpu, resume=True, progress=False)
    assert back.supernet.alpha.device.type == "cuda" and len(back.history) == 2


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; a GPU host runs the real check")
def test_gpu_check_without_a_gpu_says_so_and_exits_0() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "no CUDA device is visible" in r.stdout and "Exiting 0" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env={**env, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "nothing to check" in r.stdout


@pytest.mark.slow
def test_the_searched_deployment_travels_to_eval(live: Server, tmp_path: Path) -> None:
    """Issue 37: gas-eval measured float32, contiguous, eager whatever the search targeted. A
    search at batch 2, channels_last writes deployment.json; gas-train carries it beside its
    checkpoint; gas-eval --latency-url measures that deployment and says so."""
    from typer.testing import CliRunner

    from gas_core.wire import Deployment
    from search_client.train_cli import eval_app, train_app

    out = tmp_path / "run"
    r = _gas_search("--latency-url", live.url, "--input-size", "32", "64", "--latency-batch", "2", "--memory-format",
                    "channels_last", "--epochs", "1", "--batch", "4", "--max-steps", "1", "--synthetic-size", "8", "4",
                    "--out", str(out), "--quiet", "--no-measure", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dep = Deployment.model_validate_json((out / "deployment.json").read_text())
    assert dep == Deployment(input_size=(32, 64), batch=2, memory_format="channels_last")
    runner = CliRunner()
    trained = runner.invoke(train_app, [str(out / "genotype.json"), "--input-size", "32", "64", "--epochs", "1",
                                        "--batch", "4", "--synthetic-size", "8", "4", "--workers", "0", "--out",
                                        str(tmp_path / "t"), "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert Deployment.beside(tmp_path / "t" / "last.pt") == dep
    scored = runner.invoke(eval_app, [str(tmp_path / "t" / "last.pt"), "--synthetic-size", "8", "4", "--latency-url",
                                      live.url, "--out", str(tmp_path / "e")])
    assert scored.exit_code == 0, scored.output
    latency = json.loads((tmp_path / "e" / "eval.json").read_text())["latency"]
    assert Deployment.model_validate(latency["deployment"]) == dep
    assert "(2×3×32×64 float32 channels_last, runtime eager)" in scored.output


@pytest.mark.parametrize("name", sorted(__import__("search_client.data", fromlist=["DATASETS"]).DATASETS))
def test_every_registered_dataset_states_its_classes_and_splits(name: str, tmp_path: Path) -> None:
    """The dataset registry (issue 37): a flag's choices, the class names of eval.json and the
    splits come from one entry; a real dataset needs its root and names it."""
    from search_client.cli_common import known_dataset
    from search_client.data import DATASETS, DataRootError, build_eval_dataset

    spec = DATASETS[name]
    assert known_dataset(name) == name and len(spec.class_names) == spec.num_classes
    assert {"train", "val"} <= set(spec.splits)
    if spec.needs_root:
        with pytest.raises(DataRootError, match=f"--data-root is required for {name}"):
            build_eval_dataset(name, None, (32, 64))
    else:
        ds = build_eval_dataset(name, None, (32, 64), synthetic_size=3)
        assert len(ds) == 3 and ds.num_classes == spec.num_classes
        with pytest.raises(ValueError, match=f"--split test: the {name} dataset has no test split"):
            build_eval_dataset(name, None, (32, 64), "test")


def test_an_unknown_dataset_is_named_with_the_known_ones() -> None:
    import typer

    from search_client.cli_common import known_dataset
    from search_client.data import build_datasets

    with pytest.raises(typer.BadParameter, match="unknown dataset 'kitti'; use synthetic, cityscapes, camvid"):
        known_dataset("kitti")
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        build_datasets("kitti", None, (32, 64), 0)
