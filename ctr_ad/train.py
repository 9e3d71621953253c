"""The training loop: an (anti-distilled) ``EnsembleCTR`` on ingested Parquet splits.

Programmatic use::

    from ctr_ad.config import load_config
    from ctr_ad.train import train
    cfg = load_config("pipelines/configs/demo.yaml", ["model.components=4"])
    result = train("out/criteo8k", cfg, "runs/a")
    result.bundle_dir, result.valid_metrics, result.test_metrics

What one step does (``data_order`` shared): the K components see the same rows; loss =
Σ_k BCE_k + λ(t)·penalty(logits of the batch). With ``independent`` each component sees its own
permutation of the training split (the batch is [K, B, ...]) and, when a penalty is active, one
extra *shared* batch (``anti_distillation.penalty_batch_size`` rows, own seeded order) is appended
to every component's rows in the same vectorized forward; BCE uses each component's own rows only,
the penalty the shared rows only — correlations between components need rows they all see.

Optimizers: AdamW (``lr``, ``weight_decay``) for the MLP; embeddings by ``embedding_optimizer``:
``adam`` (dense gradients, the same Adam), ``sparse_adam`` (SparseAdam) or ``adagrad`` (both on
sparse gradients, so a step touches only the rows of the batch). Under DDP sparse gradients fall back
to dense ones with Adam (allreduce of sparse tensors is unsupported by NCCL and slow on gloo).

Reproducibility: ``seed_init`` draws the weights (components one after another, so they differ),
``seed_data`` the data orders (pure functions of seed, epoch and component: see ``ctr_ad.data``).
``deterministic`` adds ``torch.use_deterministic_algorithms(True)``. A checkpoint (model, optimizers,
schedulers, RNG states, step/epoch/position, early-stopping state) is written atomically every
``checkpoint_every_steps`` steps and on SIGTERM; ``resume=True`` continues from it, bit-identically in
deterministic mode.

Outputs in ``out_dir``: ``config.yaml``, ``metrics.jsonl`` (one line per evaluation),
``checkpoint.pt``, ``bundle/`` (see ``ctr_ad.bundle``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from tqdm import tqdm

from ctr_ad import bundle as bundle_mod
from ctr_ad import distributed as dist_mod
from ctr_ad.config import Config, load_config
from ctr_ad.data import (
    Batch,
    MemoryBatches,
    PlanSpec,
    StreamBatches,
    TensorData,
    derive_seed,
    iter_eval_chunks,
    load_split,
)
from ctr_ad.errors import UserError
from ctr_ad.losses import lambda_at, penalty_value, summed_bce
from ctr_ad.model import EnsembleCTR, ensemble_probability

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Config keys that may change between a run and its resume (they do not change the math).
RESUME_FREE_KEYS = {("train", "device"), ("train", "progress"), ("train", "threads")}


class TrainingInterrupted(Exception):
    """SIGTERM arrived; a checkpoint was written. Resume with ``--resume``."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} (resume with --resume)")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    bundle_dir: Path | None
    steps: int
    epochs_completed: int
    best_step: int
    stopped_early: bool
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    model: EnsembleCTR = field(repr=False)


