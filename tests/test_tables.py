"""Tables across devices: comparison maths, ``/compare``, ``gas-table`` (devices, show, compare,
export, import) against a real server, and ``gas-search --predict-on``'s prediction helper."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gas_core.genotype import random_genotype
from gas_core.latency import predict_latency_us
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.table import LatencyTable, compare_tables, kendall_tau, spearman
from latency_service.testing import Server, wait_job
from search_client.cli import predict_on_devices
from search_client.client import LatencyClient
from search_client.table_cli import app

TINY = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=16, num_classes=4)
TINY_REQ = {"layout": TINY.model_dump(mode="json"), "input_size": [32, 48]}
runner = CliRunner()


def test_rank_correlations_by_hand() -> None:
    """Values worked out by hand: one swapped pair of four (ρ = 1 − 6·2/60 = 0.8, τ = 4/6), and a
    tie on one side (τ-b's denominator shrinks, ρ on average ranks)."""
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(3 * 2))
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254, abs=1e-6)
    assert spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1) and kendall_tau([3, 2, 1], [1, 2, 3]) == pytest.approx(-1)


def test_rank_correlations_undefined_cases() -> None:
    assert kendall_tau([1.0], [2.0]) is None and spearman([1.0], [2.0]) is None
    assert kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    with pytest.raises(ValueError):
        kendall_tau([1.0, 2.0], [1.0])


def test_compare_tables_counts_and_ratios() -> None:
    a = {"k1": ("conv", 10.0), "k2": ("conv", 20.0), "k3": ("pool", 4.0), "only-a": ("pool", 1.0), "z": ("skip", 0.0)}
    b = {"k1": ("conv", 30.0), "k2": ("conv", 60.0), "k3": ("pool", 2.0), "only-b": ("pool", 1.0), "z": ("skip", 0.1)}
    c = compare_tables(a, b)
    assert (c.common_keys, c.only_a, c.only_b) == (4, 1, 1)
    assert c.per_op["conv"].geomean_ratio == pytest.approx(3.0)
    assert c.per_op["pool"].min_ratio == c.per_op["pool"].max_ratio == pytest.approx(0.5)
    assert c.per_op["skip"].keys == 1 and c.per_op["skip"].geomean_ratio is None  # 0 µs: no ratio
    assert c.geomean_ratio == pytest.approx((3 * 3 * 0.5) ** (1 / 3))
    assert [k.key for k in c.keys if k.ratio is None] == ["z"]


def _cli(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def _other_device(export: dict, slug: str, factor: float, shift: timedelta = timedelta()) -> dict:
    """The same keys as a second device: every latency × ``factor`` (samples too), rows ``shift`` later."""
    out = json.loads(json.dumps(export))
    out["device"] = {**out["device"], "slug": slug, "name": f"{factor}x of {export['device']['name']}"}
    for e in out["entries"]:
        for f in ("median_us", "p10_us", "p90_us", "mean_us", "std_us"):
            e[f] *= factor
        e["samples_us"] = [x * factor for x in e["samples_us"]]
        e["created_at"] = (datetime.fromisoformat(e["created_at"]) + shift).isoformat()
    return out


@pytest.mark.slow
def test_gas_table_export_import_compare(server: Server, tmp_path: Path) -> None:
    url = ["--latency-url", server.url]
    with server.client() as c:
        wait_job(c, c.post("/profile", json=TINY_REQ).json()["id"])
        slug = c.get("/device").json()["device"]["slug"]
        env = c.get("/device").json()["environment"]["fingerprint"]
    n = len(cell_shapes(TINY, (32, 48)).all_keys())

    code, out = _cli("devices", *url)
    assert code == 0 and slug in out and env in out
    code, out = _cli("show", f"{slug}@{env}", *url, "--op", "conv_3x3", "--sort", "median")
    assert code == 0 and "conv_3x3" in out and "sep_conv" not in out

    # export: the artefact, with identity, method and every raw sample; and CSV
    path = tmp_path / "a.json"
    code, out = _cli("export", slug, *url, "--out", str(path))
    assert code == 0 and f"wrote {n} rows" in out
    exported = json.loads(path.read_text())
    table = LatencyTable.model_validate(exported)
    assert table.kind == "gas-latency-table" and table.schema_version == 1
    assert table.device.slug == slug and table.environment.fingerprint == env and len(table.entries) == n
    assert all(len(e.samples_us or []) == e.n_samples and e.method for e in table.entries)
    code, out = _cli("export", slug, *url, "--format", "csv", "--out", str(tmp_path / "a.csv"))
    assert code == 0 and len((tmp_path / "a.csv").read_text().strip().splitlines()) == n + 1

    # import a second device: the same keys at 2× — added; the same file again — skipped
    double = tmp_path / "double.json"
    double.write_text(json.dumps(_other_device(exported, "test-double", 2.0)))
    code, out = _cli("import", str(double), *url)
    assert code == 0, out
    assert f"{n} added, 0 replaced, 0 kept, 0 skipped (new device and environment)" in out
    code, out = _cli("import", str(double), *url)
    assert code == 0 and f"0 added, 0 replaced, 0 kept, {n} skipped" in out

    # an older export (3×, an hour earlier) never rolls the table back; --force does
    older = tmp_path / "older.json"
    older.write_text(json.dumps(_other_device(exported, "test-double", 3.0, timedelta(hours=-1))))
    code, out = _cli("import", str(older), *url)
    assert code == 0 and f"0 added, 0 replaced, {n} kept, 0 skipped" in out
    with server.client() as c:
        assert c.get("/table/test-double").json()["entries"][0]["median_us"] == pytest.approx(
            2 * exported["entries"][0]["median_us"])
    # a newer one (4×, two minutes later: within the allowed clock skew, not in the future) replaces
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(_other_device(exported, "test-double", 4.0, timedelta(minutes=2))))
    code, out = _cli("import", str(newer), *url)
    assert code == 0 and f"0 added, {n} replaced, 0 kept, 0 skipped" in out
    code, out = _cli("import", str(double), *url, "--force")
    assert code == 0 and f"0 added, {n} replaced, 0 kept, 0 skipped" in out  # back to 2×

    # compare: route and CLI (printed summary, PNG, JSON)
    with server.client() as c:
        r = c.get("/compare", params={"devices": f"{slug},test-double"})
        assert r.status_code == 200, r.text
        pair = r.json()["pairs"][0]
    assert pair["common_keys"] == n and pair["only_a"] == pair["only_b"] == 0
    positive = [k for k in pair["keys"] if k["ratio"] is not None]
    off = [k for k in positive if k["ratio"] != pytest.approx(2.0)]
    assert positive and not off, off
    assert pair["geomean_ratio"] == pytest.approx(2.0)
    assert pair["spearman"] == pytest.approx(1.0) and pair["kendall"] == pytest.approx(1.0)
    assert pair["per_op"]["conv_3x3"]["geomean_ratio"] == pytest.approx(2.0)
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    code, out = _cli("compare", slug, "test-double", *url, "--plot", str(png), "--json", str(js))
    assert code == 0, out
    assert "geomean ratio B/A 2.000" in out and "Kendall τ 1.000" in out and "conv_3x3" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and json.loads(js.read_text())["pairs"][0]["common_keys"] == n

    # --predict-on's helper: the derived net on the other table is exactly 2× this one's
    g = random_genotype(TINY, torch.Generator().manual_seed(3))
    with LatencyClient(server.url) as client:
        preds = predict_on_devices(client, [slug, "test-double", f"test-double@{env}"], g, (32, 48), 1, "float32",
                                   "contiguous")
        lacking = predict_on_devices(client, ["test-double"], g, (40, 40), 1, "float32", "contiguous")
    own = predict_latency_us(g, cell_shapes(TINY, (32, 48)), table.lookup()) / 1e3
    assert preds[0].predicted_ms == pytest.approx(own)
    assert preds[1].predicted_ms == pytest.approx(2 * own) and preds[2].predicted_ms == pytest.approx(2 * own)
    assert lacking[0].predicted_ms is None and lacking[0].missing_keys > 0


