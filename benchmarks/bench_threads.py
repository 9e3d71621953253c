"""Threads benchmark: the chosen intra-op thread count against every fixed count, for the demo training loop.

The demo training run (``pipelines/configs/demo.yaml`` on the ingested 8k Criteo sample, the README's
first ``ctr-ad train``) is run with:

* ``inherited``: no ``train.threads``, torch's own default (one thread per core it sees): what a user
  got before ``ctr_ad.threads``;
* ``fixed-N``: ``--set train.threads=N`` for N = 1 .. the usable CPUs;
* ``default``: ``--set train.threads=C`` with C = ``ctr_ad.threads.choose_threads`` for this config's
  work per step and this machine's CPUs (what ``train`` does once it calls ``apply_threads``).

in two conditions: ``alone``, and ``busy``, beside two CPU-bound jobs of equal priority (two
pure-Python busy loops). Each run is its own process (``--child``) that times ``train()``
itself, so interpreter start-up and imports are outside the figure (the process wall time is stored
too). Variants are interleaved round-robin (rotated each round) so a noisy phase hits all of them;
min/median/max over ``--repeats`` rounds are stored. Target: in each condition the default's median
is within 1.25x of the best fixed count's median.

    python benchmarks/bench_threads.py            # writes benchmarks/results/threads.json
    python benchmarks/bench_threads.py --quick    # 1 round, 2 epochs, writes benchmarks/work/threads-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import format_table, machine_info, utc_timestamp, write_json  # noqa: E402

WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results" / "threads.json"
DEMO_CONFIG = ROOT / "pipelines" / "configs" / "demo.yaml"
SAMPLE = ROOT / "data" / "criteo-kaggle-8k"
TARGET_RATIO = 1.25
# A CPU-bound loop that exits once its parent is gone, so a killed benchmark leaves no spinning orphan.
BUSY_CODE = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(200_000): pass"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    # The inherited variant must see torch's own default: no thread settings leak in from here.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CTR_AD_THREADS"):
        env.pop(var, None)
    return env


def ingest(data_dir: Path) -> None:
    """The README's ingest command, once (cached in benchmarks/work)."""
    if (data_dir / "features.json").is_file():
        return
    if data_dir.exists():
        shutil.rmtree(data_dir)
    cmd = [sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo", "--split", "files",
           "--out", str(data_dir), "--quiet", "--input",
           *(str(SAMPLE / f"{s}.tsv") for s in ("train", "dev", "test"))]
    subprocess.run(cmd, check=True, cwd=ROOT, env=child_env())


def chosen_threads(data_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """What ``ctr_ad.threads`` picks for this config's training step on this machine."""
    from ctr_ad.config import load_config
    from ctr_ad.features import FeatureProcessor
    from ctr_ad.threads import model_step_flops, thread_choice

    cfg = load_config(DEMO_CONFIG, overrides)
    fp = FeatureProcessor.load(data_dir / "features.json")
    work = model_step_flops(cfg.model, len(fp.categorical_columns), len(fp.dense_columns), cfg.train.batch_size)
    return thread_choice(work).as_dict()


# --------------------------------------------------------------------------------------- one run
def child(args: argparse.Namespace) -> int:
    """One timed training run in this process; prints a JSON line."""
    import torch

    from ctr_ad.config import load_config
    from ctr_ad.train import train

    overrides = list(args.set)
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    cfg = load_config(DEMO_CONFIG, overrides)
    inherited = torch.get_num_threads()
    t0 = time.perf_counter()
    result = train(args.data, cfg, args.out, progress=False, log=False)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"train_s": elapsed, "steps": result.steps, "inherited_threads": inherited,
                      "test": result.test_metrics}))
    return 0


