"""Training throughput: the vectorized ensemble against a loop of K models and against deepctr-torch.

Criteo-shaped synthetic tensors (13 dense + 26 categorical fields, Zipf-distributed ids, a few
hundred thousand embedding rows per component), embedding 16, MLP 400-400-400, one logit.
For K in {1, 4, 8} and batch in {4096, 512}, examples/s of:
  (a) ``EnsembleCTR`` with K components, one vectorized step (the product's optimizers);
  (b) K separate ``EnsembleCTR(components=1)`` modules stepped one after the other (same optimizer
      and math): what vectorizing must beat;
  (c) deepctr-torch's DeepFM with the FM part off (linear + DNN, same sizes), trained K times with
      its own ``fit`` on the same rows (how a user of that package would train K models).
Also the achieved model GFLOP/s of (a) against this machine's fp32 ``torch.matmul`` GFLOP/s measured
in the same run (fraction of the roofline). Every figure is a median over ``--repeats`` windows.

    python benchmarks/bench_train.py                 # CPU, writes benchmarks/results/train.json
    python benchmarks/bench_train.py --device cuda   # GPU, writes benchmarks/results/train-cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctr_ad.config import Config
from ctr_ad.losses import summed_bce
from ctr_ad.model import EnsembleCTR
from ctr_ad.optim import build_optimizers
from ctr_ad.penalties import penalty_value

from common import format_table, machine_info, utc_timestamp, write_json

N_DENSE = 13
EMBEDDING_DIM = 16
MLP = (400, 400, 400)
# Criteo-like field cardinalities, capped so one component holds ~450k embedding rows.
CARDINALITIES = (1_400, 550, 100_000, 60_000, 300, 24, 12_000, 630, 3, 50_000, 5_700, 100_000, 3_200,
                 27, 14_000, 60_000, 10, 5_600, 2_200, 4, 80_000, 18, 15, 40_000, 100, 30_000)
RESULTS = Path(__file__).resolve().parent / "results"


def make_data(rows: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    cols = []
    for card in CARDINALITIES:
        # Zipf-like ids: a few hot rows and a long tail, as in click logs.
        ranks = np.minimum((rng.pareto(0.6, rows)).astype(np.int64), card - 1)
        cols.append(ranks)
    cat = torch.from_numpy(np.stack(cols, axis=1)).to(device)
    dense = torch.from_numpy(rng.standard_normal((rows, N_DENSE), dtype=np.float32)).to(device)
    label = torch.from_numpy((rng.random(rows) < 0.25).astype(np.float32)).to(device)
    return cat, dense, label


def config(k: int, penalty: str = "none", lam: float = 0.0) -> Config:
    return Config.from_dict({
        "model": {"components": k, "embedding_dim": EMBEDDING_DIM, "mlp": list(MLP)},
        "anti_distillation": {"penalty": penalty, "lambda": lam},
    })


def sparse_embeddings(cfg: Config) -> bool:
    return cfg.train.embedding_optimizer != "adam"


def make_model(cfg: Config, k: int, device: torch.device) -> tuple[EnsembleCTR, list[torch.optim.Optimizer]]:
    sparse = sparse_embeddings(cfg)
    model = EnsembleCTR(CARDINALITIES, N_DENSE, components=k, embedding_dim=EMBEDDING_DIM, mlp=MLP,
                        sparse=sparse).to(device)
    return model, build_optimizers(model, cfg, sparse)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step(model: EnsembleCTR, opts: list[torch.optim.Optimizer], cfg: Config, cat: torch.Tensor,
         dense: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """One training step with the product's math (summed BCE over components + λ·penalty)."""
    with _autocast(cat.device):
        logits = model(cat, dense)
    logits = logits.float()
    loss = summed_bce(logits, label)
    ad = cfg.anti_distillation
    if ad.active:
        loss = loss + ad.lam * penalty_value(ad.penalty, logits)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(run_step, n_rows: int, batch: int, steps: int, repeats: int, device: torch.device) -> float:
    """Median examples/s over ``repeats`` windows of ``steps`` steps (after 2 warm-up steps)."""
    starts = range(0, n_rows - batch + 1, batch)
    order = list(starts)
    for i in range(2):
        run_step(order[i % len(order)])
    sync(device)
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            run_step(order[(r * steps + i) % len(order)])
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_vectorized(k: int, batch: int, data, steps: int, repeats: int, device: torch.device,
                     penalty: str = "none", lam: float = 0.0) -> float:
    cfg = config(k, penalty, lam)
    torch.manual_seed(0)
    model, opts = make_model(cfg, k, device)
    cat, dense, label = data

    def run(s: int) -> None:
        step(model, opts, cfg, cat[s:s + batch], dense[s:s + batch], label[s:s + batch])

    return time_steps(run, cat.shape[0], batch, steps, repeats, device)


def bench_loop(k: int, batch: int, data, steps: int, repeats: int, device: torch.device) -> float:
    cfg = config(1)
    torch.manual_seed(0)
    models = [make_model(cfg, 1, device) for _ in range(k)]
    cat, dense, label = data

    def run(s: int) -> None:
        for model, opts in models:
            step(model, opts, cfg, cat[s:s + batch], dense[s:s + batch], label[s:s + batch])

    return time_steps(run, cat.shape[0], batch, steps, repeats, device)