def test_compare_and_import_reject_bad_input(server: Server, tmp_path: Path) -> None:
    url = ["--latency-url", server.url]
    with server.client() as c:
        wait_job(c, c.post("/profile", json=TINY_REQ).json()["id"])
        slug = c.get("/device").json()["device"]["slug"]
        before = c.get(f"/table/{slug}", params={"samples": True}).json()
        assert c.get("/compare", params={"devices": slug}).status_code == 422
        assert c.get("/compare", params={"devices": f"{slug},{slug}"}).status_code == 422
        assert c.get("/compare", params={"devices": ",".join([slug] * 9)}).status_code == 422
        assert c.get("/compare", params={"devices": f"{slug},nope"}).status_code == 404
        assert c.get("/compare", params={"devices": f"{slug},{slug}@0000"}).status_code == 404

        # inconsistent rows: the whole import is refused and nothing changes
        bad = json.loads(json.dumps(before))
        bad["entries"][0]["median_us"] = 1.0
        bad["entries"][1]["key_hash"] = "0" * 32
        bad["entries"][2]["samples_us"] = None
        r = c.post("/table/import", json=bad)
        assert r.status_code == 422 and "entries[1]" in r.text and "entries[2]" in r.text
        edited = json.loads(json.dumps(before))
        edited["environment"]["info"]["threads"] = 64
        assert "fingerprint" in c.post("/table/import", json=edited).text
        clash = json.loads(json.dumps(before))
        clash["device"]["kind"] = "cuda"
        clash["entries"][0]["created_at"] = datetime.now(UTC).isoformat()
        assert c.post("/table/import", json=clash).status_code == 409
        assert c.get(f"/table/{slug}", params={"samples": True}).json() == before

    # the CLI: wrong kind / version / not JSON / missing file → exit 2 with a message
    for name, text, needle in [
        ("v2.json", json.dumps({**before, "schema_version": 2}), "schema_version 2"),
        ("geno.json", json.dumps({"schema_version": 1, "cells": []}), "not a GAS latency table"),
        ("junk.json", "{not json", "is not JSON"),
    ]:
        (tmp_path / name).write_text(text)
        code, out = _cli("import", str(tmp_path / name), *url)
        assert code == 2 and needle in out, out
    code, out = _cli("import", str(tmp_path / "absent.json"), *url)
    assert code == 2 and "cannot read" in out
    (tmp_path / "table.bin").write_bytes(bytes(range(256)) * 4)
    code, out = _cli("import", str(tmp_path / "table.bin"), *url)
    assert code == 2 and "table.bin is not a text file" in out and "\n" not in out.strip(), out
    code, out = _cli("compare", slug, "nope", *url)
    assert code == 1 and "unknown device" in out
    code, out = _cli("show", "@env", *url)
    assert code == 2
