"""Component parallelism on CPU: training steps/s of one process against two component-parallel ranks.

Variants, each its own launch (interpreter start-up, imports and set-up are outside the timed window):

* ``1proc-2threads``: one process holding all K components, ``train.threads=2`` (the whole machine);
* ``1proc-1thread``: the same with one thread (the per-rank budget of the next variant);
* ``2proc-component``: ``torchrun --nproc_per_node 2`` with ``train.parallelism=component`` (gloo),
  one thread per rank; each rank owns K/2 components.

A worker builds the product's ``Trainer`` on an ingested synthetic log, runs ``--warmup`` optimizer
steps, then times ``--steps`` steps between two barriers (the rate of rank 0, which waits for the
slowest rank at every penalty all-gather). Variants are interleaved round-robin (rotated every
round); min/median/max over ``--repeats`` rounds and the load average before and after are stored.

    python benchmarks/bench_component_parallel.py                 # writes benchmarks/results/component_parallel.json
    python benchmarks/bench_component_parallel.py --penalty none  # without the anti-distillation penalty
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import format_table, machine_info, spread, utc_timestamp, write_json  # noqa: E402

WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results" / "component_parallel.json"
DEMO_CONFIG = ROOT / "pipelines" / "configs" / "demo.yaml"
VARIANTS = {  # name: (processes, threads per process, parallelism)
    "1proc-2threads": (1, 2, "data"),
    "1proc-1thread": (1, 1, "data"),
    "2proc-component": (2, 1, "component"),
}


def config_sets(args: argparse.Namespace, threads: int, parallelism: str) -> list[str]:
    sets = [
        f"model.components={args.k}",
        "model.embedding_dim=16",
        f"model.mlp={args.mlp}",
        "model.dropout=0.0",
        "model.anchor=none",
        f"train.batch_size={args.batch}",
        "train.embedding_optimizer=sparse_adam",
        "train.weight_averaging_epochs=0",
        f"train.threads={threads}",
        f"train.parallelism={parallelism}",
        "train.progress=false",
        f"anti_distillation.penalty={args.penalty}",
    ]
    if args.penalty != "none":
        sets.append("anti_distillation.lambda=0.1")
    return sets


def worker(args: argparse.Namespace) -> None:
    import torch

    from ctr_ad import distributed as dist_mod
    from ctr_ad.config import load_config
    from ctr_ad.train import Trainer

    cfg = load_config(DEMO_CONFIG, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Path(args.data), cfg, Path(tmp) / "run", resume=False, verbose=False)
        batches = trainer.plan.batches(0)
        trainer.net.train()
        for _ in range(args.warmup):
            trainer._step(next(batches))  # the product's optimizer step, without evaluation/checkpoints
        dist_mod.barrier(trainer.ctx)
        started = time.perf_counter()
        for _ in range(args.steps):
            trainer._step(next(batches))
        dist_mod.barrier(trainer.ctx)
        elapsed = time.perf_counter() - started
    if trainer.ctx.is_main:
        print(json.dumps({"steps_per_s": args.steps / elapsed, "threads": torch.get_num_threads()}))


def ensure_data(rows: int) -> Path:
    from ctr_ad.ingest.run import run_ingest
    from ctr_ad.synthetic import write_synthetic

    data = WORK / f"cp-synth-{rows}"
    if not (data / "manifest.json").is_file():
        tsv = WORK / f"cp-synth-{rows}.tsv"
        write_synthetic(tsv, rows, seed=5)
        run_ingest([tsv], "synthetic", data, quiet=True)
    return data


def launch(name: str, args: argparse.Namespace, data: Path) -> float:
    procs, threads, parallelism = VARIANTS[name]
    me = [
        str(Path(__file__).resolve()),
        "--worker",
        "--data",
        str(data),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    me += [a for s in config_sets(args, threads, parallelism) for a in ("--set", s)]
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *me]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return float(json.loads(lines[-1])["steps_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--mlp", default="[400,400,400]")
    p.add_argument("--penalty", default="negative_correlation", help="anti_distillation.penalty ('none': off)")
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    data = ensure_data(args.rows)
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(launch(name, args, data))
            print(f"round {r + 1}: {name} {runs[name][-1]:.2f} steps/s", file=sys.stderr)
    load_after = os.getloadavg()
    stats = {name: spread(v) for name, v in runs.items()}
    base = stats["1proc-2threads"]["median"]
    result: dict[str, Any] = {
        "benchmark": "component_parallel",
        "created_at": utc_timestamp(),
        "machine": machine_info(["torch"]),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "config": {
            "k": args.k,
            "batch": args.batch,
            "embedding_dim": 16,
            "mlp": args.mlp,
            "penalty": args.penalty,
            "optimizer": "AdamW (MLP) + SparseAdam (embeddings)",
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "rows": args.rows,
        },
        "runs_steps_per_s": runs,
        "steps_per_s": stats,
        "ratio_to_1proc_2threads": {name: s["median"] / base for name, s in stats.items()},
    }
    write_json(args.out, result)
    rows = [[n, s["min"], s["median"], s["max"], result["ratio_to_1proc_2threads"][n]] for n, s in stats.items()]
    print(format_table(["variant", "min steps/s", "median", "max", "× 1proc-2threads"], rows))
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}; {args.out}")


if __name__ == "__main__":
    main()
