"""Serving latency and throughput of ``ctr-ad serve`` under ``wrk``, against the model's own forward time.

1. Trains (once, cached under ``benchmarks/work/serve/``) two K=4 Criteo-shaped bundles — embedding
   16, MLP 400-400-400 — for one short epoch on a synthetic Criteo log: the primary and, with other
   seeds, its shadow replica. The weights are barely trained; speed does not care.
2. Starts the real servers (``python -m ctr_ad.cli serve``, 127.0.0.1, free ports): one without and
   one with ``--shadow``, both with ``--workers`` processes (default 2, one per core of the benchmark
   machine), and, for comparison, one single-process server without a shadow; all are up for the
   whole run, driven by ``wrk`` (a C load
   generator: the client takes little of the 2 cores the server runs on). Every one of C
   connections keeps exactly one request in flight; bodies are pre-serialised real synthetic rows.
   Scenarios: 1- and 100-instance requests at concurrency 1, 8 and 32.
3. Interleaves: each round runs every scenario on every server (server order alternating between
   rounds), after a warm-up, so machine noise hits both alike. Each figure is stored as min /
   median / max over rounds, with the 1-minute load average at every measurement.
4. Measures, in this process with the server's thread count, the model's forward time
   (``Bundle.predict_arrays``) on the same 1- and 100-instance batches.

With ``--backends torch onnxruntime`` the servers compared are the two runtimes instead (no shadow
on either): the primary bundle scored by PyTorch, and the same bundle exported with ``ctr-ad export
--format onnx`` served with ``--backend onnxruntime``; same scenarios, same interleaving, plus each
runtime's forward time. That comparison is written to ``results/serve-backends.json``.

    python benchmarks/bench_serve.py            # writes benchmarks/results/serve.json
    python benchmarks/bench_serve.py --quick    # smoke run (1 round, 2 s per scenario)
    python benchmarks/bench_serve.py --backends torch onnxruntime   # results/serve-backends.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, median, utc_timestamp, write_json

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "serve"
RESULTS = REPO / "benchmarks" / "results" / "serve.json"
BACKEND_RESULTS = REPO / "benchmarks" / "results" / "serve-backends.json"
LISTEN = re.compile(r"on http://([^:\s]+):(\d+) ")
WRK_SCRIPT = REPO / "benchmarks" / "wrk_post.lua"
SCENARIOS = [(1, 1), (1, 8), (1, 32), (100, 1), (100, 8), (100, 32)]  # (instances per request, concurrency)
TARGETS = {
    "p99_ms_1inst_c8": 5.0,  # at most
    "p99_ms_100inst_c8": 50.0,  # at most
    "p99_over_p50_100inst_c8": 3.0,  # at most
    "instances_per_s_100inst_c8": 10_000.0,  # at least
}
METRICS = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "requests_per_s", "instances_per_s",
           "server_cpu_ms_per_request", "server_p99_ms", "load_1min")


# --------------------------------------------------------------------------------------------- bundles
#: Bundle shapes: "demo" is the model of pipelines/configs/demo.yaml (what ``make demo`` serves);
#: "criteo" the full-size Criteo config. Both K=4, Criteo-shaped inputs (13 dense + 26 categorical).
MODELS = {
    "demo": ("demo.yaml", "K=4, embedding 8, MLP 64-32 (pipelines/configs/demo.yaml)"),
    "criteo": ("criteo.yaml", "K=4, embedding 16, MLP 400-400-400 (pipelines/configs/criteo.yaml)"),
}


def train_overrides(seed: int) -> list[str]:
    return [
        "train.epochs=1", "train.max_steps=40", "train.batch_size=1024", "train.lr_warmup_steps=0",
        "train.eval_every_steps=0", "train.checkpoint_every_steps=0", "train.device=cpu",
        "train.progress=false", "data.loader=memory", "data.eval_batch_size=8192",
        "anti_distillation.warmup_steps=0", f"train.seed_init={seed}", f"train.seed_data={seed}",
    ]


def prepare(rows: int, model: str) -> tuple[Path, Path, Path]:
    """The synthetic log, the primary and the shadow bundle of ``model`` (cached)."""
    from ctr_ad.config import load_config
    from ctr_ad.ingest.run import run_ingest
    from ctr_ad.synthetic import write_synthetic
    from ctr_ad.train import train

    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / f"criteo-{rows}-seed7.tsv"
    if not log.is_file():
        print(f"[bench-serve] writing {rows} synthetic rows", file=sys.stderr)
        write_synthetic(log, rows, seed=7)
    data = WORK / f"data-{rows}"
    if not (data / "features.json").is_file():
        print("[bench-serve] ingesting", file=sys.stderr)
        run_ingest([log], "synthetic", data, quiet=True)
    config, description = MODELS[model]
    runs = []
    for name, seed in (("primary", 0), ("shadow", 1)):
        run_dir = WORK / f"{model}-{name}-{rows}"
        if not (run_dir / "bundle" / "metadata.json").is_file():
            print(f"[bench-serve] training the {name} bundle: {description}", file=sys.stderr)
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cfg = load_config(REPO / "pipelines" / "configs" / config, train_overrides(seed))
            train(data, cfg, run_dir, log=False)
        runs.append(run_dir)
    return log, runs[0], runs[1]


def exported_graph(run_dir: Path) -> Path:
    """The bundle of ``run_dir`` exported to ONNX (cached beside it; redone when the bundle is newer)."""
    from ctr_ad.onnx_export import export_onnx

    graph = run_dir.with_name(run_dir.name + "-onnx") / "model.onnx"
    metadata = run_dir / "bundle" / "metadata.json"
    if not graph.is_file() or graph.stat().st_mtime < metadata.stat().st_mtime:
        if graph.parent.exists():
            shutil.rmtree(graph.parent)
        print(f"[bench-serve] exporting {run_dir.name} to ONNX", file=sys.stderr)
        export_onnx(run_dir, graph)
    return graph


def request_bodies(log: Path, fields: list[str], n_instances: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` pre-serialised bodies of ``n_instances`` real rows each (missing fields left out)."""
    from ctr_ad.ingest.reader import read_raw

    raw, _ = read_raw([log], "synthetic")
    raw = raw.select(fields).head(20_000)
    recs = []
    for row in raw.iter_rows(named=True):
        recs.append({k: (int(v) if isinstance(v, float) and v.is_integer() else v)
                     for k, v in row.items() if v is not None})
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = rng.integers(0, len(recs), n_instances)
        out.append(json.dumps({"instances": [recs[i] for i in idx]}).encode())
    return out