@dataclass
class LoopState:
    """Everything about progress that a checkpoint must restore (plain values only)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_logloss: float = math.inf
    best_auc: float = math.nan
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    done: bool = False
    last_eval_step: int = -1


# --------------------------------------------------------------------------------------------- setup
def select_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine")
        return torch.device("cuda")
    return torch.device("cpu")


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels everywhere (CUBLAS needs its workspace config set before first use)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


def read_fingerprint(data_dir: Path) -> str | None:
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("fingerprint")
    except ValueError:
        raise UserError(f"{manifest}: not valid JSON") from None


def _lr_lambda(cfg: Config, total_steps: int):
    t = cfg.train
    warm = t.lr_warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if t.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def build_optimizers(model: EnsembleCTR, cfg: Config, sparse: bool) -> list[torch.optim.Optimizer]:
    t = cfg.train
    emb_lr = t.embedding_lr or t.lr
    mlp_params = [*model.weights, *model.biases]
    emb_params = [model.embedding.weight]
    if not sparse:
        # One fused Adam for both groups: embeddings get no weight decay.
        return [
            torch.optim.AdamW(
                [
                    {"params": mlp_params, "lr": t.lr, "weight_decay": t.weight_decay},
                    {"params": emb_params, "lr": emb_lr, "weight_decay": 0.0},
                ]
            )
        ]
    dense_opt = torch.optim.AdamW(mlp_params, lr=t.lr, weight_decay=t.weight_decay)
    if t.embedding_optimizer == "sparse_adam":
        emb_opt: torch.optim.Optimizer = torch.optim.SparseAdam(emb_params, lr=emb_lr)
    else:
        emb_opt = torch.optim.Adagrad(emb_params, lr=emb_lr)
    return [dense_opt, emb_opt]


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm; unlike ``torch.nn.utils.clip_grad_norm_`` it takes sparse grads."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = []
    for g in grads:
        if g.is_sparse:
            g = g.coalesce().values()  # duplicates must be summed before the norm
        norms.append(torch.linalg.vector_norm(g.float()))
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return float(total)


# --------------------------------------------------------------------------------------------- evaluation
def logloss_auc(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan
    return logloss, auc


@torch.inference_mode()
def predict_logits(
    model: EnsembleCTR, chunks: Iterator[TensorData], device: torch.device, amp: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [K, N] float32, labels [N]) over evaluation chunks, in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for chunk in chunks:
        with _autocast(device, amp):
            z = model(chunk.cat.to(device), chunk.dense.to(device))
        logits.append(z.float().cpu())
        labels.append(chunk.label.cpu())
    model.train(was_training)
    if not logits:
        return np.zeros((model.components, 0), np.float32), np.zeros(0, np.float32)
    return torch.cat(logits, dim=1).numpy(), torch.cat(labels).numpy()


def evaluate(
    model: EnsembleCTR,
    source: TensorData | Path,
    features: Any,
    cfg: Config,
    device: torch.device,
) -> dict[str, float]:
    chunks = iter_eval_chunks(source, features.categorical_columns, features.dense_columns, cfg.data.eval_batch_size)
    logits, labels = predict_logits(model, chunks, device, cfg.train.amp)
    if labels.size == 0:
        return {"logloss": math.nan, "auc": math.nan}
    z = torch.from_numpy(logits)
    probs = ensemble_probability(z, cfg.model.prediction).numpy()
    logloss, auc = logloss_auc(labels, probs)
    comp = [logloss_auc(labels, torch.sigmoid(z[k]).numpy())[0] for k in range(z.shape[0])]
    return {"logloss": logloss, "auc": auc, "component_logloss_mean": float(np.mean(comp))}


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- checkpoints
def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, fsync, then rename: a kill leaves the old file or the new, never half."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    diffs = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if (section, key) not in RESUME_FREE_KEYS and sa.get(key) != sb.get(key):
                diffs.append(f"{section}.{key}: {sa.get(key)!r} → {sb.get(key)!r}")
    return diffs


# --------------------------------------------------------------------------------------------- training
class _SigtermFlag:
    """Turns SIGTERM into a flag checked between steps (only installable from the main thread)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(
    data_dir: str | Path,
    config: Config | str | Path | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | None = None,
    deterministic: bool | None = None,
    progress: bool | None = None,
    write_bundle: bool = True,
    log: bool = True,
) -> TrainResult:
    """Train an ensemble on ``data_dir`` (output of ``ctr-ad ingest``) into ``out_dir``.

    ``config`` is a :class:`Config`, a YAML path, or None (defaults). ``device``/``deterministic``/
    ``progress`` override the config. Raises :class:`UserError` for bad inputs and
    :class:`TrainingInterrupted` after a SIGTERM (a checkpoint is written first).
    Process-wide torch settings it changes (threads, deterministic algorithms) are restored on return,
    so it can be called repeatedly from one process (experiments, tests).
    """
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(
            data_dir,
            config,
            out_dir,
            resume=resume,
            device=device,
            deterministic=deterministic,
            progress=progress,
            write_bundle=write_bundle,
            log=log,
        )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def _train(
    data_dir: str | Path,
    config: Config | str | Path | None,
    out_dir: str | Path,
    *,
    resume: bool,
    device: str | None,
    deterministic: bool | None,
    progress: bool | None,
    write_bundle: bool,
    log: bool,
) -> TrainResult:
    from ctr_ad.features import FeatureProcessor

    cfg = config if isinstance(config, Config) else load_config(config)
    updates: dict[str, Any] = {}
    if device is not None:
        updates["device"] = device
    if deterministic is not None:
        updates["deterministic"] = deterministic
    if progress is not None:
        updates["progress"] = progress
    if updates:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})
    t, ad = cfg.train, cfg.anti_distillation

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    features = FeatureProcessor.load(data_dir / "features.json")
    fingerprint = read_fingerprint(data_dir)

    dev = select_device(t.device)
    ctx = dist_mod.init(dev.type)
    if dev.type == "cuda" and ctx.enabled:
        dev = torch.device("cuda", ctx.local_rank)
    set_determinism(t.deterministic)
    if t.threads:
        torch.set_num_threads(t.threads)
    say = (lambda msg: print(f"[train] {msg}", file=sys.stderr)) if (log and ctx.is_main) else (lambda msg: None)

    ckpt_path = out_dir / CHECKPOINT
    checkpoint: dict[str, Any] | None = None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if resume and ckpt_path.is_file():
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diffs = _config_diff(checkpoint["config"], cfg.to_dict())
        if diffs:
            raise UserError(f"{ckpt_path}: config differs from the checkpoint's: {'; '.join(diffs)}")
        if checkpoint.get("fingerprint") != fingerprint:
            raise UserError(f"{ckpt_path}: data fingerprint differs from {data_dir / 'manifest.json'}")
        say(f"resuming from step {checkpoint['state']['step']}")
    elif resume:
        say(f"no checkpoint in {out_dir}: starting fresh")
    else:
        # Rank 0 decides and tells the others, so no rank waits at a collective for one that raised.
        taken = ctx.is_main and (ckpt_path.exists() or (out_dir / "bundle").exists())
        if dist_mod.broadcast_object(ctx, taken):
            raise UserError(f"{out_dir}: already holds a run; pass --resume or choose a new --out")
    if ctx.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ---- data
    cat_cols, dense_cols = features.categorical_columns, features.dense_columns
    sparse = t.embedding_optimizer in ("sparse_adam", "adagrad") and not ctx.enabled
    independent = ad.data_order == "independent"
    spec = PlanSpec(
        batch_size=t.batch_size,
        components=cfg.model.components,
        independent=independent,
        penalty_batch_size=(ad.penalty_batch_size or t.batch_size) if (independent and ad.active) else None,
        seed=t.seed_data,
        rank=ctx.rank,
        world=ctx.world,
    )
    if cfg.data.loader == "memory":
        train_data = load_split(data_dir / "train.parquet", cat_cols, dense_cols)
        plan: MemoryBatches | StreamBatches = MemoryBatches(train_data, spec)
        valid: TensorData | Path = load_split(data_dir / "valid.parquet", cat_cols, dense_cols)
        test: TensorData | Path | None = (
            load_split(data_dir / "test.parquet", cat_cols, dense_cols)
            if (data_dir / "test.parquet").is_file()
            else None
        )
    else:
        plan = StreamBatches(data_dir / "train.parquet", cat_cols, dense_cols, spec, cfg.data.stream_buffer_rows)
        valid = data_dir / "valid.parquet"
        test = data_dir / "test.parquet" if (data_dir / "test.parquet").is_file() else None
    total_steps = plan.steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    say(
        f"{plan.rows} train rows, {plan.steps_per_epoch} steps/epoch, K={cfg.model.components}, "
        f"penalty={ad.penalty} λ={ad.lam}, order={ad.data_order}, device={dev}, world={ctx.world}"
    )

    # ---- model and optimizers
    model = EnsembleCTR.from_config(cfg.model, features.cardinalities, len(dense_cols), sparse=sparse)
    model.reset_parameters(torch.Generator().manual_seed(t.seed_init))
    model.to(dev)
    net: nn.Module = model
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizers = build_optimizers(model, cfg, sparse)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg, total_steps)) for o in optimizers]
    params = list(model.parameters())
    # Dropout draws from the global RNG: seed it per rank so shards do not share masks.
    torch.manual_seed(derive_seed(t.seed_init, t.seed_data, ctx.rank, 7))
    random.seed(derive_seed(t.seed_data, ctx.rank, 11))

    window = {"loss": 0.0, "bce": 0.0, "penalty": 0.0, "steps": 0, "rows": 0, "t0": time.perf_counter()}
    state = LoopState()
    best_state: dict[str, Tensor] | None = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        for o, s in zip(optimizers, checkpoint["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(schedulers, checkpoint["schedulers"]):
            sch.load_state_dict(s)
        state = LoopState(**checkpoint["state"])
        best_state = checkpoint.get("best_model")
        window.update(checkpoint.get("window", {}))
        _set_rng_state(checkpoint["rng"][min(ctx.rank, len(checkpoint["rng"]) - 1)], dev)
        metrics_path = out_dir / METRICS
        if ctx.is_main and metrics_path.is_file():
            # Drop evaluations logged after the checkpoint: the resumed run will log them again.
            kept = [
                ln
                for ln in metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= state.step
            ]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
    elif ctx.is_main:
        (out_dir / METRICS).unlink(missing_ok=True)

    def save_checkpoint() -> None:
        rng = dist_mod.gather_objects(ctx, _rng_state(dev))
        if ctx.is_main:
            atomic_torch_save(
                {
                    "format": 1,
                    "config": cfg.to_dict(),
                    "fingerprint": fingerprint,
                    "model": model.state_dict(),
                    "optimizers": [o.state_dict() for o in optimizers],
                    "schedulers": [s.state_dict() for s in schedulers],
                    "rng": rng,
                    "state": asdict(state),
                    "best_model": best_state,
                    # Running sums since the last evaluation, so a resumed run logs the same metrics.
                    "window": {k: v for k, v in window.items() if k != "t0"},
                },
                ckpt_path,
            )
        dist_mod.barrier(ctx)

    def run_evaluation() -> None:
        nonlocal best_state
        metrics = evaluate(model, valid, features, cfg, dev)
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        steps = max(window["steps"], 1)
        improved = metrics["logloss"] < state.best_logloss
        if improved:
            state.best_logloss, state.best_auc, state.best_step = (
                metrics["logloss"],
                metrics["auc"],
                state.step,
            )
            state.bad_evals = 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif not math.isnan(metrics["logloss"]):  # an empty validation split never stops a run
            state.bad_evals += 1
        if t.early_stopping_patience is not None and state.bad_evals >= t.early_stopping_patience:
            state.stopped_early = True
        state.stopped_early = bool(dist_mod.broadcast_object(ctx, state.stopped_early))
        state.last_eval_step = state.step
        record = {
            "step": state.step,
            "epoch": round(state.step / plan.steps_per_epoch, 4),
            "train_loss": window["loss"] / steps,
            "train_bce": window["bce"] / steps,
            "train_penalty": window["penalty"] / steps,
            "lambda": lambda_at(state.step, ad.lam, ad.warmup_steps),
            "lr": schedulers[0].get_last_lr()[0],
            "valid_logloss": metrics["logloss"],
            "valid_auc": metrics["auc"],
            "valid_component_logloss": metrics["component_logloss_mean"],
            "examples_per_s": window["rows"] / elapsed,
            "best": improved,
        }
        if ctx.is_main:
            with (out_dir / METRICS).open("a") as f:
                f.write(json.dumps(record) + "\n")
        window.update(loss=0.0, bce=0.0, penalty=0.0, steps=0, rows=0, t0=time.perf_counter())

    def train_step(batch: Batch) -> tuple[float, float, float]:
        k = cfg.model.components
        cat, dense = batch.cat.to(dev, non_blocking=True), batch.dense.to(dev, non_blocking=True)
        label = batch.label.to(dev, non_blocking=True)
        own_rows = cat.shape[-2]
        if batch.penalty is not None:
            # Append the shared penalty rows to every component's own rows: still one forward.
            pc = batch.penalty.cat.to(dev).unsqueeze(0).expand(k, -1, -1)
            pd = batch.penalty.dense.to(dev).unsqueeze(0).expand(k, -1, -1)
            cat, dense = torch.cat([cat, pc], dim=1), torch.cat([dense, pd], dim=1)
        emb_sq = None
        with _autocast(dev, t.amp):
            if t.embedding_l2 > 0:
                logits, emb_sq = net(cat, dense, embedding_l2=True)
            else:
                logits = net(cat, dense)
        logits = logits.float()
        own = logits[:, :own_rows]
        # Each rank divides by its share of the global batch, so DDP's mean of gradients is the
        # exact global-batch gradient even when the last batch splits unevenly.
        bce = summed_bce(own, label, denominator=batch.global_rows / ctx.world)
        lam = lambda_at(state.step, ad.lam, ad.warmup_steps)
        pen = logits.new_zeros(())
        if ad.active:
            shared = logits[:, own_rows:] if batch.penalty is not None else own
            pen = penalty_value(ad.penalty, shared, signed=ad.signed, eps=ad.eps)
        loss = bce + lam * pen if ad.active else bce
        if emb_sq is not None:
            loss = loss + t.embedding_l2 * emb_sq
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip is not None:
            clip_grad_norm(params, t.grad_clip)
        for o in optimizers:
            o.step()
        for s in schedulers:
            s.step()
        return float(loss.detach()), float(bce.detach()), float(pen.detach())

    show_bar = t.progress and ctx.is_main and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=state.step, disable=not show_bar, unit="step", dynamic_ncols=True)
    net.train()
    started = time.perf_counter()
    with _SigtermFlag() as sigterm:
        while not state.done:
            if state.epoch >= t.epochs or state.stopped_early or state.step >= total_steps:
                state.done = True
                break
            for batch in plan.batches(state.epoch, state.step_in_epoch):
                loss, bce, pen = train_step(batch)
                state.step += 1
                state.step_in_epoch += 1
                window["loss"] += loss
                window["bce"] += bce
                window["penalty"] += pen
                window["steps"] += 1
                window["rows"] += batch.global_rows
                epoch_end = state.step_in_epoch >= plan.steps_per_epoch
                if epoch_end:
                    state.epoch += 1
                    state.step_in_epoch = 0
                if (t.eval_every_steps and state.step % t.eval_every_steps == 0) or (
                    not t.eval_every_steps and epoch_end
                ):
                    run_evaluation()
                state.done = state.stopped_early or state.epoch >= t.epochs or state.step >= total_steps
                if state.done and state.last_eval_step != state.step:
                    run_evaluation()  # the final weights are candidates for the best checkpoint too
                interrupted = dist_mod.any_rank(ctx, sigterm.raised, dev)
                if (t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0) or interrupted:
                    save_checkpoint()
                if interrupted:
                    bar.close()
                    raise TrainingInterrupted(state.step, ckpt_path)
                if show_bar:
                    rate = window["rows"] / max(time.perf_counter() - window["t0"], 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:,.0f}", refresh=False)
                    bar.update(1)
                if state.done or epoch_end:
                    break
    bar.close()
    save_checkpoint()  # final state: a --resume of a finished run only rebuilds the bundle

    # ---- restore the best evaluation's weights, then test and bundle
    if best_state is not None:
        model.load_state_dict(best_state)
    valid_metrics = {"logloss": state.best_logloss, "auc": state.best_auc}
    test_metrics = evaluate(model, test, features, cfg, dev) if test is not None else None
    if test_metrics is not None:
        test_metrics = {"logloss": test_metrics["logloss"], "auc": test_metrics["auc"]}
    say(
        f"done: {state.step} steps in {time.perf_counter() - started:.1f}s, best step {state.best_step}, "
        f"valid logloss {state.best_logloss:.5f} auc {state.best_auc:.4f}"
        + (f", test auc {test_metrics['auc']:.4f}" if test_metrics else "")
    )
    bundle_dir = None
    if write_bundle and ctx.is_main:
        bundle_dir = bundle_mod.save(
            out_dir / "bundle",
            model,
            features,
            cfg,
            {
                "data_fingerprint": fingerprint,
                "data_dir": str(data_dir),
                "valid_metrics": valid_metrics,
                "test_metrics": test_metrics,
                "best_step": state.best_step,
                "steps": state.step,
                "world_size": ctx.world,
            },
        )
    dist_mod.barrier(ctx)
    return TrainResult(
        run_dir=out_dir,
        bundle_dir=bundle_dir,
        steps=state.step,
        epochs_completed=state.epoch,
        best_step=state.best_step,
        stopped_early=state.stopped_early,
        valid_metrics=valid_metrics,
        test_metrics=test_metrics,
        model=model,
    )
