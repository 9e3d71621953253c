"""Wall time of ``ctr-ad ingest --engine ray`` next to the local engine, on the same synthetic file.

``ctr-ad synth`` writes ``--rows`` rows (200,000 by default, 49 MB); then, in one run:

1. *cold*, as a user runs it: ``ctr-ad ingest`` in a fresh process, local engine with 1 worker
   against ``--engine ray --workers 2`` (which starts a local 2-CPU Ray instance and stops it);
2. *warm*, as on a running cluster: in this process, with one local Ray instance of 2 CPUs started
   beforehand and its workers already up, the local engine with 1 and 2 workers against the Ray engine.

Variants of a phase run round-robin (rotating order) ``--rounds`` times; every window records its wall
time and the 1-minute load average before it. Every run's fingerprint must be the same (the engines
write the same dataset). Results: ``benchmarks/results/ingest_ray.json``, with the ratios to the local
1-worker baseline of the same phase.

    python benchmarks/bench_ingest_ray.py [--rows 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import format_table, interleaved_windows, machine_info, run_measured, spread, utc_timestamp, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ingest_ray.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import ray

    from ctr_ad.ingest import ray_engine
    from ctr_ad.ingest.run import run_ingest
    from ctr_ad.synthetic import write_synthetic

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    loads: dict[str, list[float]] = {}
    fingerprints: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-ray-") as tmp:
        work = Path(tmp)
        log = work / "synth.tsv"
        write_synthetic(log, args.rows, seed=0)

        def timed(name: str, fn) -> float:
            loads.setdefault(name, []).append(os.getloadavg()[0])
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            fn(out)
            wall = time.perf_counter() - start
            fingerprints.add(json.loads((out / "manifest.json").read_text())["fingerprint"])
            return wall

        def cli(*flags: str):
            def run(out: Path) -> None:
                m = run_measured([sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo", "--input",
                                  str(log), "--out", str(out), "--quiet", *flags], cwd=REPO, env=env)
                if m.returncode != 0:
                    raise SystemExit(f"ctr-ad ingest {' '.join(flags)} failed:\n{m.stderr}")
            return run

        cold_variants = {"cli local w1": cli("--workers", "1"), "cli ray w2 (starts Ray)": cli("--engine", "ray",
                                                                                            "--workers", "2")}
        cold = interleaved_windows({n: (lambda r, n=n: timed(n, cold_variants[n])) for n in cold_variants},
                                   warmup=lambda n: None, rounds=args.rounds)

        started = time.perf_counter()
        ray_engine.start_local(2)
        ray_start_s = time.perf_counter() - started

        def in_process(**kw):
            return lambda out: run_ingest([log], "criteo", out, quiet=True, **kw)

        warm_variants = {"local w1": in_process(workers=1), "local w2": in_process(workers=2),
                         "ray 2 CPUs (running)": in_process(engine="ray")}
        warm = interleaved_windows({n: (lambda r, n=n: timed(n, warm_variants[n])) for n in warm_variants},
                                   warmup=lambda n: warm_variants[n](work / "warmup"), rounds=args.rounds)
        ray.shutdown()

    if len(fingerprints) != 1:
        raise SystemExit(f"the engines wrote different datasets: fingerprints {sorted(fingerprints)}")
    phases = {"cold": (cold, "cli local w1"), "warm": (warm, "local w1")}
    results = {"rows": args.rows, "rounds": args.rounds, "fingerprint": fingerprints.pop(),
               "ray_local_start_s": round(ray_start_s, 2), "phases": {}}
    rows = []
    for phase, (walls, base) in phases.items():
        base_median = spread(walls[base])["median"]
        results["phases"][phase] = {}
        for name, values in walls.items():
            s = spread(values)
            ratio = round(s["median"] / base_median, 2)
            results["phases"][phase][name] = {"wall_s": s, "ratio_to_" + base.replace(" ", "_"): ratio,
                                              "load_1min": spread(loads[name])}
            rows.append([phase, name, s["min"], s["median"], s["max"], ratio, spread(loads[name])["median"]])
    results["machine"] = machine_info(["polars", "pyarrow", "ray"])
    results["measured_at"] = utc_timestamp()
    write_json(RESULTS, results)
    print(format_table(["phase", "variant", "min s", "median s", "max s", "÷ local w1", "load"], rows))
    print(f"local Ray instance start: {ray_start_s:.1f} s; same fingerprint {results['fingerprint'][:12]} "
          f"for every run; saved {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
