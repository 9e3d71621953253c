"""Serving latency and throughput of ``ctr-ad serve``, against the model's own forward time.

1. Trains (once, cached under ``benchmarks/work/serve/``) two K=4 Criteo-shaped bundles — embedding
   16, MLP 400-400-400 — for one short epoch on a synthetic Criteo log: the primary and, with other
   seeds, its shadow replica. The weights are barely trained; speed does not care.
2. Starts the real server (``python -m ctr_ad.cli serve``, 127.0.0.1, a free port) and drives it
   with a bounded async httpx load generator: every one of C workers keeps exactly one request in
   flight for ``--seconds`` (after a warm-up), bodies pre-serialised from real synthetic rows.
   Scenarios: 1-instance requests at concurrency 1, 8, 32; 100-instance requests at concurrency 1
   and 8. The same again with ``--shadow``, and (without shadow) with ``--threads 2``.
3. Measures, in this process with the server's thread count, the model's forward time
   (``Bundle.predict_arrays``) on the same 1- and 100-instance batches: the serving overhead ratio is
   end-to-end latency / forward time.
Every figure is the median over ``--repeats`` rounds; rounds interleave the servers so machine
noise hits both alike. The load generator runs on the same cores as the server (as a sidecar would).

    python benchmarks/bench_serve.py            # writes benchmarks/results/serve.json
    python benchmarks/bench_serve.py --quick    # smoke run (1 repeat, 2 s per scenario)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_info, median, utc_timestamp, write_json

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "serve"
RESULTS = REPO / "benchmarks" / "results" / "serve.json"
LISTEN = re.compile(r"on http://([^:\s]+):(\d+) ")
SCENARIOS = [(1, 1), (1, 8), (1, 32), (100, 1), (100, 8)]  # (instances per request, concurrency)
TARGETS = {
    "p99_ms_1inst_c8": 10.0,
    "instances_per_s_100inst": 10_000.0,
    "e2e_over_forward_100inst": 2.0,
    "shadow_p99_growth_1inst_c8": 0.30,
}


# --------------------------------------------------------------------------------------------- bundles
def train_overrides(seed: int) -> list[str]:
    return [
        "model.components=4", "model.embedding_dim=16", "model.mlp=[400,400,400]",
        "train.epochs=1", "train.max_steps=40", "train.batch_size=1024", "train.lr_warmup_steps=0",
        "train.eval_every_steps=0", "train.checkpoint_every_steps=0", "train.device=cpu",
        "train.progress=false", "data.loader=memory", "data.eval_batch_size=8192",
        "anti_distillation.warmup_steps=0", f"train.seed_init={seed}", f"train.seed_data={seed}",
    ]


def prepare(rows: int) -> tuple[Path, Path, Path]:
    """The synthetic log, the primary and the shadow bundle (cached)."""
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
    runs = []
    for name, seed in (("primary", 0), ("shadow", 1)):
        run_dir = WORK / f"{name}-{rows}"
        if not (run_dir / "bundle" / "metadata.json").is_file():
            print(f"[bench-serve] training the {name} bundle (K=4, 400-400-400)", file=sys.stderr)
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            cfg = load_config(REPO / "pipelines" / "configs" / "criteo.yaml", train_overrides(seed))
            train(data, cfg, run_dir, log=False)
        runs.append(run_dir)
    return log, runs[0], runs[1]


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
async def drive(url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
    """C workers, one request in flight each, for ``warmup`` + ``seconds``; latencies of the timed part."""
    import httpx

    per_request = json.loads(bodies[0])["instances"].__len__()
    # One client (one keep-alive connection) per worker: httpx's shared pool scans all its
    # connections on every request, which at concurrency 32 costs the generator more CPU than
    # the server spends (measured: 5.5 ms vs 2.8 ms per request).
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    instances = 0
    total = 0  # requests including the warm-up ones (CPU time per request is over all of them)
    start = time.perf_counter()
    t_measure = start + warmup
    t_end = t_measure + seconds

    async def worker(w: int) -> None:
        nonlocal errors, instances, total
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            i = w
            while True:
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                r = await client.post("/v1/predict", content=body, headers=headers)
                t1 = time.perf_counter()
                total += 1
                if t0 >= t_measure:
                    if r.status_code != 200:
                        errors += 1
                    else:
                        latencies.append(t1 - t0)
                        instances += per_request  # known: parsing every response would load the generator

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t_measure
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_incl_warmup": total,
        "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests_per_s": len(latencies) / elapsed,
        "instances_per_s": instances / elapsed,
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


def forward_times(run_dir: Path, bodies: dict[int, bytes], threads: int, repeats: int = 300) -> dict[int, float]:
    """Median ms of ``Bundle.predict_arrays`` on each batch (the model alone, already encoded)."""
    import torch

    from ctr_ad.bundle import load
    from service.encoding import RecordEncoder, RequestParser

    torch.set_num_threads(threads)
    bundle = load(run_dir)
    parser, encoder = RequestParser(bundle.features, 10_000), RecordEncoder(bundle.features)
    out = {}
    for n, body in bodies.items():
        cat, dense = encoder.encode(parser.parse(body))
        for _ in range(20):
            bundle.predict_arrays(cat, dense)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            bundle.predict_arrays(cat, dense)
            times.append(time.perf_counter() - t0)
        out[n] = median(times) * 1000
    return out


def in_process_pipeline(run_dir: Path, bodies: dict[int, bytes], repeats: int = 200) -> dict[int, dict[str, float]]:
    """Median µs of each request-path step outside HTTP: where the non-model time goes."""
    from ctr_ad.bundle import load
    from ctr_ad.features import as_numpy
    from service.encoding import RecordEncoder, RequestParser

    bundle = load(run_dir)
    fp = bundle.features
    parser, encoder = RequestParser(fp, 10_000), RecordEncoder(fp)
    out = {}
    for n, body in bodies.items():
        parsed = parser.parse(body)
        raw = encoder.raw_frame(parsed)

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
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=30_000, help="synthetic rows to train the bundles on")
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per scenario")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--inference", choices=["thread", "inline"], default="thread")
    ap.add_argument("--no-compare-threads", action="store_true",
                    help="skip the extra server with --threads 2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.repeats = 2.0, 0.5, 1

    log, primary, shadow = prepare(args.rows)
    from ctr_ad.features import FeatureProcessor

    fields = FeatureProcessor.load(primary / "bundle" / "features.json").raw_fields
    bodies = {1: request_bodies(log, fields, 1, 512), 100: request_bodies(log, fields, 100, 64, seed=1)}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(args.threads)
    common = ["--threads", str(args.threads), "--inference", args.inference, "--max-instances", "1000"]
    configs = {
        "no_shadow": ["--bundle", str(primary), *common],
        "shadow": ["--bundle", str(primary), "--shadow", str(shadow), *common],
    }
    if args.threads == 1 and not args.no_compare_threads:
        # Two intra-op threads: what a 100-instance forward gains when the second core is free.
        configs["no_shadow_2threads"] = ["--bundle", str(primary), "--threads", "2",
                                         "--inference", args.inference, "--max-instances", "1000"]
    load_before = os.getloadavg()
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {c: {} for c in configs}
    forward: list[dict[int, float]] = []
    forward_2t: list[dict[int, float]] = []
    for r in range(args.repeats):
        for name, server_args in configs.items():
            server = Server(server_args, WORK / f"server-{name}.log", env)
            try:
                server_proc = psutil.Process(server.proc.pid)
                for n, c in SCENARIOS:
                    key = f"{n}inst_c{c}"
                    hist0 = server_histogram(server.url)
                    cpu0, own0 = server_proc.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
                    res = asyncio.run(drive(server.url, bodies[n], c, args.seconds, args.warmup))
                    cpu1, own1 = server_proc.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
                    hist1 = server_histogram(server.url)
                    # The server's own view (from accept of the request to the last byte written),
                    # interpolated in its histogram buckets; warm-up requests included.
                    res["server_p50_ms"] = histogram_quantile(0.5, hist0, hist1)
                    res["server_p99_ms"] = histogram_quantile(0.99, hist0, hist1)
                    # CPU per request of the server process and of this load generator: on a shared
                    # 2-core box they compete, so latency alone hides who spends what.
                    per = 1000 / max(res["requests_incl_warmup"], 1)
                    res["server_cpu_ms_per_request"] = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) * per
                    res["client_cpu_ms_per_request"] = (own1.ru_utime + own1.ru_stime - own0.ru_utime
                                                        - own0.ru_stime) * per
                    rounds[name].setdefault(key, []).append(res)
                    print(f"[bench-serve] round {r + 1} {name:9s} {key:10s} p50 {res['p50_ms']:7.2f} ms  "
                          f"p99 {res['p99_ms']:7.2f} ms  {res['requests_per_s']:8.0f} req/s  "
                          f"{res['instances_per_s']:8.0f} inst/s  errors {res['errors']}", file=sys.stderr)
            finally:
                server.stop()
        # The model alone, measured between rounds in this process (no server running).
        forward.append(forward_times(primary, {1: bodies[1][0], 100: bodies[100][0]}, args.threads))
        forward_2t.append(forward_times(primary, {1: bodies[1][0], 100: bodies[100][0]}, 2))
    load_after = os.getloadavg()

    def med(name: str, key: str, metric: str) -> float:
        return median(x[metric] for x in rounds[name][key])

    fwd = {n: median(f[n] for f in forward) for n in (1, 100)}
    scenarios: dict[str, Any] = {}
    for name in configs:
        for n, c in SCENARIOS:
            key = f"{n}inst_c{c}"
            scenarios.setdefault(name, {})[key] = {
                "instances_per_request": n, "concurrency": c,
                **{m: med(name, key, m) for m in ("p50_ms", "p95_ms", "p99_ms", "requests_per_s",
                                                    "instances_per_s", "server_cpu_ms_per_request",
                                                    "client_cpu_ms_per_request", "server_p50_ms",
                                                    "server_p99_ms")},
                "errors": sum(x["errors"] for x in rounds[name][key]),
                "requests": sum(x["requests"] for x in rounds[name][key]),
            }
    base, shad = scenarios["no_shadow"], scenarios["shadow"]
    summary = {
        "forward_ms": {"1inst": fwd[1], "100inst": fwd[100]},
        "forward_ms_2threads": {f"{n}inst": median(f[n] for f in forward_2t) for n in (1, 100)},
        "p99_ms_1inst_c8": base["1inst_c8"]["p99_ms"],
        "instances_per_s_100inst": base["100inst_c8"]["instances_per_s"],
        # End to end at concurrency 1 (no queueing) over the model's forward on the same batch.
        "e2e_over_forward_100inst": base["100inst_c1"]["p50_ms"] / fwd[100],
        # Server time per request under load (1 / throughput) over the forward time.
        "server_time_over_forward_100inst_c8": (1000 / base["100inst_c8"]["requests_per_s"]) / fwd[100],
        "e2e_over_forward_1inst": base["1inst_c1"]["p50_ms"] / fwd[1],
        "shadow_p99_growth_1inst_c8": shad["1inst_c8"]["p99_ms"] / base["1inst_c8"]["p99_ms"] - 1,
        "shadow_p99_growth": {k: shad[k]["p99_ms"] / base[k]["p99_ms"] - 1 for k in base},
    }
    checks = {
        "p99_ms_1inst_c8": summary["p99_ms_1inst_c8"] <= TARGETS["p99_ms_1inst_c8"],
        "instances_per_s_100inst": summary["instances_per_s_100inst"] >= TARGETS["instances_per_s_100inst"],
        "e2e_over_forward_100inst": summary["e2e_over_forward_100inst"] <= TARGETS["e2e_over_forward_100inst"],
        "shadow_p99_growth_1inst_c8": summary["shadow_p99_growth_1inst_c8"] <= TARGETS["shadow_p99_growth_1inst_c8"],
    }
    result = {
        "benchmark": "serve",
        "created_at": utc_timestamp(),
        "machine": machine_info(["torch", "fastapi", "uvicorn", "pydantic", "httpx", "orjson", "httptools",
                                 "uvloop"]),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "settings": {"rows": args.rows, "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
                     "threads": args.threads, "inference": args.inference,
                     "model": "K=4, embedding 16, MLP 400-400-400, Criteo-shaped (13 dense + 26 categorical)"},
        "targets": TARGETS,
        "summary": summary,
        "meets_targets": checks,
        "scenarios": scenarios,
        "request_path_us": in_process_pipeline(primary, {1: bodies[1][0], 100: bodies[100][0]}),
        "rounds": rounds,
    }
    write_json(args.out, result)
    rows = []
    for name in configs:
        for key, s in scenarios[name].items():
            rows.append([name, key, s["p50_ms"], s["p95_ms"], s["p99_ms"], s["requests_per_s"],
                         s["instances_per_s"], s["server_p99_ms"], s["server_cpu_ms_per_request"],
                         s["client_cpu_ms_per_request"]])
    print(format_table(["server", "scenario", "p50 ms", "p95 ms", "p99 ms", "req/s", "inst/s",
                        "server-side p99 ms", "server CPU ms/req", "client CPU ms/req"], rows))
    print(f"forward: 1 inst {fwd[1]:.3f} ms, 100 inst {fwd[100]:.3f} ms; "
          f"e2e/forward (100 inst, c1) {summary['e2e_over_forward_100inst']:.2f}; "
          f"shadow p99 growth (1 inst, c8) {summary['shadow_p99_growth_1inst_c8']:+.0%}")
    print(f"targets met: {checks}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
