"""Can the loaders keep up with training? Loader steps/s against training steps/s, measured in one run.

A Criteo-shaped model-ready Parquet split (label, 26 categorical index columns, 13 dense columns and
their 13 missing indicators; Zipf-like ids; row groups of 65,536 rows) is written once to
``benchmarks/work/``. At K = 4, batch 4096, ``data_order: independent`` with a shared penalty batch of
4096 rows (the heaviest plan: K + 1 row streams per step), the script times, in steps/s:

* ``train``: the training step alone (``EnsembleCTR``, embedding 16, MLP 400-400-400, AdamW + SparseAdam,
  BCE + output-decorrelation penalty) on batches gathered beforehand — the rate a loader must feed;
* ``memory`` / ``stream``: the loaders alone (no model): ``MemoryBatches`` over the split in memory,
  ``StreamBatches`` reading buffers of ``--buffer-rows`` rows from the Parquet file with per-component
  buffer orders;
* ``train+memory``, ``train+memory+prefetch``, ``train+stream+prefetch``: the step fed by a loader,
  in the loop or from the background thread of ``ctr_ad.prefetch`` (depth 2).

Every variant is built and warmed up before anything is timed; then ``--rounds`` rounds each time one
window of every variant (the same number of steps per variant kind), round-robin with the order rotated
every round (``common.interleaved_windows``). Loaders keep their position across windows (a stream
loader's buffer reads are spread over its windows as in training); a prefetching variant starts a
window with at most ``depth`` batches ready. min/median/max are stored; the target is loader alone
≥ 3 × the training step rate (median over median, and min over max as the pessimistic bound).

    python benchmarks/bench_loader.py            # writes benchmarks/results/loader.json
    python benchmarks/bench_loader.py --quick    # smoke run, writes benchmarks/work/loader-quick.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctr_ad.config import Config
from ctr_ad.data import Batch, MemoryBatches, PlanSpec, StreamBatches, load_split
from ctr_ad.losses import summed_bce
from ctr_ad.model import EnsembleCTR
from ctr_ad.optim import build_optimizers
from ctr_ad.penalties import penalty_value
from ctr_ad.prefetch import PrefetchedBatches

from common import format_table, interleaved_windows, machine_info, spread, utc_timestamp, write_json

HERE = Path(__file__).resolve().parent
WORK, RESULTS = HERE / "work", HERE / "results"
K, BATCH, EMBEDDING_DIM, MLP = 4, 4096, 16, (400, 400, 400)
# Criteo-like cardinalities (vocabulary + 2 reserved rows), as in bench_train.py.
CARDINALITIES = (1_400, 550, 100_000, 60_000, 300, 24, 12_000, 630, 3, 50_000, 5_700, 100_000, 3_200,
                 27, 14_000, 60_000, 10, 5_600, 2_200, 4, 80_000, 18, 15, 40_000, 100, 30_000)
N_DENSE = 13
CAT_COLS = [f"C{i + 1}" for i in range(len(CARDINALITIES))]
DENSE_COLS = [f"I{i + 1}" for i in range(N_DENSE)] + [f"I{i + 1}__missing" for i in range(N_DENSE)]
TARGET = 3.0


def write_split(rows: int, seed: int = 1) -> Path:
    """A model-ready train split of ``rows`` rows (cached)."""
    path = WORK / f"loader-{rows}-seed{seed}.parquet"
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {"label": (rng.random(rows) < 0.25).astype(np.float32)}
    for name, card in zip(CAT_COLS, CARDINALITIES, strict=True):
        cols[name] = np.minimum(rng.pareto(0.6, rows).astype(np.int64), card - 1).astype(np.int32)
    for name in DENSE_COLS[:N_DENSE]:
        cols[name] = rng.standard_normal(rows, dtype=np.float32)
    for name in DENSE_COLS[N_DENSE:]:
        cols[name] = (rng.random(rows) < 0.1).astype(np.float32)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp, row_group_size=65_536)
    tmp.replace(path)
    return path


class Trainer:
    """The product's training step (K = 4, independent orders, penalty on the shared batch)."""

    def __init__(self) -> None:
        cfg = Config.from_dict({
            "model": {"components": K, "embedding_dim": EMBEDDING_DIM, "mlp": list(MLP)},
            "anti_distillation": {"penalty": "output_decorrelation", "lambda": 0.1, "data_order": "independent"},
            "train": {"batch_size": BATCH},
        })
        torch.manual_seed(0)
        self.model = EnsembleCTR.from_config(cfg.model, CARDINALITIES, len(DENSE_COLS), sparse=True)
        self.optimizers = build_optimizers(self.model, cfg, sparse=True)

    def step(self, batch: Batch) -> None:
        own = self.model(batch.cat, batch.dense)
        assert batch.penalty is not None
        shared = self.model(batch.penalty.cat, batch.penalty.dense, dropout=False)
        loss = summed_bce(own, batch.label, denominator=batch.global_rows)
        loss = loss + 0.1 * penalty_value("output_decorrelation", shared)
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.optimizers:
            o.step()


