"""gas_core: ops, shapes, supernet, GGM, latency term, genotype, GASNet and export."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from gas_core.genotype import CellGenotype, Genotype, derive, random_genotype
from gas_core.ggm import GGM, EdgeGCN
from gas_core.keys import LatencyKey
from gas_core.latency import LatencyTerm, MissingLatencyKeys, derived_keys, latency_loss, predict_latency_us
from gas_core.network import GASNet
from gas_core.ops import (
    COMPONENTS,
    OPS,
    PRIMITIVES,
    Registry,
    build_component,
    build_timing_case,
    check_key,
    key_input_shapes,
    key_of_call,
)
from gas_core.search_space import NetworkLayout, cell_shapes
from gas_core.supernet import Supernet, default_ggm, gumbel_softmax_sample, temperature_at

SMALL = NetworkLayout(num_cells=5, reduction_cells=(1, 3), stem_channels=(8, 8, 16), head_channels=16, num_classes=5)

EXPECTED_OPS = (
    "none",
    "max_pool_3x3",
    "skip_connect",
    "conv_3x3",
    "sep_conv_3x3",
    "dil_sep_conv_3x3_d2",
    "dil_sep_conv_3x3_d4",
    "dil_sep_conv_3x3_d8",
)


def test_registry_names_and_order() -> None:
    assert PRIMITIVES == EXPECTED_OPS
    assert PRIMITIVES == OPS.names()


def test_registry_rejects_duplicates() -> None:
    reg = Registry("op")
    reg.register("a")(lambda c_in, c_out, stride, affine: nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda c_in, c_out, stride, affine: nn.Identity())
    with pytest.raises(KeyError, match="unknown op 'b'"):
        reg["b"]


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(16, 24), (15, 23)])
def test_op_shape_and_backward(name: str, stride: int, hw: tuple[int, int]) -> None:
    op = build_component(name, 6, 6, stride, affine=True)
    x = torch.randn(2, 6, *hw, requires_grad=True)
    y = op(x)
    assert y.shape == (2, 6, -(-hw[0] // stride), -(-hw[1] // stride))
    if OPS[name].zero_cost:
        assert not y.any()
        return
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in PRIMITIVES if n not in ("none",)])
def test_op_channel_change(name: str) -> None:
    y = build_component(name, 4, 8, 1)(torch.randn(1, 4, 8, 8))
    assert y.shape == (1, 8, 8, 8)


@pytest.mark.parametrize("name", COMPONENTS.names())
def test_every_component_builds_a_timing_case(name: str) -> None:
    entry = COMPONENTS[name]  # the shape rules come from the registry entry's facts
    n = {"one": 1, "sum": 3, "concat": 2}[entry.inputs]
    c_out = 4 * n if entry.inputs == "concat" else 4 if entry.same_channels else 6
    stride = 4 if entry.strides is None else max(entry.strides)
    key = LatencyKey(op=name, c_in=4, c_out=c_out, h=33, w=47, stride=stride, n_inputs=n, batch=2)
    check_key(key)
    module, args = build_timing_case(key)
    with torch.no_grad():
        out = module(*args)
    assert key_of_call(module, args, "float32", "contiguous") == key
    assert out.shape[0] == 2 and out.shape[1] == key.c_out


@pytest.mark.parametrize(
    "update, msg",
    [
        ({"op": "conv_9x9"}, "unknown"),
        ({"op": "none"}, "costs nothing"),
        ({"stride": 3}, "stride"),
        ({"op": "node_sum", "n_inputs": 2, "c_out": 5}, "c_out"),
        ({"n_inputs": 2}, "n_inputs"),
    ],
)
def test_check_key_rejects(update: dict, msg: str) -> None:
    key = LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8, w=8, stride=1, batch=1).model_copy(update=update)
    with pytest.raises(ValueError, match=msg):
        check_key(key)


def test_build_component_rejects_bad_input() -> None:
    with pytest.raises(KeyError, match="unknown op or component"):
        build_component("conv_9x9", 4, 4)
    with pytest.raises(ValueError, match="positive"):
        build_component("conv_3x3", -1, 4)


def test_key_canonical_roundtrip_and_hash() -> None:
    k = LatencyKey(op="conv_3x3", c_in=8, c_out=8, h=64, w=128, stride=2, batch=1)
    assert LatencyKey.from_canonical(k.canonical) == k
    assert k.key_hash == LatencyKey(**k.model_dump()).key_hash
    assert k.key_hash != k.model_copy(update={"memory_format": "channels_last"}).key_hash
    assert len({k, LatencyKey(**k.model_dump())}) == 1
    with pytest.raises(ValueError):
        LatencyKey.from_canonical("conv_3x3|cin=x")


def test_cell_shapes_default_layout() -> None:
    layout = NetworkLayout()
    sh = cell_shapes(layout, (769, 1537), batch=1)
    assert layout.alpha_shape == (14, 5, 8)
    assert [c.plan.reduction for c in sh.cells].count(True) == 2
    assert sh.cells[0].hw_in == (193, 385)
    assert sh.cells[3].hw_out == (97, 193) and sh.cells[7].hw_out == (49, 97)
    assert sh.cells[13].plan.c == 32
    # every edge key in a reduction cell from an input has stride 2
    conv = PRIMITIVES.index("conv_3x3")
    assert sh.edges[3][0][conv].stride == 2 and sh.edges[3][4][conv].stride == 1
    assert sh.edges[0][0][PRIMITIVES.index("none")] is None
    keys = sh.all_keys()
    assert len(keys) == len({k.canonical for k in keys})
    up = sh.head[-1]
    assert up.op == "upsample" and (up.h, up.w) == (769, 1537)
    assert key_input_shapes(up) == [(1, 19, 49, 97)]


def test_temperature_schedule_endpoints() -> None:
    assert temperature_at(0, 50) == pytest.approx(1.0)
    assert temperature_at(49, 50) == pytest.approx(0.03)
    vals = [temperature_at(e, 50) for e in range(50)]
    assert all(a > b for a, b in zip(vals, vals[1:], strict=False))


def test_gumbel_sample_is_a_distribution() -> None:
    z = gumbel_softmax_sample(torch.zeros(3, 5, 8), 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(z.sum(-1), torch.ones(3, 5))
    assert not torch.isnan(z).any()


@pytest.mark.parametrize("hw", [(64, 96), (48, 80)])
def test_supernet_forward_backward(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = Supernet(SMALL)
    y, z = net(torch.randn(2, 3, *hw))
    assert y.shape == (2, 5, *hw) and z.shape == SMALL.alpha_shape
    assert torch.allclose(z.sum(-1), torch.ones(SMALL.alpha_shape[:2]))
    y.square().mean().backward()
    assert net.alpha.grad is not None and net.alpha.grad.abs().sum() > 0
    ggm_grads = [p.grad for p in net.ggm.parameters()]
    assert ggm_grads and all(g is not None and g.abs().sum() > 0 for g in ggm_grads)
    assert all(p.grad is not None for p in net.weight_parameters() if p.requires_grad)
    n_arch = sum(p.numel() for p in net.arch_parameters())
    n_all = sum(p.numel() for p in net.parameters())
    assert n_arch + sum(p.numel() for p in net.weight_parameters()) == n_all


def test_default_supernet_alpha_is_parameter() -> None:
    net = Supernet()
    assert isinstance(net.alpha, nn.Parameter) and net.alpha.shape == (14, 5, 8)
    assert len(net.ggm.links) == 13


@pytest.mark.parametrize("kw", [dict(cells="shared"), dict(ggm="none"), dict(ggm="fc"), dict(graph="op")])
def test_supernet_ablations(kw: dict) -> None:
    net = Supernet(SMALL, **kw)
    assert net.alpha_prime().shape == SMALL.alpha_shape
    net(torch.randn(1, 3, 32, 48))[0].mean().backward()
    assert net.alpha.grad is not None
    if kw.get("cells") == "shared":
        assert net.alpha.shape[0] == 2
        assert torch.equal(net.alphas()[1], net.alphas()[3])  # both reduction cells share α


@pytest.mark.parametrize("source", ["alpha", "alpha_prime"])
def test_ggm_matches_hand_computation(source: str) -> None:
    torch.manual_seed(0)
    K, p, q, d = 3, 5, 8, 4
    ggm = GGM(K, p, q, d=d, gamma=0.5, source=source)
    alpha = torch.randn(K, p, q)
    out = ggm(alpha)
    ref = [alpha[0]]
    for k in range(1, K):
        link: EdgeGCN = ggm.links[k - 1]
        a_prev = alpha[k - 1] if source == "alpha" else ref[-1]  # eq. 5's α_{k−1}, or chained α′_{k−1}
        w_phi1 = link.phi1.weight[:, :, 0]  # [d, q]
        emb = a_prev @ w_phi1.T  # [p, d]
        logits = (alpha[k] @ link.w1) @ (a_prev @ link.w2).T
        adj = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
        g = adj @ emb @ link.wg + emb
        upd = g @ link.phi2.weight[:, :, 0].T
        ref.append(alpha[k] + 0.5 * upd)
    assert torch.allclose(out, torch.stack(ref), atol=1e-5)
    assert torch.equal(out[0], alpha[0])
    assert torch.equal(ggm(torch.zeros(K, p, q)), torch.zeros(K, p, q))  # no α-independent preference


@pytest.mark.parametrize(("source", "reaches"), [("alpha", False), ("alpha_prime", True)])
def test_ggm_source_decides_whether_links_chain(source: str, reaches: bool) -> None:
    """With eq. 5's α_{k−1}, cell 3's α′ depends on cells 2 and 3 only; chained through α′ it
    depends on every earlier cell, which is how one link's push compounds down the network."""
    torch.manual_seed(0)
    alpha = torch.randn(4, 5, 8, requires_grad=True)
    GGM(4, 5, 8, d=4, source=source)(alpha)[3].sum().backward()
    assert alpha.grad is not None
    assert bool(alpha.grad[:2].abs().sum() > 0) is reaches
    assert bool(alpha.grad[2:].abs().sum() > 0)
    with pytest.raises(ValueError, match="alpha or alpha_prime"):
        GGM(4, 5, 8, source="chained")  # type: ignore[arg-type]


