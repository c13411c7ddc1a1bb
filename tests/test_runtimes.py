"""Runtimes (gas_core.runtimes): every registry entry runs a component as eager PyTorch does, a
key's runtime is part of its identity, a host refuses a runtime it lacks by name, and a table of
one runtime never serves a search or a measurement of another. onnxruntime and torch.compile
run for real at small shapes on CPU; CUDA-only paths skip without a GPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gas_core.genotype import Genotype, random_genotype
from gas_core.keys import RUNTIMES, LatencyKey, without_runtime
from gas_core.latency import (
    LatencyTerm,
    MissingLatencyKeys,
    cell_keys,
    constant_output,
    derived_keys,
    predict_latency_us,
)
from gas_core.network import GASNet
from gas_core.ops import COMPONENTS, OPS, build_timing_case, in_graph_form, key_of_call, resolve
from gas_core.quality import RowStat, predict_with_uncertainty
from gas_core.runtimes import IN_GRAPH_EXTRA, REGISTRY, check_runtime, host_runtimes, in_graph, prepare
from gas_core.search_space import NetworkLayout, cell_shapes
from latency_service.profiler import Method, prepare_key, time_key
from latency_service.testing import Server, stop_server, wait_job
from tests.support import start_server

TINY = NetworkLayout(num_cells=3, reduction_cells=(1,), stem_channels=(8, 8, 8), head_channels=8, num_classes=4)
# one of each kind of component: a strided candidate op, the op sized by its output, a multi-input glue
CASES = [
    dict(op="sep_conv_3x3", c_in=8, c_out=8, h=16, w=16, stride=2, n_inputs=1),
    dict(op="dil_sep_conv_3x3_d2", c_in=8, c_out=8, h=16, w=16, stride=1, n_inputs=1),
    dict(op="head_aspp", c_in=8, c_out=8, h=8, w=8, stride=1, n_inputs=1),
    dict(op="upsample", c_in=8, c_out=8, h=16, w=16, stride=2, n_inputs=1),
    dict(op="concat", c_in=8, c_out=16, h=8, w=8, stride=1, n_inputs=2),
    dict(op="preprocess_1x1", c_in=8, c_out=8, h=8, w=8, stride=1, n_inputs=1),
    dict(op="skip_connect", c_in=8, c_out=8, h=8, w=8, stride=1, n_inputs=1),  # nothing to compile: still a key
    dict(op="graph_call", c_in=1, c_out=1, h=1, w=1, stride=1, n_inputs=1),  # the smallest graph: entry cost
]
QUICK = Method(warmup_runs=1, warmup_ms=0.5, samples=3, min_sample_ms=0.1)


def _on(device: str, name: str) -> object:
    """A parameter of ``name`` on ``device``: skipped, with the registry's own reason, where the
    runtime cannot run here; torch.compile's first compile takes ~20 s on 2 cores, so it is slow."""
    why = REGISTRY[name].missing(device) if device == "cpu" or torch.cuda.is_available() else "no CUDA device"
    marks = [pytest.mark.skipif(why is not None, reason=why or "")]
    if name == "torch_compile":
        marks.append(pytest.mark.slow)
    return pytest.param(device, name, marks=marks, id=f"{device}-{name}")


def test_runtime_is_part_of_the_keys_identity() -> None:
    keys = [LatencyKey(**CASES[0], batch=1, runtime=r) for r in RUNTIMES]  # type: ignore[arg-type]
    assert len({k.canonical for k in keys}) == len({k.key_hash for k in keys}) == len(RUNTIMES)
    for k in keys:
        assert k.canonical.endswith("|" + k.runtime) and LatencyKey.from_canonical(k.canonical) == k
    assert tuple(REGISTRY) == RUNTIMES  # one registry entry per runtime a key can name
    with pytest.raises(ValueError, match="runtime"):
        LatencyKey(**CASES[0], batch=1, runtime="tvm")  # type: ignore[arg-type]