def bench_deepctr(k: int, batch: int, data, steps: int, repeats: int, device: torch.device) -> float | None:
    try:
        from deepctr_torch.inputs import DenseFeat, SparseFeat
        from deepctr_torch.models import DeepFM
    except ImportError:
        return None
    cat, dense, label = (t.cpu().numpy() for t in data)
    rows = min(cat.shape[0], steps * batch)
    feats = [SparseFeat(f"C{i}", card, embedding_dim=EMBEDDING_DIM) for i, card in enumerate(CARDINALITIES)]
    feats += [DenseFeat(f"I{i}", 1) for i in range(N_DENSE)]
    x = {f"C{i}": cat[:rows, i] for i in range(len(CARDINALITIES))}
    x |= {f"I{i}": dense[:rows, i] for i in range(N_DENSE)}
    y = label[:rows]
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _component in range(k):
            # deepctr prints the device and a "Train on N samples" line: keep the table readable.
            with contextlib.redirect_stdout(io.StringIO()):
                model = DeepFM(feats, feats, use_fm=False, dnn_hidden_units=MLP, dnn_dropout=0.0,
                               device=str(device), seed=0)
                model.compile("adam", "binary_crossentropy")
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
        sync(device)
        rates.append(rows / (time.perf_counter() - t0))
    return statistics.median(rates)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM throughput of this machine: the roofline the model's FLOP/s is compared with."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    with torch.autocast(device.type, enabled=False):
        for _ in range(2):
            a @ b
        sync(device)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = 4 if device.type == "cpu" else 50
            for _ in range(n):
                a @ b
            sync(device)
            rates.append(n * 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def train_flops_per_example(k: int) -> float:
    """Forward + backward ≈ 3 × forward FLOPs of the MLP matmuls, per component."""
    widths = [len(CARDINALITIES) * EMBEDDING_DIM + N_DENSE, *MLP, 1]
    macs = sum(a * b for a, b in itertools.pairwise(widths))
    return 3 * 2 * macs * k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 512])
    p.add_argument("--steps", type=int, default=None, help="steps per timing window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-deepctr", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: K=1,2, tiny windows")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.ks, args.batches, args.repeats = [1, 2], [512], 1
    out = args.out or RESULTS / ("train.json" if device.type == "cpu" else f"train-{device.type}.json")

    roofline = matmul_gflops(device)
    print(f"fp32 matmul roofline on {device}: {roofline:.1f} GFLOP/s", flush=True)
    results: list[dict[str, Any]] = []
    for batch in args.batches:
        steps = args.steps or (20 if device.type == "cuda" else max(3, 16384 // batch))
        if args.quick:
            steps = 2
        data = make_data(max(batch * (steps * args.repeats + 2), batch * 4), seed=1, device=device)
        for k in args.ks:
            a = bench_vectorized(k, batch, data, steps, args.repeats, device)
            b = bench_loop(k, batch, data, steps, args.repeats, device)
            c = None if args.no_deepctr else bench_deepctr(k, batch, data, steps, args.repeats, device)
            gflops = a * train_flops_per_example(k) / 1e9
            row = {"K": k, "batch": batch, "vectorized_ex_s": a, "loop_ex_s": b, "deepctr_ex_s": c,
                   "vectorized_over_loop": a / b, "vectorized_over_deepctr": (a / c) if c else None,
                   "model_gflops": gflops, "roofline_fraction": gflops / roofline}
            if k > 1:  # the cost of the anti-distillation penalty on top of the plain ensemble
                row["vectorized_with_penalty_ex_s"] = bench_vectorized(
                    k, batch, data, steps, args.repeats, device, "output_decorrelation", 0.1)
            results.append(row)
            print(format_table(list(row), [list(row.values())]), flush=True)
    cfg = config(4)
    targets = {
        "roofline_fraction_K4_b4096": ">= 0.60",
        "vectorized_over_deepctr_K4": ">= 1.5 at both batch sizes",
        "vectorized_over_loop_K4": ">= 1.0 at both batch sizes (>= 2 at batch 512 on GPU)",
        "gpu_K4_examples_per_s": ">= 1,000,000 with data resident on the GPU",
    }
    report = {
        "benchmark": "train",
        "timestamp": utc_timestamp(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "machine": machine_info(["torch", "numpy", "deepctr-torch"]),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews absolute numbers; ratios measured in the same run much less.
        "load_average_1_5_15": list(os.getloadavg()),
        "model": {"embedding_dim": EMBEDDING_DIM, "mlp": MLP, "n_dense": N_DENSE,
                  "fields": len(CARDINALITIES), "embedding_rows_per_component": sum(CARDINALITIES),
                  "embedding_optimizer": cfg.train.embedding_optimizer, "amp_bf16": device.type == "cuda"},
        "matmul_fp32_gflops": roofline,
        "repeats": args.repeats,
        "results": results,
        "targets": targets,
    }
    write_json(out, report)
    headers = ["K", "batch", "vectorized ex/s", "loop ex/s", "deepctr ex/s", "a/b", "a/c", "roofline"]
    keys = ["K", "batch", "vectorized_ex_s", "loop_ex_s", "deepctr_ex_s", "vectorized_over_loop",
            "vectorized_over_deepctr", "roofline_fraction"]
    rows = [[r[key] for key in keys] for r in results]
    print(format_table(headers, rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