# --------------------------------------------------------------------------------------------- server
class Server:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self.workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ctr_ad.cli", "serve", *args, "--port", "0", "--log-level", "warning"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()}")
            m = LISTEN.search(log_path.read_text())
            if m:
                self.url = f"http://{m.group(1)}:{m.group(2)}"
                import httpx

                try:
                    if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready:\n{log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------------------------- load
def run_wrk(url: str, bodies_file: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """One wrk run: ``concurrency`` connections on one wrk thread, one request in flight each."""
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(seconds, 1):.0f}s", "--timeout", "10s",
           "-s", str(WRK_SCRIPT), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "WRK_BODIES": str(bodies_file)}, timeout=seconds + 60)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    elapsed = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return {
        "requests": raw["requests"], "errors": errors,
        **{f"{q}_ms": raw[f"{q}_us"] / 1000 for q in ("p50", "p90", "p99", "p999", "max")},
        "requests_per_s": raw["requests"] / elapsed,
    }


def server_histogram(url: str) -> dict[float, float]:
    """Cumulative bucket counts of the server's own latency histogram for successful predictions."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "ctr_ad_http_request_duration_seconds":
            continue
        for s in fam.samples:
            if (s.name.endswith("_bucket") and s.labels.get("route") == "/v1/predict"
                    and s.labels.get("status") == "200"):
                out[float(s.labels["le"])] = s.value
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over the requests between two scrapes, in ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return prev_bound * 1000
            return (prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-12)) * 1000
        prev_bound, prev_count = bound, count
    return float("nan")


def forward_times(run_dir: Path, bodies: dict[int, bytes], threads: int, repeats: int = 300,
                  backend: str = "torch") -> dict[int, float]:
    """Median ms of scoring each batch (the model alone, already encoded) by the service's own model
    slot (``ModelSlot.score_arrays``) with ``backend``: the bundle in ``run_dir`` (torch, with its numpy
    forward for small batches) or the graph exported from it (onnxruntime)."""
    import torch
    from threadpoolctl import threadpool_limits

    from service.model_store import load_slot

    torch.set_num_threads(threads)
    threadpool_limits(threads, user_api="blas")
    slot = load_slot(exported_graph(run_dir) if backend == "onnxruntime" else run_dir, 10_000, backend=backend,
                     threads=threads)
    score = slot.score_arrays
    out = {}
    for n, body in bodies.items():
        cat, dense = slot.encoder.encode(slot.parser.parse(body))
        for _ in range(20):
            score(cat, dense)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            score(cat, dense)
            times.append(time.perf_counter() - t0)
        out[n] = median(times) * 1000
    return out


def in_process_pipeline(run_dir: Path, bodies: dict[int, bytes], repeats: int = 200) -> dict[int, dict[str, float]]:
    """Median µs of each request-path step outside HTTP: where the non-model time goes."""
    import polars as pl

    from ctr_ad.bundle import load
    from ctr_ad.features import as_numpy
    from service.encoding import RecordEncoder, RequestParser

    bundle = load(run_dir)
    fp = bundle.features
    parser, encoder = RequestParser(fp, 10_000), RecordEncoder(fp)
    out = {}
    for n, body in bodies.items():
        parsed = parser.parse(body)
        # The same instances as the raw frame the log reader gives the polars transform.
        raw = pl.DataFrame([pl.Series(f, parsed.column(j), dtype=pl.Float64 if f in fp.dense else pl.Utf8)
                            for j, f in enumerate(parsed.fields)])

        def t(fn: Any) -> float:
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return median(ts) * 1e6

        out[n] = {
            "parse_validate_us": t(lambda b=body: parser.parse(b)),
            "encode_numpy_us": t(lambda p=parsed: encoder.encode(p)),
            "encode_polars_transform_us": t(lambda r=raw: as_numpy(fp.transform(r), fp)),
        }
    return out


# --------------------------------------------------------------------------------------------- main
def measure(server: Server, bodies_file: Path, n: int, c: int, seconds: float, warmup: float) -> dict[str, Any]:
    """Warm-up run (discarded), then the timed run with the server's CPU time and own histogram."""
    if warmup > 0:
        run_wrk(server.url, bodies_file, c, warmup)
    # Each worker keeps its own /metrics: only a single process's histogram covers every request.
    scrape = server.workers == 1
    hist0, cpu0 = server_histogram(server.url) if scrape else {}, server_cpu_seconds(server)
    res = run_wrk(server.url, bodies_file, c, seconds)
    cpu1, hist1 = server_cpu_seconds(server), server_histogram(server.url) if scrape else {}
    res["instances_per_s"] = res["requests_per_s"] * n
    res["server_cpu_ms_per_request"] = (cpu1 - cpu0) * 1000 / max(res["requests"], 1)
    # The server's own view (request accepted -> last byte written), interpolated in its buckets.
    res["server_p99_ms"] = histogram_quantile(0.99, hist0, hist1) if scrape else None
    res["load_1min"] = os.getloadavg()[0]
    return res