@pytest.mark.parametrize(("device", "name"), [_on(d, n) for d in ("cpu", "cuda") for n in REGISTRY])
def test_each_runtime_computes_what_eager_computes_and_times_it(device: str, name: str) -> None:
    for case in CASES:
        key = LatencyKey(**case, batch=2, runtime=name)  # type: ignore[arg-type]
        module, args = build_timing_case(key, device=device, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = module(*args).float().cpu()
            got = prepare(name, module, args, torch.device(device))().float().cpu()
        assert got.shape == want.shape, (name, case["op"])
        scale = float(want.abs().max()) or 1.0
        assert float((got - want).abs().max()) / scale < 1e-4, (name, case["op"])
    timing = time_key(key, torch.device(device), QUICK)  # the service's own path, at a real shape
    assert len(timing.samples_us) >= 3 and timing.median_us > 0


@pytest.mark.skipif(REGISTRY["onnxruntime"].missing("cpu") is not None, reason="onnxruntime cannot run here")
def test_onnxruntime_writes_each_call_into_one_bound_output() -> None:
    """A key under onnxruntime is timed without handing a fresh copy of its output back each call
    (a cost a component inside a network never pays): the session writes into one buffer bound
    once, so a new input's result appears in that same tensor."""
    key = LatencyKey(**CASES[0], batch=1, runtime="onnxruntime")  # type: ignore[arg-type]
    module, args = build_timing_case(key, device="cpu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run = prepare("onnxruntime", module, args, torch.device("cpu"))
        first = run()
        ptr, before = first.data_ptr(), first.clone()
        args[0].mul_(-2.0)  # the bound input, changed in place
        second = run()
        want = module(*args)
    assert second is first and second.data_ptr() == ptr
    assert not torch.allclose(second, before) and torch.allclose(second, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(REGISTRY["onnxruntime"].missing("cpu") is not None, reason="onnxruntime cannot run here")
def test_a_cell_that_never_reads_an_input_runs_under_onnxruntime() -> None:
    """A derived cell whose edges all read s1 leaves s0 unread; the exporter drops that input
    from the graph, and the session must be fed by the names it kept (bench.fusion_gap times
    such cells as one graph)."""
    from gas_core.genotype import CellGenotype, Genotype
    from gas_core.network import GASNet

    layout = TINY
    edges = tuple("sep_conv_3x3" if src == 1 else "none" for src, _ in layout.edge_sources())
    geno = Genotype(layout=layout, cells=tuple(CellGenotype(type="reduction" if layout.is_reduction(k) else "normal",
                                                            edges=edges) for k in range(layout.num_cells)))
    net = GASNet(geno).eval()
    cell = net.cells[0]
    assert cell.pre0 is None  # the case under test
    s = net.stem(torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        want = cell(s, s)
        got = prepare("onnxruntime", cell, (s, s), torch.device("cpu"))()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(REGISTRY["torch_compile"].missing("cpu") is not None, reason="torch_compile cannot run here")
def test_torch_compile_compiles_every_key_of_one_op_not_just_the_first_eight() -> None:
    """Dynamo gives up on a ``forward`` after 8 recompiles and runs it eagerly; a table holds far
    more than 8 shapes of each op, so every key must really be compiled (the runtime resets
    dynamo and checks that a graph was made)."""
    from torch._dynamo.utils import counters

    for i in range(10):
        key = LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8 + i, w=8, stride=1, batch=1, runtime="torch_compile")
        module, args = build_timing_case(key, generator=torch.Generator().manual_seed(i))
        before = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            prepare("torch_compile", module, args, torch.device("cpu"))()
        assert counters["stats"]["unique_graphs"] == before + 1, i


@pytest.mark.slow
@pytest.mark.skipif(REGISTRY["torch_compile"].missing("cpu") is not None, reason="torch_compile cannot run here")
def test_torch_compile_callables_prepared_earlier_fail_rather_than_run_eagerly() -> None:
    """Each prepare resets dynamo, so a callable prepared before another recompiles when called
    again; past the recompile limit of one ``forward`` dynamo would run it eagerly and a timing
    would be eager PyTorch under torch_compile's name. It must raise instead (the limit is lowered
    to 2 here so that three prepares reach it)."""
    import torch._dynamo

    runs = []
    # the runtime must set the flag itself; patch() restores both afterwards
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=False), torch.no_grad():
        for i in range(3):
            key = LatencyKey(op="conv_3x3", c_in=4, c_out=4, h=8 + i, w=8, stride=1, batch=1, runtime="torch_compile")
            module, args = build_timing_case(key, generator=torch.Generator().manual_seed(i))
            runs.append(prepare("torch_compile", module, args, torch.device("cpu")))
        runs[2]()  # the one compiled last runs from its cache
        runs[0]()  # recompiled once after the resets: 2 entries on this forward, at the limit
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            runs[1]()


def test_a_host_refuses_what_it_cannot_run_and_says_what_to_install() -> None:
    assert check_runtime("eager", "cpu", "float32", "contiguous") is None
    assert "cuda only" in (check_runtime("cuda_graph", "cpu", "float32", "contiguous") or "")
    assert "float32 only" in (check_runtime("onnxruntime", "cpu", "float16", "contiguous") or "")
    assert "contiguous" in (check_runtime("onnxruntime", "cpu", "float32", "channels_last") or "")
    trt = check_runtime("tensorrt", "cuda", "float32", "contiguous")
    assert trt is not None and "pip install tensorrt" in trt or torch.cuda.is_available()
    listed = host_runtimes("cpu")
    assert set(listed) == set(RUNTIMES) and listed["eager"]["available"]
    assert listed["eager"]["version"] == torch.__version__


def test_a_table_of_one_runtime_never_serves_another() -> None:
    eager = cell_shapes(TINY, (32, 48))
    table = {k.canonical: 1.0 for k in eager.all_keys()}
    LatencyTerm.from_table(eager, table)
    with pytest.raises(MissingLatencyKeys):
        LatencyTerm.from_table(cell_shapes(TINY, (32, 48), runtime="onnxruntime"), table)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_one_graph_runtime_charges_the_graph_entry_once_per_network(runtime: str) -> None:
    """A key timed as its own graph holds one graph entry; an in-graph key (timed in a chain)
    holds none; a network under a one-graph runtime is one graph. With every component costing
    10 µs of work and a 4 µs entry (so 14 µs for an own-graph key), a network of n components
    costs 10·n + 4 there, and 14·n under eager (no entry key, nothing in a chain)."""
    shapes = cell_shapes(TINY, (32, 48), runtime=runtime)  # type: ignore[arg-type]
    one_graph = REGISTRY[runtime].one_graph
    assert (shapes.call is not None) == one_graph
    assert sum(k.op == "graph_call" for k in shapes.all_keys()) == int(one_graph)
    assert any(in_graph(k) for k in shapes.all_keys()) == one_graph
    table = {k.canonical: 4.0 if k == shapes.call else 10.0 if in_graph(k) else 14.0 for k in shapes.all_keys()}
    g = random_genotype(TINY, torch.Generator().manual_seed(3))
    keys = derived_keys(g, shapes)
    work = len(keys) - int(one_graph)
    want = 10.0 * work + 4.0 if one_graph else 14.0 * work
    assert predict_latency_us(g, shapes, table) == pytest.approx(want)
    term = LatencyTerm.from_table(shapes, table)  # the search's L: each op's own work, entry excluded
    assert set(term.L[term.L > 0].tolist()) == {10.0 if one_graph else 14.0}
    n_fixed = len(shapes.fixed()) - int(one_graph)
    assert float(term.fixed) == pytest.approx(10.0 * n_fixed + 4.0 if one_graph else 14.0 * n_fixed)
    rows = {k: RowStat(v, 1.0, False) for k, v in table.items()}
    assert predict_with_uncertainty(g, shapes, rows).predicted_us == pytest.approx(want)


def test_an_own_graph_key_timed_under_the_graph_entry_costs_nothing_not_less() -> None:
    shapes = cell_shapes(TINY, (32, 48), runtime="onnxruntime")
    assert shapes.call is not None
    table = {k.canonical: 50.0 if k == shapes.call else 20.0 for k in shapes.all_keys()}
    g = random_genotype(TINY, torch.Generator().manual_seed(4))
    chained = sum(in_graph(k) for k in derived_keys(g, shapes))
    assert 0 < chained < len(derived_keys(g, shapes)) - 1  # both kinds are in a network
    assert predict_latency_us(g, shapes, table) == pytest.approx(50.0 + 20.0 * chained)


@pytest.mark.parametrize("name", [*OPS, *COMPONENTS])
def test_a_keys_in_graph_form_builds_copies_that_compute_what_one_copy_does(name: str) -> None:
    """Every registered op and component, at each stride its entry allows: a ``chain`` key's
    copies feed one another and keep the first input's shape; a ``fan_out`` key's copies all read
    the one input and are summed, and the shared form sums one copy as often; keys with no form
    (a concat, a resize, a weightless pool at stride 2, the graph entry) are refused and never
    timed in a graph. Only one-graph runtimes' keys are in-graph."""
    entry = resolve(name)
    if entry.zero_cost:
        pytest.skip("the derived network drops it: no key")
    n = 2 if entry.inputs != "one" else 1
    c_out = 8 * n if entry.inputs == "concat" else 8
    for stride in entry.strides or (1, 2):
        key = LatencyKey(op=name, c_in=8, c_out=c_out, h=8, w=8, stride=stride, n_inputs=n, batch=1,
                         runtime="onnxruntime")
        form = in_graph_form(key)
        assert in_graph(key) == (form is not None) and not in_graph(key.model_copy(update={"runtime": "eager"}))
        if form is None:
            with pytest.raises(ValueError, match="inside a graph"):
                build_timing_case(key, copies=3)
            continue
        module, args = build_timing_case(key, generator=torch.Generator().manual_seed(0), copies=3)
        with torch.no_grad():
            out = module(*args)
            if form == "chain":
                want = args[0]
                for link in module.links:
                    want = link(want, *args[1:])
                assert out.shape == args[0].shape
            else:
                want = sum(c(*args) for c in module.copies)
                shared, _ = build_timing_case(key, generator=torch.Generator().manual_seed(0), copies=3, shared=True)
                assert len(shared.copies) == 1
                assert torch.allclose(shared(*args), 3 * shared.copies[0](*args), rtol=1e-5, atol=1e-6)
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    assert in_graph_form(LatencyKey(op="graph_call", c_in=1, c_out=1, h=1, w=1, stride=1, batch=1)) is None


def test_an_in_graph_sample_is_the_per_copy_difference_of_the_two_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    """An injected clock: a chain of four advances it 9 µs a run and a chain of one 3 µs, so one
    more copy costs (9 − 3) / 3 = 2 µs in every sample, whichever half runs first."""
    from latency_service import profiler

    clock = [0]
    monkeypatch.setattr(profiler.time, "perf_counter_ns", lambda: clock[0])

    def advance(ns: int) -> Callable[[], None]:
        return lambda: clock.__setitem__(0, clock[0] + ns)

    method = Method(warmup_runs=2, warmup_ms=0.0, samples=6, min_sample_ms=0.01, context_min_sample_ms=0.01)
    t = profiler.time_marginal(advance(9000), advance(3000), 3, torch.device("cpu"), method)
    assert t.samples_us == [2.0] * 6 and t.timer == "perf_counter_ns+chain"


@pytest.mark.skipif(REGISTRY["onnxruntime"].missing("cpu") is not None, reason="onnxruntime cannot run here")
def test_an_in_graph_key_is_exported_in_two_forms_and_timed_as_their_difference() -> None:
    """The service's own path under onnxruntime: a stride-1 sep conv is prepared as a chain of
    1 + IN_GRAPH_EXTRA copies and as one copy, a stride-2 one as a fan-out of as many copies and
    as one copy summed as often, each its own session computing what eager computes; a concat
    as its own graph."""
    for case_ in (CASES[1], CASES[0]):
        key = LatencyKey(**case_, batch=1, runtime="onnxruntime")  # type: ignore[arg-type]
        form = in_graph_form(key)
        torch.manual_seed(5)  # the weights: prepare_key builds the one-copy form, then the longer one
        case = prepare_key(key, torch.device("cpu"))
        assert case.shorter is not None and case.form == form == ("chain" if key.stride == 1 else "fan_out")
        torch.manual_seed(5)
        gen = torch.Generator
        build_timing_case(key, generator=gen().manual_seed(0), copies=1 + IN_GRAPH_EXTRA if form == "fan_out" else 1,
                          shared=form == "fan_out")
        longer, args = build_timing_case(key, generator=gen().manual_seed(0), copies=1 + IN_GRAPH_EXTRA)
        with torch.no_grad():
            want = longer(*args)
        got = case.run()
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        assert float((got - want).abs().max()) / float(want.abs().max()) < 1e-4  # the same weights and inputs
        assert time_key(key, torch.device("cpu"), QUICK).timer == f"perf_counter_ns+{form}"
    concat = LatencyKey(**CASES[4], batch=1, runtime="onnxruntime")  # type: ignore[arg-type]
    assert prepare_key(concat, torch.device("cpu")).shorter is None
    assert time_key(concat, torch.device("cpu"), QUICK).timer == "perf_counter_ns"


def test_an_operator_can_withhold_a_runtime_and_a_request_for_it_says_so(tmp_path: Path) -> None:
    from latency_service.bounds import RequestError, check_runtimes
    from latency_service.core.config import Settings

    st = Settings(runtimes="eager,onnxruntime")
    assert st.offered_runtimes() == {"eager", "onnxruntime"}
    key = LatencyKey(**CASES[0], batch=1, runtime="torch_compile")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match=r"runtimes: runtime torch_compile is not offered .*GAS_RUNTIMES"):
        check_runtimes([key], "cpu", "runtimes", st.offered_runtimes())
    listed = host_runtimes("cpu", st.offered_runtimes())
    assert not listed["torch_compile"]["available"] and "GAS_RUNTIMES" in listed["torch_compile"]["missing"]
    assert listed["onnxruntime"]["available"] == (REGISTRY["onnxruntime"].missing("cpu") is None)
    with pytest.raises(ValueError, match="unknown runtime 'tvm'"):
        Settings(runtimes="eager,tvm")


@pytest.mark.skipif(REGISTRY["onnxruntime"].missing("cpu") is not None, reason="onnxruntime cannot run here")
def test_only_eager_keys_are_timed_in_context() -> None:
    """The context's eager kernels disturb another runtime's own threads between two calls, so a
    one-graph runtime's key is timed in isolation even when the host times eager in context."""
    in_context = Method(warmup_runs=1, warmup_ms=0.5, samples=3, min_sample_ms=0.1, context=True,
                        context_min_sample_ms=0.1, flush_bytes=1 << 16)
    for runtime, want in (("eager", True), ("onnxruntime", False)):
        key = LatencyKey(**CASES[5], batch=1, runtime=runtime)  # type: ignore[arg-type]
        assert time_key(key, torch.device("cpu"), in_context).timer.endswith("+context") == want, runtime
        assert REGISTRY[runtime].context_timing == want


def test_environment_fingerprint_carries_the_runtime_versions() -> None:
    import onnxruntime

    from latency_service.device import environment

    env = environment(torch.device("cpu"), 1, False)
    assert env.info["runtimes"] == {"onnxruntime": onnxruntime.__version__}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("runtimes")
    server = start_server(f"sqlite:///{tmp / 'gas.db'}", tmp)
    yield server
    stop_server(server)


def test_the_api_lists_runtimes_and_refuses_an_unsupported_one_by_name(srv: Server) -> None:
    with srv.client() as c:
        host = c.get("/device").json()
        assert host["runtimes"]["onnxruntime"]["available"] and host["runtimes"]["onnxruntime"]["version"]
        assert not host["runtimes"]["cuda_graph"]["available"]
        assert host["environment"]["info"]["runtimes"]["onnxruntime"] == host["runtimes"]["onnxruntime"]["version"]
        layout = TINY.model_dump(mode="json")
        r = c.post("/profile", json={"layout": layout, "input_size": [32, 48], "runtimes": ["cuda_graph"]})
        assert r.status_code == 422 and r.json()["message"].startswith("runtimes: runtime cuda_graph runs on cuda")
        key = {**CASES[0], "batch": 1, "dtype": "float16", "runtime": "onnxruntime"}
        r = c.post("/profile", json={"keys": [{**CASES[0], "batch": 1}, key]})
        assert r.status_code == 422 and r.json()["message"].startswith("keys[1].runtime: runtime onnxruntime times")
        g = json.loads(random_genotype(TINY, torch.Generator().manual_seed(0)).to_json())
        r = c.post("/measure", json={"genotype": g, "input_size": [32, 48], "runtime": "tensorrt"})
        assert r.status_code == 422 and "runtime" in r.json()["message"] and "cuda" in r.json()["message"]
        r = c.get(f"/table/{host['device']['slug']}", params={"runtime": "tvm"})
        assert r.status_code == 422 and "runtime" in r.json()["message"]
        assert c.get("/jobs").json() == []  # nothing was queued by any of it


@pytest.mark.slow
def test_search_table_and_measure_under_onnxruntime(srv: Server, tmp_path: Path) -> None:
    """The client reads (and profiles) onnxruntime's rows only, /measure runs the network under
    onnxruntime and predicts it from those rows, and ``gas-table compare --runtime-b`` sets the
    two runtimes of one table side by side."""
    from search_client.cli import fetch_latency_term
    from search_client.client import LatencyClient
    from search_client.table_cli import app as table_app

    with LatencyClient(srv.url, timeout=600) as c:
        term, slug = fetch_latency_term(c, None, TINY, (32, 48), 1, "float32", "contiguous", progress=False,
                                        runtime="onnxruntime")
        rows = c.table(slug).entries
        assert rows and {e.runtime for e in rows} == {"onnxruntime"}
        ort_keys = cell_shapes(TINY, (32, 48), runtime="onnxruntime").all_keys()
        assert len(rows) == len(ort_keys) == len(cell_shapes(TINY, (32, 48)).all_keys()) + 1  # + graph_call
        assert "graph_call" in {e.op for e in rows}
        m = c.measure(random_genotype(TINY, torch.Generator().manual_seed(1)), (32, 48), batch=1, dtype="float32",
                      memory_format="contiguous", runtime="onnxruntime")
        assert m.runtime == "onnxruntime" and m.predicted_ms is not None and not m.missing_keys
        eager = c.measure(random_genotype(TINY, torch.Generator().manual_seed(1)), (32, 48), batch=1,
                          dtype="float32", memory_format="contiguous")
        assert eager.runtime == "eager" and eager.predicted_ms is None  # no eager row serves it
        keys = [LatencyKey(**case, batch=1) for case in CASES[:3]]  # type: ignore[arg-type]
        wait_job(c.http, c.profile(keys).id)
        wait_job(c.http, c.profile([k.model_copy(update={"runtime": "onnxruntime"}) for k in keys]).id)
    out = tmp_path / "cmp.json"
    r = CliRunner().invoke(table_app, ["compare", slug, slug, "--runtime-b", "onnxruntime", "--latency-url", srv.url,
                                       "--plot", str(tmp_path / "cmp.png"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    pair = json.loads(out.read_text())["pairs"][0]
    assert (pair["a"]["runtime"], pair["b"]["runtime"]) == ("eager", "onnxruntime")
    assert pair["common_keys"] == 3 and pair["only_a"] == 0 and "(onnxruntime)" in r.output
    r = CliRunner().invoke(table_app, ["show", slug, "--runtime", "eager", "--latency-url", srv.url])
    assert r.exit_code == 0 and "3 rows" in r.output and "eager" in r.output, r.output
    r = CliRunner().invoke(table_app, ["export", slug, "--runtime", "eager", "--out", str(tmp_path / "e.json"),
                                       "--latency-url", srv.url])
    exported = json.loads((tmp_path / "e.json").read_text())["entries"]
    assert r.exit_code == 0 and len(exported) == 3 and {e["runtime"] for e in exported} == {"eager"}, r.output
    r = CliRunner().invoke(table_app, ["show", slug, "--runtime", "tvm", "--latency-url", srv.url])
    assert r.exit_code == 2 and "--runtime 'tvm'" in r.output


def _calls(g: Genotype, hw: tuple[int, int]) -> dict[str, list[str]]:
    """Every keyed call of ``g``'s eager network (canonical keys less the runtime): ``all`` of
    them; ``reaching``, those whose output the network's output depends on (a large perturbation
    of that output alone changes it); ``varying``, those of them whose inputs also differ
    between two images (constants alone do not feed them)."""
    net = GASNet(g).eval()
    images = [torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    seen: list[tuple[nn.Module, str, list[torch.Tensor]]] = []

    def record(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.append((mod, without_runtime(key_of_call(mod, args, "float32", "contiguous").canonical),
                     [a.clone() for a in args if isinstance(a, torch.Tensor)]))

    with torch.no_grad():
        hooks = [m.register_forward_hook(record) for m in net.modules() if hasattr(m, "key_spec")]
        for x in images:
            net(x)
        for h in hooks:
            h.remove()
        n = len(seen) // 2
        base = net(images[0])
        out: dict[str, list[str]] = {"all": [], "reaching": [], "varying": []}
        for (mod, key, a), (_, _, b) in zip(seen[:n], seen[n:], strict=True):
            h = mod.register_forward_hook(lambda m, args, y: y + 100 * torch.randn_like(y))
            reaches = not torch.equal(net(images[0]), base)
            h.remove()
            out["all"].append(key)
            if reaches:
                out["reaching"].append(key)
                if not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
                    out["varying"].append(key)
    return out


def test_a_runtime_is_not_charged_for_what_it_folds_or_never_computes() -> None:
    """A node no live edge feeds is zeros; a cell of only such nodes outputs a constant; ONNX
    Runtime computes whatever only constants feed once, at session build, and nothing that does
    not reach the output (a network whose last cell is such a cell measured 18 µs against 2 ms
    for its neighbours: its stem and cells were gone too); inductor drops dead code but folds no
    activations. The derived keys are exactly the eager network's calls that run there: under
    onnxruntime those reaching the output with inputs that change with the image, under
    torch_compile those reaching the output, under eager all (plus the graph entry). Genotypes
    heavy in ``none`` so that some cells, some whole networks and some unread cells occur."""
    hw = (32, 48)
    probs = torch.tensor([8.0, 1, 1, 1, 1, 1, 1, 1])
    folded = dead = constant_net = 0
    for seed in range(16):
        g = random_genotype(TINY, torch.Generator().manual_seed(seed), probs)
        calls = _calls(g, hw)
        folded += len(calls["varying"]) < len(calls["reaching"])
        dead += len(calls["reaching"]) < len(calls["all"])
        constant_net += not calls["varying"]
        assert constant_output(g, cell_shapes(TINY, hw)) == (not calls["varying"]), seed
        for runtime, want in (("onnxruntime", "varying"), ("torch_compile", "reaching"), ("eager", "all")):
            shapes = cell_shapes(TINY, hw, runtime=runtime)  # type: ignore[arg-type]
            got = [without_runtime(k.canonical) for k in derived_keys(g, shapes) if k != shapes.call]
            assert sorted(got) == sorted(calls[want]), (seed, runtime)
    assert folded >= 3 and dead >= 3 and constant_net >= 1, (folded, dead, constant_net)  # each case occurs


@pytest.mark.slow
@pytest.mark.skipif(REGISTRY["torch_compile"].missing("cpu") is not None, reason="torch_compile cannot run here")
def test_inductor_drops_a_cell_no_later_cell_reads() -> None:
    """``drops_dead_code`` on torch_compile's entry is a fact about inductor, checked here: cell 0
    of this network is read neither by cell 1 (no live edge from its input 1) nor by cell 2 (none
    from its input 0), and the compiled code calls exactly the eager network's convolutions less
    cell 0's, while the derived keys leave cell 0 out under torch_compile and keep it under eager."""
    from torch._inductor.utils import run_and_get_code

    base = random_genotype(TINY, torch.Generator().manual_seed(0)).model_dump(mode="json")
    src = [s for s, _ in TINY.edge_sources()]
    cells = [{**c, "edges": ["none" if s == cut else "conv_3x3" for s in src]}
             for c, cut in zip(base["cells"], (None, 1, 0), strict=True)]
    g = Genotype.model_validate({**base, "cells": cells})
    net = GASNet(g).eval()
    x = torch.randn(1, 3, 32, 48)
    counts = {"all": 0, "cell0": 0}

    def counter(name: str) -> Callable[..., None]:
        return lambda *_: counts.__setitem__(name, counts[name] + 1)

    hooks = [m.register_forward_hook(counter("all")) for m in net.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(counter("cell0")) for m in net.cells[0].modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(x)
        for h in hooks:
            h.remove()
        torch.compiler.reset()
        _, code = run_and_get_code(torch.compile(net, backend="inductor"), x)
    wrapper = "\n".join(code)
    compiled = wrapper[wrapper.index("def call("):].count("convolution(")
    assert counts["cell0"] > 0 and compiled == counts["all"] - counts["cell0"], (counts, compiled)
    eager = cell_shapes(TINY, (32, 48))
    cell0 = set(cell_keys(eager.structure.cells[0], g.cells[0].edges, eager))
    for runtime, kept in (("torch_compile", False), ("eager", True)):
        shapes = cell_shapes(TINY, (32, 48), runtime=runtime)  # type: ignore[arg-type]
        keys = {without_runtime(k.canonical) for k in derived_keys(g, shapes)}
        assert ({without_runtime(k.canonical) for k in cell0} <= keys) == kept, runtime


def test_a_prediction_splits_into_what_alpha_chooses_and_the_fixed_components() -> None:
    """``bench.prediction_accuracy`` says where a predicted FPS misses, in the price of α's
    choices or in the fixed components: the split adds up to the prediction, the all-skip probe
    is a live network of skips only, and the fit recovers a known line."""
    from bench.prediction_accuracy import all_skip, by_choice, choice_fit

    shapes = cell_shapes(TINY, (32, 32), runtime="onnxruntime")
    table = {k.canonical: 1.0 + k.h * k.w * k.c_in * k.c_out / 1e4 for k in shapes.all_keys()}
    rows = []
    for seed in range(6):
        g = random_genotype(TINY, torch.Generator().manual_seed(seed))
        split = by_choice(g, shapes, table)
        assert split["chosen_us"] + split["components_us"] == pytest.approx(predict_latency_us(g, shapes, table))
        fixed = [k for k in derived_keys(g, shapes) if k.op not in OPS]
        assert split["components_us"] == pytest.approx(sum(
            table[k.canonical] if k == shapes.call or in_graph(k) else table[k.canonical] - table[shapes.call.canonical]
            for k in fixed))
        # a host where the fixed components cost 500 µs and each chosen µs costs 0.8 µs
        rows.append({**split, "measured_us": 500 + 0.8 * split["chosen_us"],
                     "measured_median_us": 600 + 0.8 * split["chosen_us"]})
    fit = choice_fit(rows)
    assert fit["fastest_pass"]["slope"] == pytest.approx(0.8) and fit["median_pass"]["slope"] == pytest.approx(0.8)
    assert fit["fastest_pass"]["intercept_us"] == pytest.approx(500) and fit["median_pass"]["intercept_us"] == pytest.approx(600)
    charged = sorted(r["components_us"] for r in rows)
    assert fit["table_components_us"] == pytest.approx((charged[2] + charged[3]) / 2)

    skip = all_skip(TINY)
    assert {op for cell in skip.cells for op in cell.edges} == {"skip_connect"}
    assert not constant_output(skip, shapes)