def _fake_table(shapes, cost=lambda k: 1.0):
    return {k.canonical: cost(k) for k in shapes.all_keys()}


def _flops_cost(k: LatencyKey) -> float:
    """A deterministic stand-in for timings: proportional to MACs, so conv ≫ sep ≫ pool ≫ skip."""
    base = k.h * k.w * k.batch / k.stride**2
    per = {"conv_3x3": 9 * k.c_in * k.c_out, "max_pool_3x3": 9 * k.c_in, "skip_connect": k.c_in}
    return 1.0 + base * per.get(k.op, 9 * k.c_in + k.c_in * k.c_out) / 1e4


def test_latency_term_missing_keys_are_named() -> None:
    sh = cell_shapes(SMALL, (64, 64))
    table = _fake_table(sh)
    dropped = sh.all_keys()[:3]
    for k in dropped:
        del table[k.canonical]
    with pytest.raises(MissingLatencyKeys) as err:
        LatencyTerm.from_table(sh, table)
    assert {k.canonical for k in err.value.missing} == {k.canonical for k in dropped}
    for k in dropped:
        assert k.canonical in str(err.value)


def test_loss_lat_is_the_cells_ops_only_and_reports_add_the_fixed_parts() -> None:
    """Eqs. 8–9: the loss's LAT sums Z·L over the cells' candidate ops; the whole network
    (stem, preprocess, head, …) is ``total``. β·log LAT's gradient on Z is then β·L / Σ Z·L, not
    diluted by the fixed parts."""
    sh = cell_shapes(SMALL, (64, 64))
    term = LatencyTerm.from_table(sh, _fake_table(sh, _flops_cost))
    assert float(term.fixed) > 0
    z = torch.softmax(torch.randn(SMALL.alpha_shape), -1).requires_grad_()
    lat = term(z)
    assert lat.item() == pytest.approx((z * term.L).sum().item(), rel=1e-6)
    assert term.total(z).item() == pytest.approx(term.fixed.item() + lat.item(), rel=1e-6)
    (0.005 * torch.log(lat)).backward()
    assert z.grad is not None
    assert torch.allclose(z.grad, 0.005 * term.L / lat.detach(), rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_supernet_with_one_hot_z_equals_the_derived_gasnet(seed: int) -> None:
    """Same weights, same architecture: the supernet run with a genotype's one-hot Z and the
    GASNet built from that genotype (weights carried over) give the same output. A mismatch in op
    order, edge order or preprocessing between the two builders shows up here."""
    torch.manual_seed(seed)
    net = Supernet(SMALL)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        for _ in range(2):  # give every BN running statistics that are not the identity
            net(x)
    net.eval()
    g = random_genotype(SMALL, torch.Generator().manual_seed(seed))
    derived = net.derived_network(g).eval()
    with torch.no_grad():
        ref, _ = net(x, g.one_hot())
        out = derived(x)
        other = random_genotype(SMALL, torch.Generator().manual_seed(seed + 100))
        ref_other, _ = net(x, other.one_hot())
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert not torch.allclose(ref_other, ref, atol=1e-3)  # the check can fail: another genotype differs


def test_gumbel_argmax_frequencies_follow_softmax_alpha() -> None:
    """Gumbel-max: argmax of softmax((α + G)/λ) is distributed as softmax(α), for any λ; a small
    λ makes the relaxed sample one-hot."""
    alpha = torch.tensor([1.5, 0.2, -0.5, 0.9, 0.0, -1.0, 0.4, 0.1])
    n = 40_000
    z = gumbel_softmax_sample(alpha.expand(n, 8), 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(z.argmax(-1), minlength=8).float() / n
    assert torch.allclose(freq, torch.softmax(alpha, -1), atol=0.01), (freq, torch.softmax(alpha, -1))
    hard = gumbel_softmax_sample(alpha.expand(n, 8), 1e-3, torch.Generator().manual_seed(1))
    assert (hard.max(-1).values > 0.99).float().mean() > 0.99
    freq_hard = torch.bincount(hard.argmax(-1), minlength=8).float() / n
    assert torch.allclose(freq_hard, torch.softmax(alpha, -1), atol=0.01)


def test_shared_cells_have_no_inter_cell_module_and_derive_identical_cells() -> None:
    assert default_ggm("shared") == "none" and default_ggm("independent") == "gcn"
    torch.manual_seed(0)
    net = Supernet(SMALL, cells="shared")
    assert net.ggm.kind == "none" and len(net.ggm.links) == 0
    with torch.no_grad():
        net.alpha.normal_(0, 1)
    g = derive(net.alpha_prime(), SMALL)
    normal = {c.edges for c in g.cells if c.type == "normal"}
    reduction = {c.edges for c in g.cells if c.type == "reduction"}
    assert len(normal) == 1 and len(reduction) == 1
    assert Supernet(SMALL, cells="shared", ggm="gcn").ggm.kind == "gcn"  # only when asked for


def test_latency_loss_alone_moves_alpha_to_cheap_ops() -> None:
    torch.manual_seed(0)
    sh = cell_shapes(SMALL, (64, 64))
    term = LatencyTerm.from_table(sh, _fake_table(sh, _flops_cost))
    net = Supernet(SMALL)
    opt = torch.optim.Adam(list(net.arch_parameters()), lr=0.05)

    def expected() -> float:
        with torch.no_grad():
            return float(term(torch.softmax(net.alpha_prime(), -1)))

    before = expected()
    for _ in range(60):
        opt.zero_grad()
        loss = latency_loss(torch.zeros(()), term(gumbel_softmax_sample(net.alpha_prime(), 1.0)), beta=1.0)
        loss.backward()
        opt.step()
    after = expected()
    assert after < 0.8 * before
    probs = torch.softmax(net.alpha_prime(), -1).mean((0, 1))
    assert probs[PRIMITIVES.index("conv_3x3")] < probs[PRIMITIVES.index("none")]
    assert probs[PRIMITIVES.index("conv_3x3")] < 1 / len(PRIMITIVES)


def test_derivation_and_prediction() -> None:
    alpha = torch.zeros(SMALL.alpha_shape)
    alpha[..., PRIMITIVES.index("sep_conv_3x3")] = 1.0
    alpha[2, 4, PRIMITIVES.index("none")] = 5.0
    g = derive(alpha, SMALL)
    assert g.cells[0].edges == ("sep_conv_3x3",) * 5
    assert g.cells[2].edges[4] == "none"
    assert [c.type for c in g.cells] == ["normal", "reduction", "normal", "reduction", "normal"]
    sh = cell_shapes(SMALL, (64, 64))
    table = _fake_table(sh, _flops_cost)
    term = LatencyTerm.from_table(sh, table)
    # one-hot LAT and the exact prediction differ only by node sums at lower arity
    exact = predict_latency_us(g, sh, table)
    assert exact == pytest.approx(float(term.total(g.one_hot())), rel=0.05)
    with pytest.raises(ValueError, match="shape"):
        derive(torch.zeros(2, 5, 8), SMALL)


def test_genotype_roundtrip_and_rejections(tmp_path) -> None:
    g = random_genotype(NetworkLayout(), torch.Generator().manual_seed(1))
    path = tmp_path / "g.json"
    g.save(path)
    assert Genotype.load(path) == g
    raw = json.loads(g.to_json())
    assert raw["schema_version"] == 1

    bad = json.loads(g.to_json())
    bad["cells"][0]["edges"][0] = "conv_9x9"
    with pytest.raises(ValidationError, match="unknown op 'conv_9x9'"):
        Genotype.model_validate(bad)
    bad = json.loads(g.to_json())
    bad["cells"][0]["edges"] = bad["cells"][0]["edges"][:4]
    with pytest.raises(ValidationError, match="4 edges, expected 5"):
        Genotype.model_validate(bad)
    bad = json.loads(g.to_json())
    bad["cells"] = bad["cells"][:13]
    with pytest.raises(ValidationError, match="14 cells but the genotype lists 13"):
        Genotype.model_validate(bad)
    bad = json.loads(g.to_json())
    bad["cells"][3]["type"] = "normal"
    with pytest.raises(ValidationError, match="cell 3: type 'normal'"):
        Genotype.model_validate(bad)
    with pytest.raises(ValidationError):
        Genotype(cells=(CellGenotype(type="normal", edges=("none",) * 5),))


def test_gasnet_full_resolution_forward() -> None:
    g = random_genotype(NetworkLayout(), torch.Generator().manual_seed(2))
    net = GASNet(g).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 769, 1537))
    assert y.shape == (1, 19, 769, 1537)
    assert GASNet(g, num_classes=11, head="ppm").eval()(torch.randn(1, 3, 96, 128)).shape == (1, 11, 96, 128)