def server_cpu_seconds(server: Server) -> float:
    """User + system CPU seconds of the server and its worker processes."""
    root = psutil.Process(server.proc.pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"min": None, "median": None, "max": None}
    return {"min": min(known), "median": median(known), "max": max(known)}


def summarise(rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per server and scenario: min / median / max over rounds of every metric."""
    out: dict[str, Any] = {}
    for name, by_key in rounds.items():
        for key, runs in by_key.items():
            out.setdefault(name, {})[key] = {
                **{m: spread([r[m] for r in runs]) for m in METRICS},
                "errors": sum(r["errors"] for r in runs), "requests": sum(r["requests"] for r in runs),
            }
    return out


def shadow_cost(scenarios: dict[str, Any]) -> dict[str, Any]:
    """What the shadow replica costs, by scenario (ratios of medians over rounds): server CPU per
    request — the robust figure on a shared machine — and p50 / p99 / throughput, which the
    machine's other load moves as much as the shadow does."""
    base, shad = scenarios["no_shadow"], scenarios["shadow"]
    cost = {}
    for key in base:
        b, s = base[key], shad[key]
        cost[key] = {
            "server_cpu_growth": (s["server_cpu_ms_per_request"]["median"]
                                  / b["server_cpu_ms_per_request"]["median"] - 1),
            "p50_growth": s["p50_ms"]["median"] / b["p50_ms"]["median"] - 1,
            "p99_growth": s["p99_ms"]["median"] / b["p99_ms"]["median"] - 1,
            "throughput_change": s["requests_per_s"]["median"] / b["requests_per_s"]["median"] - 1,
        }
    return cost


def check_targets(base: dict[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    c8, one = base["100inst_c8"], base["1inst_c8"]
    figures = {
        "p99_ms_1inst_c8": one["p99_ms"]["median"],
        "p99_ms_100inst_c8": c8["p99_ms"]["median"],
        "p99_over_p50_100inst_c8": c8["p99_ms"]["median"] / c8["p50_ms"]["median"],
        "instances_per_s_100inst_c8": c8["instances_per_s"]["median"],
    }
    met = {k: (v >= TARGETS[k] if k.startswith("instances") else v <= TARGETS[k]) for k, v in figures.items()}
    return figures, met


def write_bodies(log: Path, fields: list[str]) -> dict[int, Path]:
    files = {}
    for n, count, seed in ((1, 512, 0), (100, 64, 1)):
        files[n] = WORK / f"bodies-{n}.jsonl"
        files[n].write_bytes(b"\n".join(request_bodies(log, fields, n, count, seed=seed)) + b"\n")
    return files


def run_rounds(configs: dict[str, list[str]], bodies: dict[int, Path], args: argparse.Namespace,
               env: dict[str, str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {c: {} for c in configs}
    servers: dict[str, Server] = {}
    try:
        for name, server_args in configs.items():
            servers[name] = Server(server_args, WORK / f"server-{name}.log", env)
        for r in range(args.repeats):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for n, c in SCENARIOS:
                key = f"{n}inst_c{c}"
                for name in order:
                    res = measure(servers[name], bodies[n], n, c, args.seconds, args.warmup)
                    rounds[name].setdefault(key, []).append(res)
                    print(f"[bench-serve] round {r + 1} {name:9s} {key:11s} p50 {res['p50_ms']:7.2f} ms  "
                          f"p99 {res['p99_ms']:7.2f} ms  {res['instances_per_s']:8.0f} inst/s  "
                          f"errors {res['errors']}  load {res['load_1min']:.2f}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    return rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=30_000, help="synthetic rows to train the bundles on")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per scenario")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each runs every scenario on every server)")
    ap.add_argument("--model", choices=sorted(MODELS), default="demo", help="bundle shape to serve (default demo)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--workers", type=int, default=2,
                    help="server processes (default 2: one per core of the 2-core benchmark machine)")
    ap.add_argument("--inference", choices=["thread", "inline"], default="thread")
    ap.add_argument("--backends", nargs="+", choices=["torch", "onnxruntime"], default=["torch"],
                    help="torch alone: the server without and with a shadow (results/serve.json); "
                         "torch onnxruntime: the two runtimes side by side (results/serve-backends.json)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    compare = args.backends != ["torch"]
    args.out = args.out or (BACKEND_RESULTS if compare else RESULTS)
    if args.quick:
        args.seconds, args.warmup, args.repeats = 2.0, 0.5, 1
    if shutil.which("wrk") is None:
        print("bench-serve needs wrk (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2

    log, primary, shadow = prepare(args.rows, args.model)
    from ctr_ad.features import FeatureProcessor

    fields = FeatureProcessor.load(primary / "bundle" / "features.json").raw_fields
    bodies = write_bodies(log, fields)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(args.threads)
    common = ["--threads", str(args.threads), "--inference", args.inference, "--max-instances", "1000"]
    if compare:
        return compare_backends(args, primary, bodies, env, common)
    served = [*common, "--workers", str(args.workers)]
    configs = {"no_shadow": ["--bundle", str(primary), *served],
               "shadow": ["--bundle", str(primary), "--shadow", str(shadow), *served]}
    if args.workers > 1:  # what the extra processes buy, in the same run
        configs["one_worker"] = ["--bundle", str(primary), *common, "--workers", "1"]
    load_before = os.getloadavg()
    started = time.time()
    rounds = run_rounds(configs, bodies, args, env)
    load_after = os.getloadavg()
    first = {n: bodies[n].read_bytes().split(b"\n", 1)[0] for n in (1, 100)}
    forward = forward_times(primary, first, args.threads)

    scenarios = summarise(rounds)
    figures, met = check_targets(scenarios["no_shadow"])
    result = {
        "benchmark": "serve",
        "created_at": utc_timestamp(),
        "machine": machine_info(["torch", "fastapi", "uvicorn", "pydantic", "orjson", "httptools", "uvloop"]),
        "load_generator": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        or "wrk",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_seconds": round(time.time() - started, 1),
        "settings": {"rows": args.rows, "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
                     "threads": args.threads, "inference": args.inference, "workers": args.workers,
                     "model": args.model, "model_shape": MODELS[args.model][1]},
        "targets": TARGETS,
        "figures": figures,
        "meets_targets": met,
        "forward_ms": {f"{n}inst": v for n, v in forward.items()},
        "shadow_cost": shadow_cost(scenarios),
        "scenarios": scenarios,
        "request_path_us": in_process_pipeline(primary, first),
        "rounds": rounds,
    }
    write_json(args.out, result)
    print_report(result)
    print(f"wrote {args.out}")
    return 0


def compare_backends(args: argparse.Namespace, primary: Path, bodies: dict[int, Path], env: dict[str, str],
                     common: list[str]) -> int:
    """The same bundle served by each runtime, interleaved round by round; ratios against torch."""
    graph = exported_graph(primary)
    configs = {b: ["--bundle", str(graph if b == "onnxruntime" else primary), "--backend", b, *common]
               for b in args.backends}
    load_before = os.getloadavg()
    started = time.time()
    rounds = run_rounds(configs, bodies, args, env)
    load_after = os.getloadavg()
    first = {n: bodies[n].read_bytes().split(b"\n", 1)[0] for n in (1, 100)}
    forward = {b: {f"{n}inst": v for n, v in forward_times(primary, first, args.threads, backend=b).items()}
               for b in args.backends}
    scenarios = summarise(rounds)
    ratios = {}
    for b in args.backends:
        if b == "torch":
            continue
        ratios[b] = {key: {m: scenarios[b][key][m]["median"] / scenarios["torch"][key][m]["median"]
                           for m in ("p50_ms", "p99_ms", "instances_per_s", "server_cpu_ms_per_request")}
                     for key in scenarios["torch"]}
    result = {
        "benchmark": "serve-backends",
        "created_at": utc_timestamp(),
        "machine": machine_info(["torch", "onnxruntime", "onnx", "fastapi", "uvicorn"]),
        "load_generator": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        or "wrk",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_seconds": round(time.time() - started, 1),
        "settings": {"rows": args.rows, "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
                     "threads": args.threads, "inference": args.inference, "backends": args.backends,
                     "model": args.model, "model_shape": MODELS[args.model][1], "shadow": False},
        "forward_ms": forward,
        "ratios_vs_torch": ratios,
        "scenarios": scenarios,
        "rounds": rounds,
    }
    write_json(args.out, result)
    print(backend_tables(result))
    print(f"wrote {args.out}")
    return 0


def _span(stats: dict[str, Any], measure: str) -> str:
    """``median (min–max)`` of one measure over the rounds."""
    m = stats[measure]
    return f"{m['median']:.2f} ({m['min']:.2f}–{m['max']:.2f})"


def scenario_table(result: dict[str, Any], first_column: str, with_max: bool) -> list[str]:
    """One row per server (or backend) and scenario: medians over rounds, latencies with min–max."""
    max_head, max_align = (" max ms |", "---:|") if with_max else ("", "")
    lines = [f"| {first_column} | scenario | p50 ms, median (min–max) | p99 ms, median (min–max) |{max_head} "
             "inst/s | server CPU ms/req | load |", f"|---|---|---:|---:|{max_align}---:|---:|---:|"]
    for name, by_key in result["scenarios"].items():
        for key, s in by_key.items():
            max_cell = f" {s['max_ms']['median']:.1f} |" if with_max else ""
            lines.append(f"| {name.replace('_', ' ')} | {key.replace('inst_c', ' inst, c')} | {_span(s, 'p50_ms')} "
                         f"| {_span(s, 'p99_ms')} |{max_cell} {s['instances_per_s']['median']:,.0f} "
                         f"| {s['server_cpu_ms_per_request']['median']:.2f} | {s['load_1min']['median']:.1f} |")
    return lines


def backend_tables(result: dict[str, Any]) -> str:
    """The README's table of a backend comparison (medians over rounds, with min–max)."""
    lines = scenario_table(result, "backend", with_max=False)
    lines += ["", "| backend | forward ms, 1 instance | forward ms, 100 instances |", "|---|---:|---:|"]
    for name, f in result["forward_ms"].items():
        lines.append(f"| {name} | {f['1inst']:.3f} | {f['100inst']:.3f} |")
    return "\n".join(lines)


def markdown_tables(result: dict[str, Any]) -> str:
    """The README's tables of a result: every scenario, then the shadow's cost (tests check the
    README holds exactly these, so the document and ``results/serve.json`` cannot drift apart)."""
    lines = scenario_table(result, "server", with_max=True)
    lines += ["", "| scenario | server CPU / request | p50 | p99 | throughput |", "|---|---:|---:|---:|---:|"]
    for key, c in result["shadow_cost"].items():
        lines.append(f"| {key.replace('inst_c', ' inst, c')} | {c['server_cpu_growth']:+.0%} | {c['p50_growth']:+.0%} "
                     f"| {c['p99_growth']:+.0%} | {c['throughput_change']:+.0%} |")
    return "\n".join(lines)


def print_report(result: dict[str, Any]) -> None:
    print(markdown_tables(result))
    print(f"figures {result['figures']}; targets met: {result['meets_targets']}; "
          f"load {result['load_average_before'][0]:.2f} -> {result['load_average_after'][0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
