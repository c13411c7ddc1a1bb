"""Every CUDA path of the project, on this host's GPU, with figures as JSON under
``bench/results/gpu/`` and a printed summary (``scripts/gpu_check.sh`` sets up and calls this):

1. ``identity``  — the service's NVML device identity and environment (``GET /device``);
2. ``tables``    — CUDA-event tables of the default layout at 769×1537, float32 and float16
   (``POST /profile``), exported, with the float16 / float32 geomean ratio;
3. ``search_fps``— ``gas-search`` end to end on the GPU (``--device cuda --amp bf16``) against that
   service, then the derived network's FPS at 769×1537 (``POST /measure``), float32 and float16,
   beside the paper's 108.4 FPS (Titan Xp);
4. ``prediction_accuracy`` — ``bench.prediction_accuracy --device cuda:0`` at 769×1537;
5. ``search_speed`` — search steps/s at batch 16 (or the largest that fits), 769×1537, AMP off
   and bf16, plus the DataLoader's data-wait share at 256×512 from Cityscapes-size PNGs;
6. ``torchrun``  — ``bench.ddp_check`` under torchrun with NCCL on every GPU present;
7. ``runtimes``  — per runtime this host has (eager, cuda_graph, torch_compile, in that order):
   the float32/float16 × contiguous/channels_last tables at 769×1537, the searched network's FPS
   under each, and ``bench.prediction_accuracy --runtime R`` on 20 networks (one pass), all within
   ``--runtimes-budget-s`` (default 300 s, so that every step fits one 10-minute call; give it
   540 with ``--only runtimes`` in a call of its own): what the budget does not reach is recorded
   as skipped. It runs on the service of steps 1–3, right after them.

A step that fails is recorded with its error and the rest still run; the exit status is the
number of failed steps. ``--quick`` shrinks every step (a smoke run), ``--device cpu`` runs the
same orchestration on the CPU (used to test this script where there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from bench.common import RESULTS, machine
from gas_core.genotype import Genotype
from gas_core.search_space import NetworkLayout
from gas_core.table import compare_tables
from latency_service.testing import QUICK_TIMING, start_server, stop_server, wait_job

OUT = RESULTS / "gpu"
PAPER_FPS = 108.4  # GAS, Cityscapes, 769×1537, Titan Xp (paper Table 1)
RUN_ORDER = ["service", "prediction_accuracy", "search_speed", "torchrun", "runtimes"]
ACCURACY_EXTRAS = ("vs_median_pass", "choice_fit", "all_skip")
"""What a prediction-accuracy summary keeps besides the per-table sums: against the median pass,
and where the prediction misses (α's choices or the fixed components; docs/deployment.md "Runtimes")."""


def accuracy_summary(res: dict, digits: int | None = None) -> dict:
    """The figures a prediction-accuracy run's ``results`` contributes to the GPU check: every
    per-table sum and the calibrated one (rounded to ``digits`` where given), and the extras."""
    sums = {k: res[k] if digits is None else {m: round(v, digits) for m, v in res[k].items()}
            for k in res if k.endswith("_sum") or k == "calibrated"}
    return {**sums, **{k: res[k] for k in ACCURACY_EXTRAS if k in res}}


SERVICE_TIMING = {"GAS_SAMPLES": "30", "GAS_WARMUP_RUNS": "10", "GAS_WARMUP_MS": "50", "GAS_MIN_SAMPLE_MS": "1",
                  "GAS_E2E_SAMPLES": "50", "GAS_E2E_WARMUP_RUNS": "10", "GAS_CPU_THREADS": "0"}


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.size = (96, 192) if args.quick else (769, 1537)
        self.tmp = Path(tempfile.mkdtemp(prefix="gas-gpu-check-"))
        self.cuda = args.device.startswith("cuda")
        self.amps = ["off", "bf16"] if self.cuda else ["off"]  # bf16 autocast on a CPU is emulated: slow, no figure
        self.summary: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    def write(self, name: str, payload: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.json").write_text(json.dumps({"check": name, "machine": machine(), **payload}, indent=2))

    def py(self, *argv: str, timeout: float) -> subprocess.CompletedProcess:
        """A Python module of this repository, its output streamed to the console."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, *argv], timeout=timeout, env=env, check=True)

    def step(self, name: str, fn: Callable[[], dict]) -> None:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            figures = fn()
            self.summary[name] = {"ok": True, "wall_s": round(time.perf_counter() - t0, 1), **figures}
        except Exception as err:  # noqa: BLE001 — record and go on: one broken path must not hide the others
            traceback.print_exc()
            self.summary[name] = {"ok": False, "wall_s": round(time.perf_counter() - t0, 1),
                                  "error": f"{type(err).__name__}: {err}"[:2000]}
        self.write_summary()  # after every step: a run stopped by a time limit still leaves its figures

    def write_summary(self) -> None:
        self.write("summary", {"device": self.args.device, "quick": self.args.quick, "steps": self.summary,
                               "wall_s": round(time.perf_counter() - self.t0, 1)})

    # ------------------------------------------------------------ service steps

    def service_steps(self) -> None:
        srv = start_server(f"sqlite:///{self.tmp}/gpu.db", self.tmp,
                           {**QUICK_TIMING, **SERVICE_TIMING, "GAS_DEVICE": self.args.device})
        try:
            with srv.client(timeout=600) as c:
                self.step("identity", lambda: self.identity(c))
                self.step("tables", lambda: self.tables(c))
                self.step("search_fps", lambda: self.search_fps(c, srv.url))
                if "runtimes" in (self.args.only or RUN_ORDER):
                    self.step("runtimes", lambda: self.runtimes(c))
        finally:
            stop_server(srv)

    def identity(self, c: httpx.Client) -> dict:
        host = c.get("/device").json()
        self.write("identity", host)
        dev = host["device"]
        if self.args.device.startswith("cuda") and dev["kind"] != "cuda":
            raise RuntimeError(f"the service identified {dev['slug']} ({dev['kind']}), not a GPU")
        return {"slug": dev["slug"], "name": dev["name"], "environment": host["environment"]["fingerprint"]}

    def tables(self, c: httpx.Client) -> dict:
        layout = NetworkLayout()
        dtypes = ["float32", "float16"]
        job = c.post("/profile", json={"layout": layout.model_dump(mode="json"), "input_size": list(self.size),
                                       "dtypes": dtypes}).json()
        t0 = time.perf_counter()
        job = wait_job(c, job["id"], timeout=1800)
        if job["state"] != "done":
            raise RuntimeError(f"profile job {job['state']}: {job.get('errors')}")
        slug = c.get("/device").json()["device"]["slug"]
        table = c.get(f"/table/{slug}", params={"samples": "true"}).json()
        (self.out / "table.json").write_text(json.dumps(table))
        by = {dt: {e["key"].replace(dt, "DT"): (e["op"], e["median_us"]) for e in table["entries"] if e["dtype"] == dt}
              for dt in dtypes}
        geo = compare_tables(by["float32"], by["float16"]).geomean_ratio
        timers = sorted({e["timer"] for e in table["entries"]})
        flagged = {dt: sum(1 for e in table["entries"] if e["dtype"] == dt and e.get("flagged")) for dt in dtypes}
        fig = {"input_size": list(self.size), "keys": {dt: len(v) for dt, v in by.items()}, "timers": timers,
               "flagged": flagged, "job_warnings": job.get("warnings", []), "host_noise": job.get("host_noise"),
               "profile_wall_s": round(time.perf_counter() - t0, 1), "float16_over_float32_geomean": geo}
        self.write("tables", fig)
        return fig

    def search_fps(self, c: httpx.Client, url: str) -> dict:
        """gas-search on the GPU against the service, then FPS of the derived network."""
        run = self.tmp / "search"  # checkpoints stay out of bench/results
        quick = ["--input-size", "64", "128", "--epochs", "2", "--max-steps", "2", "--synthetic-size", "16", "4",
                 "--batch", "8"] if self.args.quick else [
            "--input-size", "384", "768", "--epochs", "4", "--warmup-epochs", "2", "--max-steps", "10",
            "--synthetic-size", "160", "16", "--batch", "16", "--lr-a", "0.05", "--lr-ggm", "0.001"]
        device = "cuda" if self.cuda else "cpu"
        self.py("-m", "search_client", "--latency-url", url, "--device", device, "--amp", self.amps[-1], "--channels-last",
                "--latency-size", str(self.size[0]), str(self.size[1]), "--out", str(run), "--quiet", *quick,
                timeout=1800)
        report = json.loads((run / "report.json").read_text())
        g = Genotype.load(run / "genotype.json")
        for name in ("genotype.json", "alpha.png", "history.png", "search_log.csv"):
            shutil.copy(run / name, self.out / f"search_{name}")
        cityscapes = g.model_copy(update={"layout": g.layout.model_copy(update={"num_classes": 19})})
        fps = {}
        for dt in ("float32", "float16"):
            m = c.post("/measure", json={"genotype": json.loads(cityscapes.to_json()), "input_size": list(self.size),
                                         "dtype": dt})
            m.raise_for_status()
            r = m.json()
            fps[dt] = {"median_ms": r["median_ms"], "p90_ms": r["p90_ms"], "fps": r["fps"],
                       "predicted_ms": r["predicted_ms"], "error_pct": r["error_pct"]}
        fig = {"search_report": report, "cityscapes_19_classes": fps, "paper_fps_titan_xp": PAPER_FPS,
               "genotype": [list(cell.edges) for cell in g.cells]}
        self.write("search_fps", fig)
        return {"search_error_pct": report["error_pct"], "fps_float32": fps["float32"]["fps"],
                "fps_float16": fps["float16"]["fps"], "paper_fps": PAPER_FPS}

    def runtimes(self, c: httpx.Client) -> dict:
        """Which runtime, dtype and layout is fastest for this search space here, and does each
        runtime's table predict its whole networks? Cheapest first, within the budget."""
        deadline = time.perf_counter() + self.args.runtimes_budget_s
        host = c.get("/device").json()
        names = [r for r in ("eager", "cuda_graph", "torch_compile") if host["runtimes"][r]["available"]]
        combos = [(dt, mf) for dt in ("float32", "float16") for mf in ("contiguous", "channels_last")]
        geno_path = self.out / "search_genotype.json"
        geno = Genotype.load(geno_path) if geno_path.exists() else None
        fig: dict = {"runtimes": names, "versions": {r: host["runtimes"][r]["version"] for r in names},
                     "tables": {}, "fps": {}, "accuracy": {}, "skipped": []}
        for rt in names:
            fig["tables"][rt] = self._runtime_tables(c, rt, combos, deadline, fig["skipped"])
            if geno is not None:
                fig["fps"][rt] = self._runtime_fps(c, geno, rt, combos, deadline, fig["skipped"])
        for rt in names:
            if time.perf_counter() > deadline - 60:
                fig["skipped"].append(f"accuracy {rt}: out of budget")
                continue
            path = self.out / f"prediction_accuracy_{rt}.json"
            n = ["3", "3", "1"] if self.args.quick else ["20", "6", "1"]
            self.py("-m", "bench.prediction_accuracy", "--device", self.args.device, "--runtime", rt, "--input-size",
                    str(self.size[0]), str(self.size[1]), "--eval", n[0], "--calib", n[1], "--passes", n[2],
                    "--out", str(path), "--plot", str(self.out / f"prediction_accuracy_{rt}.png"),
                    timeout=max(60.0, deadline - time.perf_counter()))
            res = json.loads(path.read_text())["results"]
            fig["accuracy"][rt] = accuracy_summary(res)
        self.write("runtimes", fig)
        return {"runtimes": names, "fps": fig["fps"], "skipped": fig["skipped"]}

    def _runtime_tables(self, c: httpx.Client, rt: str, combos: list, deadline: float, skipped: list) -> dict:
        """One profile job of the default layout per (dtype, memory format) under ``rt``; a job
        still running at the deadline is cancelled and recorded as skipped."""
        out = {}
        for dt, mf in combos:
            body = {"layout": NetworkLayout().model_dump(mode="json"), "input_size": list(self.size),
                    "dtypes": [dt], "memory_formats": [mf], "runtimes": [rt]}
            r = c.post("/profile", json=body)
            if r.status_code != 202:
                skipped.append(f"table {rt} {dt} {mf}: {r.status_code} {r.json().get('message')}")
                continue
            job = r.json()
            while job["state"] in ("queued", "running") and time.perf_counter() < deadline:
                time.sleep(1)
                job = c.get(f"/jobs/{job['id']}").json()
            if job["state"] in ("queued", "running"):
                c.delete(f"/jobs/{job['id']}")
                skipped.append(f"table {rt} {dt} {mf}: cancelled at the budget ({job['done']}/{job['total']} keys)")
                continue
            slug = c.get("/device").json()["device"]["slug"]
            rows = c.get(f"/table/{slug}", params={"dtype": dt, "memory_format": mf, "runtime": rt}).json()["entries"]
            out[f"{dt}/{mf}"] = {"keys": len(rows), "sum_median_us": sum(e["median_us"] for e in rows),
                                 "flagged": sum(1 for e in rows if e.get("flagged")), "errors": job.get("errors", [])[:3]}
        return out

    def _runtime_fps(self, c: httpx.Client, geno: Genotype, rt: str, combos: list, deadline: float,
                     skipped: list) -> dict:
        """The searched network (19 classes) at this size under ``rt``, each (dtype, format)."""
        net = geno.model_copy(update={"layout": geno.layout.model_copy(update={"num_classes": 19})})
        out = {}
        for dt, mf in combos:
            if time.perf_counter() > deadline:
                skipped.append(f"fps {rt} {dt} {mf}: out of budget")
                continue
            r = c.post("/measure", json={"genotype": json.loads(net.to_json()), "input_size": list(self.size),
                                         "dtype": dt, "memory_format": mf, "runtime": rt})
            if r.status_code != 200:
                skipped.append(f"fps {rt} {dt} {mf}: {r.status_code} {r.text[:300]}")
                continue
            m = r.json()
            out[f"{dt}/{mf}"] = {"fps": m["fps"], "median_ms": m["median_ms"], "p10_ms": m["p10_ms"],
                                 "p90_ms": m["p90_ms"], "predicted_ms": m["predicted_ms"], "error_pct": m["error_pct"]}
        return out

    # ------------------------------------------------------------ benchmark steps

    def prediction_accuracy(self) -> dict:
        path = self.out / "prediction_accuracy.json"
        n_eval, n_calib, passes = (3, 3, 1) if self.args.quick else self.args.accuracy
        n = ["--eval", str(n_eval), "--calib", str(n_calib), "--passes", str(passes)]
        self.py("-m", "bench.prediction_accuracy", "--device", self.args.device, "--input-size", str(self.size[0]),
                str(self.size[1]), "--out", str(path), "--plot", str(self.out / "prediction_accuracy.png"), *n,
                timeout=1800)
        res = json.loads(path.read_text())["results"]
        return accuracy_summary(res, digits=3)

    def search_speed(self) -> dict:
        mem, png = self.out / "search_speed.json", self.out / "search_throughput.json"
        size = ["32", "64"] if self.args.quick else [str(self.size[0]), str(self.size[1])]
        steps = ["--steps", "1", "--epochs", "1", "--batch", "4"] if self.args.quick else ["--steps", "5"]
        self.py("-m", "bench.search_throughput", "--data", "memory", "--size", *size, "--amp", *self.amps,
                "--device", self.args.device, "--channels-last", *steps, "--out", str(mem), timeout=1200)
        workers = str(min(8, os.cpu_count() or 1))
        self.py("-m", "bench.search_throughput", "--data", "png", "--size", *(["32", "64"] if self.args.quick else
                                                                                ["256", "512"]),
                "--workers", "0", workers, "--amp", self.amps[-1], "--device", self.args.device, *steps, "--out", str(png),
                timeout=1200)
        out = {}
        for path in (mem, png):
            for r in json.loads(path.read_text())["results"]:
                tag = f"{path.stem}:amp={r['amp']},workers={r['workers']},batch={r['batch']}"
                out[tag] = {"images_per_s": round(r["images_per_s_median"], 2),
                            "data_wait_pct": round(r["data_wait_pct_median"], 1)}
        return out

    def torchrun(self) -> dict:
        n = torch.cuda.device_count() if self.cuda else 1
        path = self.out / "torchrun.json"
        quick = ["--size", "32", "64", "--batch", "4", "--steps", "2"] if self.args.quick else []
        self.py("-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", "bench.ddp_check", "--device",
                "cuda" if self.cuda else "cpu", "--amp", self.amps[-1], "--out", str(path), *quick, timeout=900)
        res = json.loads(path.read_text())
        return {k: res[k] for k in ("backend", "world", "alpha_equal_on_all_ranks", "ddp_gradient_exchange", "wall_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu to test the orchestration without a GPU")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every step")
    ap.add_argument("--only", nargs="+", default=None,
                    choices=["service", "prediction_accuracy", "search_speed", "torchrun", "runtimes"],
                    help="run only these steps, in the order given (default: all, in the order above)")
    ap.add_argument("--accuracy", type=int, nargs=3, default=(20, 12, 3), metavar=("EVAL", "CALIB", "PASSES"),
                    help="prediction_accuracy: networks evaluated, networks calibrated on, timing passes of each "
                         "(fewer for a short lease; --quick uses 3 3 1)")
    ap.add_argument("--runtimes-budget-s", type=float, default=300.0,
                    help="runtimes step: seconds for its tables, FPS and accuracy runs; what does not fit is skipped")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch "
              f"{torch.__version__}; nothing to check (CUDA paths only). Exiting 0.")
        return
    chk = Check(args)
    for name in dict.fromkeys(args.only or RUN_ORDER):
        if name == "runtimes":  # runs inside the service steps, on that service
            if "service" not in (args.only or RUN_ORDER):
                chk.service_steps()
            continue
        if name == "service":
            chk.service_steps()
        else:
            chk.step(name, getattr(chk, name))
    chk.write_summary()
    print(f"\n=== summary ({time.perf_counter() - chk.t0:.0f} s; JSON in {args.out}) ===")
    for name, s in chk.summary.items():
        status = "ok  " if s["ok"] else "FAIL"
        detail = s.get("error") or ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("ok", "error"))
        print(f"{status} {name:<20} {detail}")
    sys.exit(sum(not s["ok"] for s in chk.summary.values()))


if __name__ == "__main__":
    main()