def test_gasnet_drops_none_edges() -> None:
    cells = tuple(
        CellGenotype(
            type="reduction" if SMALL.is_reduction(k) else "normal",
            edges=("none", "conv_3x3", "none", "skip_connect", "none"),
        )
        for k in range(SMALL.num_cells)
    )
    net = GASNet(Genotype(layout=SMALL, cells=cells))
    assert all(len(c.ops) == 2 and c.pre0 is None for c in net.cells)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)


def test_network_prefixes_run_the_same_parts_as_the_whole() -> None:
    """``Backbone.run(parts=k)`` is the network cut after its k-th part: each cell, fed the
    outputs of the two prefixes before it, gives the next prefix; head, classifier and resize
    on the last cell's output give the whole network's logits."""
    g = random_genotype(SMALL, torch.Generator().manual_seed(5))
    net = GASNet(g).eval()
    x = torch.randn(1, 3, 32, 64)
    n = len(net.cells)
    with torch.no_grad():
        outs = [net.run(x, [None] * n, parts=j) for j in range(1, n + 2)]  # stem, each cell
        torch.testing.assert_close(outs[0], net.stem(x))
        for c, cell in enumerate(net.cells):
            torch.testing.assert_close(cell(outs[max(c - 1, 0)], outs[c]), outs[c + 1])
        torch.testing.assert_close(net.run(x, [None] * n, parts=n + 2), net.head(outs[-1]))
        torch.testing.assert_close(net.run(x, [None] * n, parts=n + 3), net(x))
        torch.testing.assert_close(net.run(x, [None] * n), net(x))
        assert net(x).shape == (1, SMALL.num_classes, 32, 64)