def endless(batches: Callable[[int], Iterator[Batch]]) -> Iterator[Batch]:
    """Batches of epoch 0, 1, 2, … one after the other."""
    for epoch in itertools.count():
        yield from batches(epoch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--buffer-rows", type=int, default=262_144)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=6, help="steps per window of a variant with a model")
    p.add_argument("--loader-steps", type=int, default=40, help="steps per window of a loader alone")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="200k rows, 2 rounds, short windows; to work/")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.rows, args.rounds, args.train_steps, args.loader_steps = 200_000, 2, 2, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (WORK / "loader-quick.json" if args.quick else RESULTS / "loader.json")

    path = write_split(args.rows)
    spec = PlanSpec(batch_size=BATCH, components=K, independent=True, penalty_batch_size=BATCH, seed=0)
    memory = MemoryBatches(load_split(path, CAT_COLS, DENSE_COLS), spec)
    stream = StreamBatches(path, CAT_COLS, DENSE_COLS, spec, args.buffer_rows)
    trainer = Trainer()
    fixed = list(itertools.islice(memory.batches(0), 4))  # the training step alone cycles over these
    sources: dict[str, Iterator[Batch]] = {
        "memory": endless(memory.batches),
        "stream": endless(stream.batches),
        "train+memory": endless(memory.batches),
        "train+memory+prefetch": endless(PrefetchedBatches(memory, 2).batches),
        "train+stream+prefetch": endless(PrefetchedBatches(stream, 2).batches),
    }
    fixed_cycle = itertools.cycle(fixed)

    def window(name: str) -> Callable[[int], float]:
        with_model = name.startswith("train")
        steps = args.train_steps if with_model else args.loader_steps
        source: Iterator[Batch] = fixed_cycle if name == "train" else sources[name]

        def run(_round: int) -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                batch = next(source)
                if with_model:
                    trainer.step(batch)
            return steps / (time.perf_counter() - t0)

        return run

    names = ["train", "memory", "stream", "train+memory", "train+memory+prefetch", "train+stream+prefetch"]

    def warmup(name: str) -> None:
        window(name)(-1)  # one window outside the timing: allocations, page cache, thread start

    load_before = os.getloadavg()
    runs = interleaved_windows({n: window(n) for n in names}, warmup, args.rounds)
    for source in sources.values():
        source.close()  # stops the prefetch threads
    stats = {n: spread(v) for n, v in runs.items()}
    train_rate = stats["train"]
    ratios = {
        loader: {"median_over_median": stats[loader]["median"] / train_rate["median"],
                 "min_over_max": stats[loader]["min"] / train_rate["max"]}
        for loader in ("memory", "stream")
    }
    result = {
        "benchmark": "loader",
        "timestamp": utc_timestamp(),
        "machine": machine_info(["torch", "pyarrow", "polars"]),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "setup": {"rows": args.rows, "row_group_rows": 65_536, "buffer_rows": args.buffer_rows,
                  "stream_buffers": len(stream.buffers), "components": K, "batch": BATCH,
                  "penalty_batch": BATCH, "data_order": "independent", "embedding_dim": EMBEDDING_DIM,
                  "mlp": list(MLP), "rounds": args.rounds, "train_steps_per_window": args.train_steps,
                  "loader_steps_per_window": args.loader_steps, "prefetch_depth": 2},
        "steps_per_s": stats,
        "examples_per_s_median": {n: s["median"] * BATCH for n, s in stats.items()},
        "loader_over_train": ratios,
        "targets": {
            f"{loader}_loader_ge_{TARGET:g}x_train": {"value": r["median_over_median"],
                                                      "met": r["median_over_median"] >= TARGET}
            for loader, r in ratios.items()
        },
    }
    write_json(out, result)
    rows = [[n, s["min"], s["median"], s["max"], s["median"] * BATCH] for n, s in stats.items()]
    print(format_table(["variant", "steps/s min", "median", "max", "ex/s median"], rows))
    for loader, r in ratios.items():
        print(f"{loader} loader / training step: {r['median_over_median']:.1f}x median "
              f"({r['min_over_max']:.1f}x min over max); target >= {TARGET:g}x")
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