def run_once(data_dir: Path, threads: int | None, overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        cmd = [sys.executable, __file__, "--child", "--data", str(data_dir), "--run-out", str(Path(tmp) / "run")]
        if threads:
            cmd += ["--threads", str(threads)]
        for o in overrides:
            cmd += ["--set", o]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out.update(process_wall_s=wall, load1_before=load_before, load1_after=os.getloadavg()[0])
        return out


class BusyJobs:
    """``n`` CPU-bound processes of this process's priority, for the ``busy`` condition."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BusyJobs:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE]) for _ in range(self.n)]
        time.sleep(0.5)  # let them reach the busy loop
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# --------------------------------------------------------------------------------------- main
def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the ``with BusyJobs`` blocks, which kill the jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy-jobs", type=int, default=2)
    p.add_argument("--max-threads", type=int, default=None, help="largest fixed count (default: usable CPUs)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 epochs")
    p.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-out", dest="out_run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.out = args.out_run
        return child(args)

    signal.signal(signal.SIGTERM, _terminate)
    overrides = list(args.set)
    if args.quick:
        args.repeats = 1
        overrides.append("train.epochs=2")
    out = args.out or (WORK / "threads-quick.json" if args.quick else RESULTS)
    WORK.mkdir(parents=True, exist_ok=True)
    data_dir = WORK / "c8k"
    ingest(data_dir)

    choice = chosen_threads(data_dir, overrides)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    max_threads = args.max_threads or max(usable, 2)
    variants: list[tuple[str, int | None]] = [("inherited", None)]
    variants += [(f"fixed-{n}", n) for n in range(1, max_threads + 1)]
    variants.append(("default", choice["threads"]))
    print(f"chosen: {choice}", flush=True)

    conditions = ["alone", "busy"]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {v: [] for v, _ in variants} for c in conditions}
    load_start = os.getloadavg()
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate each round
        for condition in conditions:
            jobs = BusyJobs(args.busy_jobs if condition == "busy" else 0)
            with jobs:
                for name, threads in order:
                    res = run_once(data_dir, threads, overrides)
                    runs[condition][name].append(res)
                    print(f"round {r + 1} {condition:5s} {name:10s} train {res['train_s']:6.2f} s "
                          f"(process {res['process_wall_s']:5.2f} s, {res['steps']} steps, "
                          f"load {res['load1_before']:.2f})", flush=True)

    summary: dict[str, Any] = {}
    table = []
    for condition in conditions:
        per = {name: stats([x["train_s"] for x in runs[condition][name]]) for name, _ in variants}
        fixed = {name: s for name, s in per.items() if name.startswith("fixed-")}
        best_name = min(fixed, key=lambda n: fixed[n]["median"])
        best = fixed[best_name]["median"]
        ratio = per["default"]["median"] / best
        summary[condition] = {
            "train_s": per,
            "best_fixed": best_name,
            "default_over_best_fixed": ratio,
            "default_over_best_fixed_min": per["default"]["min"] / fixed[best_name]["min"],
            "inherited_over_default": per["inherited"]["median"] / per["default"]["median"],
            "met": ratio <= TARGET_RATIO,
        }
        for name, _ in variants:
            s = per[name]
            table.append([condition, name, s["min"], s["median"], s["max"], s["median"] / best])
    steps = {x["steps"] for c in conditions for v in runs[c].values() for x in v}
    report = {
        "benchmark": "threads",
        "timestamp": utc_timestamp(),
        "machine": machine_info(["torch", "numpy"]),
        "load_average_1_5_15_start": list(load_start),
        "load_average_1_5_15_end": list(os.getloadavg()),
        "config": str(DEMO_CONFIG.relative_to(ROOT)),
        "overrides": overrides,
        "data": "data/criteo-kaggle-8k ingested with --split files",
        "steps_per_run": sorted(steps),
        "inherited_threads": runs["alone"]["inherited"][0]["inherited_threads"],
        "chosen": choice,
        "busy_jobs": args.busy_jobs,
        "busy_job_code": BUSY_CODE,
        "repeats": args.repeats,
        "measure": "seconds inside train() (process start-up and imports excluded), per condition",
        "summary": summary,
        "target": f"default median <= {TARGET_RATIO} x the best fixed count's median, alone and busy",
        "runs": runs,
    }
    write_json(out, report)
    print(format_table(["condition", "variant", "min s", "median s", "max s", "/ best fixed"], table))
    for condition in conditions:
        s = summary[condition]
        print(f"{condition}: default / best fixed ({s['best_fixed']}) = {s['default_over_best_fixed']:.2f} "
              f"(target <= {TARGET_RATIO}: {'met' if s['met'] else 'NOT met'}); "
              f"inherited / default = {s['inherited_over_default']:.2f}")
    print(f"wrote {out}")
    if args.check and not all(summary[c]["met"] for c in conditions):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