@pytest.mark.parametrize("head", ["aspp", "ppm"])
@pytest.mark.parametrize("seed", [3, 4])
def test_every_module_of_a_derived_net_has_a_table_key(head: str, seed: int) -> None:
    """Hook every keyed component of a real GASNet; each call's key must come from
    cell_shapes, and every leaf module must sit inside a keyed component."""
    layout = NetworkLayout(head=head)
    g = random_genotype(layout, torch.Generator().manual_seed(seed))
    net = GASNet(g).eval()
    hw = (97, 161)
    sh = cell_shapes(layout, hw, batch=2)
    allowed = {k.canonical for k in sh.all_keys()}
    keyed = {name for name, m in net.named_modules() if hasattr(m, "key_spec")}
    for name, m in net.named_modules():
        if not list(m.children()) and name:
            assert any(name == p or name.startswith(p + ".") for p in keyed), f"{name} is not covered by a key"
    seen: list[LatencyKey] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append(key_of_call(mod, args, "float32", "contiguous")))
        for m in net.modules()
        if hasattr(m, "key_spec")
    ]
    with torch.no_grad():
        net(torch.randn(2, 3, *hw))
    for h in hooks:
        h.remove()
    missing = [k.canonical for k in seen if k.canonical not in allowed]
    assert not missing, missing
    assert sorted(k.canonical for k in seen) == sorted(k.canonical for k in derived_keys(g, sh))


@pytest.mark.slow
def test_onnx_export_matches_eager(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    g = random_genotype(SMALL, torch.Generator().manual_seed(5))
    net = GASNet(g).eval()
    x = torch.randn(1, 3, 64, 96)
    path = tmp_path / "gas.onnx"
    torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["logits"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = net(x).numpy()
    assert abs(out - ref).max() < 1e-3


def test_torchscript_export_matches_eager(tmp_path) -> None:
    g = random_genotype(SMALL, torch.Generator().manual_seed(6))
    net = GASNet(g).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        path = tmp_path / "gas.pt"
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


def test_overhead_model_fit() -> None:
    from gas_core.latency import OverheadModel

    m = OverheadModel.fit([100.0, 200.0, 400.0], [110.0, 220.0, 440.0])
    assert m.scale == pytest.approx(1.1) and m.residual_pct == pytest.approx(0.0, abs=1e-9)
    assert m.predict_us(1000.0) == pytest.approx(1100.0)
    with pytest.raises(ValueError, match="at least 3"):
        OverheadModel.fit([1.0], [1.0])


def test_structure_matches_golden() -> None:
    """The structure's every consequence (table keys and their order, derived keys, the keys each
    module runs at, parameter names and shapes) is what tests/golden/structure.json recorded."""
    from tests.structure_golden import GOLDEN, fingerprints

    golden, now = json.loads(GOLDEN.read_text()), fingerprints()
    differ = sorted(k for k in golden.keys() | now.keys() if golden.get(k) != now.get(k))
    assert not differ, f"{len(differ)} fingerprints differ, e.g. {differ[:5]}"


def _toy_op(c_in: int, c_out: int, stride: int, affine: bool) -> nn.Module:
    """A 1×1 conv at the edge's stride: the smallest op that still has weights and a stride."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out, affine=affine))


def test_an_op_registered_in_one_place_gets_its_module_keys_and_shapes() -> None:
    """Registering an op is the only step: α's last axis, the table's keys, the genotype, the
    derived and the search networks, the key checks and the timing cases all follow."""
    with OPS.registered("toy_conv_1x1", _toy_op):
        ops = OPS.names()
        assert ops[-1] == "toy_conv_1x1" and SMALL.alpha_shape[-1] == len(EXPECTED_OPS) + 1
        sh = cell_shapes(SMALL, (33, 47))
        red = next(c for c in sh.cells if c.plan.reduction)
        k_in, k_node = sh.edges[red.plan.index][0][-1], sh.edges[red.plan.index][-1][-1]
        assert k_in is not None and k_node is not None
        assert (k_in.op, k_in.stride, (k_in.h, k_in.w)) == ("toy_conv_1x1", 2, red.hw_in)
        assert (k_node.stride, (k_node.h, k_node.w)) == (1, red.hw_out)
        base = random_genotype(SMALL, torch.Generator().manual_seed(0)).model_dump(mode="json")
        toy = {**base, "cells": [{**c, "edges": ["toy_conv_1x1"] * SMALL.edges_per_cell} for c in base["cells"]]}
        g = Genotype.model_validate(toy)
        net = GASNet(g).eval()
        assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (2, 2)
                   for m in net.modules()) >= 2 * 2  # the two input edges of both reduction cells
        seen: list[LatencyKey] = []
        for m in net.modules():
            if hasattr(m, "key_spec"):
                m.register_forward_hook(lambda mod, args, out: seen.append(key_of_call(mod, args, "float32",
                                                                                       "contiguous")))
        with torch.no_grad():
            assert net(torch.randn(1, 3, 33, 47)).shape == (1, 5, 33, 47)
        assert sorted(k.canonical for k in seen) == sorted(k.canonical for k in derived_keys(g, sh))
        assert {k.op for k in seen} >= {"toy_conv_1x1"}
        module, args = build_timing_case(k_in)
        assert module(*args).shape == (1, k_in.c_out, -(-k_in.h // 2), -(-k_in.w // 2))
        assert Supernet(SMALL)(torch.randn(1, 3, 32, 48))[1].shape == SMALL.alpha_shape
    assert OPS.names() == EXPECTED_OPS and SMALL.alpha_shape[-1] == len(EXPECTED_OPS)
    with pytest.raises(ValueError, match="unknown op"):
        Genotype.model_validate(toy)
