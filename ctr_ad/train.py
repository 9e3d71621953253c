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
to dense ones with Adam (allreduce of sparse tensors is unsupported by NCCL and slow on gloo);
``train.parallelism: component`` instead gives each rank whole components and keeps them sparse
(``ctr_ad.component_parallel``).

Memory: before the model is built, the parameter, gradient and optimizer-state bytes per device are
printed and checked against what the device has (``ctr_ad.memory``); a model that cannot fit is refused
in one line. Batches come from a background thread (``data.prefetch_batches``, ``ctr_ad.prefetch``).

Reproducibility: ``seed_init`` draws the weights (components one after another, so they differ),
``seed_data`` the data orders (pure functions of seed, epoch and component: see ``ctr_ad.data``).
``deterministic`` adds ``torch.use_deterministic_algorithms(True)``. A checkpoint (model, optimizers,
schedulers, RNG states, step/epoch/position, early-stopping state) is written atomically every
``checkpoint_every_steps`` steps and on SIGTERM; ``resume=True`` continues from it, bit-identically in
deterministic mode.

Outputs in ``out_dir`` (a :class:`ctr_ad.layout.RunDir`): ``config.yaml``, ``metrics.jsonl`` (one line
per evaluation), ``checkpoint.pt`` (``ctr_ad.checkpoint``), ``bundle/`` (``ctr_ad.bundle``).

Structure: :class:`Trainer` holds the run's state; its stages read top to bottom —
``__init__`` (set-up and resume), :meth:`Trainer.fit` (the loop: step, evaluate, should-stop, save) and
:meth:`Trainer.finish` (best weights, test scoring, bundle).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from ctr_ad import bundle as bundle_mod
from ctr_ad import checkpoint as ckpt
from ctr_ad import distributed as dist_mod
from ctr_ad.artifacts import write_document
from ctr_ad.averaging import WeightAverager
from ctr_ad.component_parallel import ComponentLayout, ComponentShards, join_component_group, layout_for
from ctr_ad.config import Config, load_config
from ctr_ad.data import Batch, MemoryBatches, PlanSpec, StreamBatches, TensorData, derive_seed, load_split
from ctr_ad.dataset import verify_data_dir
from ctr_ad.errors import UserError
from ctr_ad.evaluation import Evaluation, autocast, evaluate, score_logits
from ctr_ad.files import finite_or_none
from ctr_ad.layout import DataDir, RunDir
from ctr_ad.losses import lambda_at, summed_bce
from ctr_ad.memory import available_memory, check_fits, estimate_memory
from ctr_ad.model import EnsembleCTR
from ctr_ad.optim import build_optimizers, build_schedulers, clip_grad_norm
from ctr_ad.penalties import penalty_value
from ctr_ad.prefetch import PrefetchedBatches
from ctr_ad.selection import improved_components, keep_components
from ctr_ad.threads import apply_threads, model_step_flops

logger = logging.getLogger(__name__)

# Linear anchors fitted in this process, by (data fingerprint, anchor_C): replicas share them.
_ANCHOR_CACHE: dict[tuple[str | None, float | None], Any] = {}

# Config keys that may change between a run and its resume (they do not change the math).
# A checkpoint holds the whole ensemble under either parallelism, so a run may resume under the other.
RESUME_FREE_KEYS = {
    ("train", "device"), ("train", "progress"), ("train", "threads"), ("train", "parallelism"),
    ("train", "memory_limit_gib"), ("data", "prefetch_batches"),
}


class TrainingInterrupted(Exception):
    """SIGTERM arrived; a checkpoint was written. Resume with ``--resume``."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} (resume with --resume)")
        self.step = step
        self.checkpoint = checkpoint


class TrainingDiverged(UserError):
    """The loss or the validation scores became NaN/inf: no bundle is written from such weights."""

    def __init__(self, step: int, what: str, lr: float, checkpoint: Path | None) -> None:
        where = f"; the last checkpoint before it is {checkpoint}" if checkpoint is not None else ""
        super().__init__(
            f"training diverged at step {step}: {what} is not finite (train.lr={lr:g}); lower train.lr, "
            f"set train.grad_clip, or check the data{where}"
        )
        self.step = step


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
    #: The test split scored by the returned (best) weights: logits [K, N] and labels [N], so callers
    #: such as experiments need not read and score the test split again.
    test: Evaluation | None = field(default=None, repr=False)
    #: The validation split scored by the same weights (experiments choose arms on it).
    valid: Evaluation | None = field(default=None, repr=False)


@dataclass
class LoopState:
    """Everything about progress that a checkpoint must restore (plain values only)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_logloss: float = math.inf
    best_auc: float = math.nan
    best_step: int = 0
    #: best_step_selection: per_component — each component's best validation logloss and its step.
    component_best_logloss: list[float] = field(default_factory=list)
    component_best_step: list[int] = field(default_factory=list)
    bad_evals: int = 0
    stopped_early: bool = False
    done: bool = False
    last_eval_step: int = -1


@dataclass
class Window:
    """Running sums of the training loss since the last evaluation (logged, then reset)."""

    loss: float = 0.0
    bce: float = 0.0
    penalty: float = 0.0
    steps: int = 0
    rows: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, bce: float, penalty: float, rows: int) -> None:
        self.loss += loss
        self.bce += bce
        self.penalty += penalty
        self.steps += 1
        self.rows += rows

    def sums(self) -> dict[str, float]:
        """What a checkpoint keeps, so a resumed run logs the same metrics."""
        return {"loss": self.loss, "bce": self.bce, "penalty": self.penalty, "steps": self.steps, "rows": self.rows}

    def examples_per_s(self) -> float:
        return self.rows / max(time.perf_counter() - self.t0, 1e-9)


# --------------------------------------------------------------------------------------------- setup helpers
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


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys (outside :data:`RESUME_FREE_KEYS`) on which two config dicts differ."""
    diffs = []
    for section in sorted((set(a) | set(b)) - {"tracking"}):  # where a run is logged does not change it
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if (section, key) not in RESUME_FREE_KEYS and sa.get(key) != sb.get(key):
                diffs.append(f"{section}.{key}: {sa.get(key)!r} → {sb.get(key)!r}")
    return diffs


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


# --------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """One training run of an ensemble on an ingested data directory into a run directory."""

    def __init__(self, data_dir: Path, cfg: Config, out_dir: Path, *, resume: bool, verbose: bool,
                 anchor_cache: Path | None = None) -> None:
        from ctr_ad.features import FeatureProcessor

        self.anchor_cache = anchor_cache
        self.cfg, self.t, self.ad = cfg, cfg.train, cfg.anti_distillation
        self.data, self.run = DataDir(data_dir), RunDir(out_dir)
        # Refuses a directory without a manifest or with files that do not match it.
        self.fingerprint = verify_data_dir(data_dir).fingerprint
        self.features = FeatureProcessor.load(self.data.features)
        self.device = select_device(self.t.device)
        component = self.t.parallelism == "component"
        self.ctx = dist_mod.init(self.device.type, join_single=component)
        if self.device.type == "cuda" and self.ctx.enabled:
            self.device = torch.device("cuda", self.ctx.local_rank)
        # Component parallelism whenever torchrun started this process (one rank included); without
        # torchrun the one process holds every component, which is the same computation.
        self.layout: ComponentLayout | None = (
            layout_for(cfg.model.components, self.ctx.world, self.ctx.rank)
            if component and torch.distributed.is_initialized() else None
        )
        self.shards: ComponentShards | None = None
        self.verbose = verbose and self.ctx.is_main
        set_determinism(self.t.deterministic)
        self._choose_threads()
        checkpoint = self._prepare_run_dir(resume)
        self._build_data()
        self._check_memory()
        self._build_model(fit_anchor=checkpoint is None)
        self.state = LoopState()
        self.window = Window()
        self.best_weights: dict[str, Tensor] | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
        elif self.ctx.is_main:
            self.run.metrics.unlink(missing_ok=True)

    def _choose_threads(self) -> None:
        """Intra-op threads from the work of one step and the CPUs this process may use (cgroup quota,
        affinity, shared between local ranks): small models gain nothing from a second thread and fall
        off a cliff on a busy host. ``train.threads`` or ``CTR_AD_THREADS`` override the choice."""
        work = model_step_flops(self.cfg.model, len(self.features.categorical_columns),
                                len(self.features.dense_columns), self.t.batch_size)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = apply_threads(self.t.threads, work, processes=local)
        self._say(f"{threads} intra-op thread(s) for about {work:.2g} FLOP per step")

    def _say(self, msg: str) -> None:
        if self.verbose:
            logger.info(msg)

    # ---- set-up
    def _prepare_run_dir(self, resume: bool) -> dict[str, Any] | None:
        """Validate a checkpoint to resume from (or refuse to overwrite a run); write config.yaml."""
        checkpoint = None
        if self.ctx.is_main:
            self.run.root.mkdir(parents=True, exist_ok=True)
        if resume and self.run.checkpoint.is_file():
            checkpoint = ckpt.load(self.run.checkpoint)
            diffs = config_diff(checkpoint["config"], self.cfg.to_dict())
            if diffs:
                raise UserError(f"{self.run.checkpoint}: config differs from the checkpoint's: {'; '.join(diffs)}")
            if checkpoint.get("fingerprint") != self.fingerprint:
                raise UserError(f"{self.run.checkpoint}: data fingerprint differs from {self.data.manifest}")
            self._say(f"resuming from step {checkpoint['state']['step']}")
        elif resume:
            self._say(f"no checkpoint in {self.run.root}: starting fresh")
        else:
            # Rank 0 decides and tells the others, so no rank waits at a collective for one that raised.
            taken = self.ctx.is_main and (self.run.checkpoint.exists() or self.run.bundle.exists())
            if dist_mod.broadcast_object(self.ctx, taken):
                raise UserError(f"{self.run.root}: already holds a run; pass --resume or choose a new --out")
        if self.ctx.is_main:
            self.run.config.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        return checkpoint

    def _build_data(self) -> None:
        t, ad, ctx = self.t, self.ad, self.ctx
        cat_cols, dense_cols = self.features.categorical_columns, self.features.dense_columns
        lay = self.layout
        # DDP needs dense gradients; component parallelism syncs sparse ones itself.
        self.sparse = t.embedding_optimizer in ("sparse_adam", "adagrad") and (lay is not None or not ctx.enabled)
        # The ranks that split one batch: the whole world under DDP, one component group otherwise.
        self.shard_world = lay.group_size if lay is not None else ctx.world
        independent = ad.data_order == "independent"
        spec = PlanSpec(
            batch_size=t.batch_size,
            components=lay.count if lay is not None else self.cfg.model.components,
            first_component=lay.first if lay is not None else 0,
            independent=independent,
            penalty_batch_size=(ad.penalty_batch_size or t.batch_size) if (independent and ad.uses_penalty_batch)
            else None,
            seed=t.seed_data,
            rank=lay.group_rank if lay is not None else ctx.rank,
            world=self.shard_world,
        )
        has_test = self.data.test.is_file()
        self.plan: MemoryBatches | StreamBatches | PrefetchedBatches
        self.valid: TensorData | Path
        self.test: TensorData | Path | None
        if self.cfg.data.loader == "memory":
            self.plan = MemoryBatches(load_split(self.data.train, cat_cols, dense_cols), spec)
            self.valid = load_split(self.data.valid, cat_cols, dense_cols)
            self.test = load_split(self.data.test, cat_cols, dense_cols) if has_test else None
        else:
            self.plan = StreamBatches(self.data.train, cat_cols, dense_cols, spec, self.cfg.data.stream_buffer_rows)
            self.valid = self.data.valid
            self.test = self.data.test if has_test else None
        depth = self.cfg.data.prefetch_depth(self.device.type)
        if depth:
            # A background thread prepares the next batches (pinned for non-blocking copies on CUDA).
            self.plan = PrefetchedBatches(self.plan, depth, pin_memory=self.device.type == "cuda")
        self._warn_one_class()
        self.total_steps = self.plan.steps_per_epoch * t.epochs
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        if lay is not None:
            self._say(f"{lay.describe()} (backend {torch.distributed.get_backend()})")
            if lay.groups == 1 and lay.world > 1 and ctx.is_main:
                logger.warning(
                    f"WORLD_SIZE={lay.world} shares no factor with model.components={lay.components}: every rank "
                    "holds all components (data parallelism in one group); choose a world size that divides K "
                    "or is a multiple of it"
                )
        self._say(
            f"{self.plan.rows} train rows, {self.plan.steps_per_epoch} steps/epoch, K={self.cfg.model.components}, "
            f"penalty={ad.penalty} λ={ad.lam}, order={ad.data_order}, device={self.device}, world={ctx.world}"
        )

    def _check_memory(self) -> None:
        """Say what the model will hold per device, and refuse before allocating it when it cannot fit."""
        f = self.features
        estimate = estimate_memory(self.cfg, f.cardinalities, f.categorical_columns, len(f.dense_columns),
                                   self.sparse)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available, source = available_memory(self.device, self.t.memory_limit_gib, processes=local)
        refusal: UserError | None = None
        try:
            self._say(check_fits(estimate, available, source, self.device))
        except UserError as exc:
            refusal = exc
        # Every rank refuses together, so none waits at a collective for one that stopped.
        if dist_mod.any_rank(self.ctx, refusal is not None, self.device):
            raise refusal or UserError(f"another rank: {estimate.describe()} does not fit its device")

    def _warn_one_class(self) -> None:
        """A split with one label value trains a constant model and has no AUC: say so up front."""
        import polars as pl

        for path in (self.data.train, self.data.valid):
            bounds = pl.scan_parquet(path).select(lo=pl.col("label").min(), hi=pl.col("label").max())
            low, high = bounds.collect().row(0)
            if low is not None and low == high:
                logger.warning(
                    f"{path}: every label is {low:g}; the model can only learn a constant and AUC is undefined"
                )

    def _build_model(self, fit_anchor: bool) -> None:
        t, ctx = self.t, self.ctx
        model = EnsembleCTR.from_config(
            self.cfg.model, self.features.cardinalities, len(self.features.dense_columns), sparse=self.sparse,
            fields=self.features.categorical_columns,
        )
        model.reset_parameters(torch.Generator().manual_seed(t.seed_init))
        if model.anchored and fit_anchor:  # a resumed run restores the anchor with the weights
            self._fit_anchor(model)
        if self.layout is not None:
            # The full ensemble was drawn above (so the weights equal a single process's); keep this
            # rank's components.
            local_cfg = self.cfg.model.model_copy(update={"components": self.layout.count})
            local = EnsembleCTR.from_config(
                local_cfg, self.features.cardinalities, len(self.features.dense_columns), sparse=self.sparse
            )
            names = [n for n, _ in local.named_parameters()]
            self.shards = ComponentShards(self.layout, self.device, names, join_component_group(self.layout))
            local.load_state_dict(self.shards.slice_state(model.state_dict()))
            model = local
        model.to(self.device)
        self.model = model
        self.net: nn.Module = model
        if ctx.enabled and self.shards is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizers = build_optimizers(model, self.cfg, self.sparse)
        self.schedulers = build_schedulers(self.optimizers, self.cfg, self.total_steps)
        self.params = list(model.parameters())
        self.averager = (
            WeightAverager(model, t.weight_averaging_epochs, self.plan.steps_per_epoch)
            if t.weight_averaging_epochs > 0
            else None
        )
        # Dropout draws from the global RNG: seed it per rank so shards do not share masks.
        torch.manual_seed(derive_seed(t.seed_init, t.seed_data, ctx.rank, 7))
        random.seed(derive_seed(t.seed_data, ctx.rank, 11))

    def _fit_anchor(self, model: EnsembleCTR) -> None:
        """Fit the frozen linear anchor (deterministic: L-BFGS on the full training split) and record it.

        The fit depends only on the data and ``anchor_C``, so a process reuses it across replicas,
        and processes given the same ``anchor_cache`` directory (an experiment's workers) share it."""
        import polars as pl

        from ctr_ad.linear import fit_linear, shared_fit

        def fit_here() -> Any:
            valid = pl.read_parquet(self.data.valid) if self.data.valid.is_file() else None
            return fit_linear(pl.read_parquet(self.data.train), valid, self.features, self.cfg.model.anchor_C)

        key = (self.fingerprint, self.cfg.model.anchor_C)
        fit = _ANCHOR_CACHE.get(key) if self.fingerprint else None
        if fit is None:
            shared = None
            if self.anchor_cache is not None and self.fingerprint:
                shared = self.anchor_cache / f"anchor-{self.fingerprint}-C{self.cfg.model.anchor_C}.npz"
            fit = shared_fit(shared, fit_here)
            _ANCHOR_CACHE[key] = fit
        if not fit.converged:
            logger.warning(f"the linear anchor (C={fit.C:g}) did not converge in {fit.iterations} iterations")
        model.set_anchor(torch.from_numpy(fit.cat_weight), torch.from_numpy(fit.dense_weight), fit.intercept)
        if self.ctx.is_main:
            write_document(self.run.root / "anchor.json", fit.record())

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        if self.shards is not None:  # the checkpoint holds the whole ensemble: keep this rank's part
            sh = self.shards
            best = checkpoint.get("best_model")
            checkpoint = {
                **checkpoint,
                "model": sh.slice_state(checkpoint["model"]),
                "best_model": sh.slice_state(best) if best is not None else None,
                "optimizers": [sh.slice_optimizer(o) for o in checkpoint["optimizers"]],
                "averager": sh.slice_averager(checkpoint["averager"]) if checkpoint.get("averager") else None,
            }
        self.model.load_state_dict(checkpoint["model"])
        if self.averager is not None:
            self.averager.load_state_dict(checkpoint["averager"])
        for o, s in zip(self.optimizers, checkpoint["optimizers"], strict=True):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, checkpoint["schedulers"], strict=True):
            sch.load_state_dict(s)
        self.state = LoopState(**checkpoint["state"])
        self.best_weights = checkpoint.get("best_model")
        for key, value in checkpoint.get("window", {}).items():
            setattr(self.window, key, value)
        rngs = checkpoint["rng"]
        ckpt.set_rng_state(rngs[min(self.ctx.rank, len(rngs) - 1)], self.device)
        if self.ctx.is_main and self.run.metrics.is_file():
            # Drop evaluations logged after the checkpoint: the resumed run will log them again.
            kept = [
                ln
                for ln in self.run.metrics.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= self.state.step
            ]
            self.run.metrics.write_text("".join(ln + "\n" for ln in kept))

    # ---- the loop
    def fit(self) -> None:
        """Train until the epochs, max_steps or early stopping end the run; SIGTERM checkpoints and raises."""
        show_bar = self.t.progress and self.ctx.is_main and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not show_bar, unit="step",
                   dynamic_ncols=True)
        self.net.train()
        self.started = time.perf_counter()
        with _SigtermFlag() as sigterm, bar:
            while not self._finished():
                for batch in self.plan.batches(self.state.epoch, self.state.step_in_epoch):
                    loss = self._step(batch)
                    if not math.isfinite(loss):
                        raise self._diverged("the training loss")
                    epoch_end = self._advance()
                    if self._evaluation_due(epoch_end):
                        self._evaluate()
                    self.state.done = self._finished()
                    if self.state.done and self.state.last_eval_step != self.state.step:
                        self._evaluate()  # the final weights are candidates for the best checkpoint too
                    self._checkpoint_if_due(sigterm.raised, self.state.last_eval_step == self.state.step)
                    if show_bar:
                        bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{self.window.examples_per_s():,.0f}", refresh=False)
                        bar.update(1)
                    if self.state.done or epoch_end:
                        break
        self.state.done = True
        self.save_checkpoint()  # final state: a --resume of a finished run only rebuilds the bundle

    def _finished(self) -> bool:
        s = self.state
        return s.stopped_early or s.epoch >= self.t.epochs or s.step >= self.total_steps

    def _advance(self) -> bool:
        """Count the step; True when it ended an epoch."""
        s = self.state
        s.step += 1
        s.step_in_epoch += 1
        if s.step_in_epoch < self.plan.steps_per_epoch:
            return False
        s.epoch += 1
        s.step_in_epoch = 0
        return True

    def _evaluation_due(self, epoch_end: bool) -> bool:
        every = self.t.eval_every_steps
        return self.state.step % every == 0 if every else epoch_end

    def _checkpoint_if_due(self, sigterm_raised: bool, evaluated: bool) -> None:
        """Every ``checkpoint_every_steps`` steps, or (0) after every evaluation; always on SIGTERM."""
        interrupted = dist_mod.any_rank(self.ctx, sigterm_raised, self.device)
        every = self.t.checkpoint_every_steps
        if (every and self.state.step % every == 0) or (not every and evaluated) or interrupted:
            self.save_checkpoint()
        if interrupted:
            raise TrainingInterrupted(self.state.step, self.run.checkpoint)

    def _forward_batch(self, batch: Batch) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(own logits [K, B], Σ‖e‖² or None, penalty logits [K, P] or None) of one training batch.

        The penalty's logits come from a second forward without dropout and without the embedding L2
        term: the shared batch when the data orders are independent, the component's own rows
        otherwise (only when the model has dropout; else the own logits serve).
        """
        dev, ad = self.device, self.ad
        cat, dense = batch.cat.to(dev, non_blocking=True), batch.dense.to(dev, non_blocking=True)
        emb_sq = None
        with autocast(dev, self.t.amp):
            if self.t.embedding_l2 > 0:
                logits, emb_sq = self.net(cat, dense, embedding_l2=True)
            else:
                logits = self.net(cat, dense)
            shared = None
            if batch.penalty is not None:
                shared = self.net(batch.penalty.cat.to(dev, non_blocking=True),
                                  batch.penalty.dense.to(dev, non_blocking=True), dropout=False)
            elif ad.active and self.cfg.model.dropout > 0:
                shared = self.net(cat, dense, dropout=False)
        logits = logits.float()
        if shared is None and ad.active:
            shared = logits
        return logits, emb_sq, shared.float() if shared is not None else None

    def _step(self, batch: Batch) -> float:
        """One optimizer step; adds the losses to the window and returns the total loss."""
        ad, t = self.ad, self.t
        own, emb_sq, shared = self._forward_batch(batch)
        label = batch.label.to(self.device, non_blocking=True)
        # Each rank divides by its share of the global batch, so DDP's mean of gradients is the
        # exact global-batch gradient even when the last batch splits unevenly.
        bce = summed_bce(own, label, denominator=batch.global_rows / self.shard_world)
        sh = self.shards
        if sh is not None and shared is not None:
            shared = sh.gather_logits(shared)  # [K, P]: every component, own piece in the graph
        pen = own.new_zeros(())
        pen_term = own.new_zeros(())
        if ad.active and shared is not None:
            pen = penalty_value(ad.penalty, shared, signed=ad.signed, eps=ad.eps)
            pen_term = self._penalty_weight(bce, pen, own, shared) * pen
        elif shared is not None:
            pen_term = 0.0 * shared.sum()  # the λ = 0 control: the shared rows are in the graph
        l2_term = t.embedding_l2 * emb_sq if emb_sq is not None else own.new_zeros(())
        # A group's ranks hold shards of the penalty rows and their gradients are averaged: scale the
        # penalty by the group size so the average is its full gradient.
        loss = bce + pen_term * (self.shard_world if sh is not None else 1) + l2_term
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        if sh is not None:
            sh.sync_gradients(self.params)
            # The additive parts summed over every component: the loss a single process would log.
            bce, l2_term = sh.sum_over_components(torch.stack([bce.detach(), l2_term.detach()])).unbind()
            loss = bce + pen_term + l2_term
        if t.grad_clip is not None:
            clip_grad_norm(self.params, t.grad_clip, sh.sum_over_components if sh is not None else None)
        for o in self.optimizers:
            o.step()
        for s in self.schedulers:
            s.step()
        if self.averager is not None:
            self.averager.update()
        total = float(loss.detach())
        self.window.add(total, float(bce.detach()), float(pen.detach()), batch.global_rows)
        return total

    def _penalty_weight(self, bce: Tensor, pen: Tensor, own: Tensor, shared: Tensor) -> float:
        """λ(t), or with ``lambda_scale: gradient_ratio`` λ(t) · ‖∂BCE/∂z‖ / ‖∂penalty/∂z‖ measured on
        this step's logits, so that λ is the ratio of the two gradients whatever the penalty's units."""
        ad = self.ad
        lam = lambda_at(self.state.step, ad.lam, ad.warmup_steps)
        if ad.lambda_scale == "absolute" or lam == 0.0:
            return lam
        (g_bce,) = torch.autograd.grad(bce, own, retain_graph=True)
        (g_pen,) = torch.autograd.grad(pen, shared, retain_graph=True, allow_unused=True)
        if g_pen is None:
            return 0.0
        bce_sq = g_bce.square().sum()
        if self.shards is not None:
            # Own logits are a [K/G, B/S] block whose BCE was scaled by S (see summed_bce): Σ over
            # ranks of ‖∂BCE/∂z‖² is S² × the full one. ``shared`` is the gathered [K, P] already.
            bce_sq = self.shards.sum_over_components(bce_sq) / self.shard_world
        ratio = float(bce_sq.sqrt()) / max(float(torch.linalg.vector_norm(g_pen)), 1e-12)
        return lam * ratio

    # ---- evaluation and early stopping
    def _score(self, source: TensorData | Path) -> Evaluation:
        f = self.features
        ev = evaluate(self.model, source, f.categorical_columns, f.dense_columns, self.cfg, self.device)
        if self.shards is None or ev.labels.size == 0:
            return ev
        logits = self.shards.gather_logits_array(torch.from_numpy(ev.logits)).numpy()
        return score_logits(logits, ev.labels, self.cfg)

    def _evaluate(self) -> None:
        """Score the validation split, keep the best weights, decide early stopping, log a line."""
        s, w = self.state, self.window
        with self._evaluated_weights():
            ev = self._score(self.valid)
            if not np.isfinite(ev.logits).all():
                raise self._diverged("a validation logit")
            improved = ev.logloss < s.best_logloss
            selecting = self.t.best_step_selection == "ensemble"
            if self.t.best_step_selection == "per_component":
                improved = self._keep_best_components(ev)
            elif improved or not selecting:
                # Without selection the latest evaluation stands for the run (its final weights).
                s.best_logloss, s.best_auc, s.best_step = ev.logloss, ev.auc, s.step
                self.best_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if improved:
            s.bad_evals = 0
        elif not math.isnan(ev.logloss):  # an empty validation split never stops a run
            s.bad_evals += 1
        patience = self.t.early_stopping_patience
        if patience is not None and s.bad_evals >= patience:
            s.stopped_early = True
        s.stopped_early = bool(dist_mod.broadcast_object(self.ctx, s.stopped_early))
        s.last_eval_step = s.step
        steps = max(w.steps, 1)
        record = {
            "step": s.step,
            "epoch": round(s.step / self.plan.steps_per_epoch, 4),
            "train_loss": w.loss / steps,
            "train_bce": w.bce / steps,
            "train_penalty": w.penalty / steps,
            "lambda": lambda_at(s.step, self.ad.lam, self.ad.warmup_steps),
            "lr": self.schedulers[0].get_last_lr()[0],
            "valid_logloss": ev.logloss,
            "valid_auc": ev.auc,
            "valid_component_logloss": ev.component_logloss_mean,
            "valid_logloss_by_component": ev.component_logloss,
            "examples_per_s": w.examples_per_s(),
            "best": improved,
        }
        if self.ctx.is_main:
            with self.run.metrics.open("a") as fh:
                fh.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        self.window = Window()

    def _keep_best_components(self, ev: Evaluation) -> bool:
        """Each component keeps the weights of its own best validation logloss; True if any improved."""
        s = self.state
        k = self.cfg.model.components
        if not s.component_best_logloss:
            s.component_best_logloss, s.component_best_step = [math.inf] * k, [0] * k
        losses = ev.component_logloss or [math.nan] * k
        better = improved_components(losses, s.component_best_logloss)
        if not better:
            return False
        self.best_weights = keep_components(self.model, self.best_weights, better)
        for c in better:
            s.component_best_logloss[c], s.component_best_step[c] = losses[c], s.step
        # The kept ensemble mixes steps: its validation figures are measured again in finish().
        s.best_logloss, s.best_auc, s.best_step = math.nan, math.nan, max(s.component_best_step)
        return True

    def _evaluated_weights(self) -> Any:
        """The weights evaluation and selection see: the averaged ones when averaging is on."""
        return self.averager.swapped_in() if self.averager is not None else contextlib.nullcontext()

    def _diverged(self, what: str) -> TrainingDiverged:
        last = self.run.checkpoint if self.run.checkpoint.is_file() else None
        return TrainingDiverged(self.state.step, what, self.t.lr, last)

    # ---- checkpoints
    def save_checkpoint(self) -> None:
        rng = dist_mod.gather_objects(self.ctx, ckpt.rng_state(self.device))
        model_state = self.model.state_dict()
        optimizers = [o.state_dict() for o in self.optimizers]
        averager = self.averager.state_dict() if self.averager is not None else None
        best = self.best_weights
        if self.shards is not None:  # every rank takes part; rank 0 writes the whole ensemble
            sh = self.shards
            model_state = sh.gather_state(model_state)
            optimizers = [sh.gather_optimizer(o) for o in optimizers]
            averager = sh.gather_averager(averager) if averager is not None else None
            best = sh.gather_state(best) if best is not None else None
        if self.ctx.is_main:
            ckpt.save(
                self.run.checkpoint,
                {
                    "format": ckpt.FORMAT,
                    "config": self.cfg.to_dict(),
                    "fingerprint": self.fingerprint,
                    "model": model_state,
                    "optimizers": optimizers,
                    "schedulers": [s.state_dict() for s in self.schedulers],
                    "rng": rng,
                    "state": asdict(self.state),
                    "best_model": best,
                    "window": self.window.sums(),
                    "averager": averager,
                },
            )
        dist_mod.barrier(self.ctx)

    # ---- the end
    def finish(self, write_bundle: bool) -> TrainResult:
        """Restore the best evaluation's weights, score the test split, write the bundle."""
        s = self.state
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        test = self._score(self.test) if self.test is not None else None
        valid = self._score(self.valid)
        if self.t.best_step_selection == "per_component":
            s.best_logloss, s.best_auc = valid.logloss, valid.auc
        valid_metrics = {"logloss": s.best_logloss, "auc": s.best_auc}
        test_metrics = test.metrics() if test is not None else None
        if self.shards is not None:
            self.model = self._whole_ensemble()
        self._say(
            f"done: {s.step} steps in {time.perf_counter() - self.started:.1f}s, best step {s.best_step}, "
            f"valid logloss {s.best_logloss:.5f} auc {s.best_auc:.4f}"
            + (f", test auc {test_metrics['auc']:.4f}" if test_metrics else "")
        )
        bundle_dir = None
        if write_bundle and self.ctx.is_main:
            bundle_dir = self._write_bundle(valid_metrics, test_metrics)
        dist_mod.barrier(self.ctx)
        return TrainResult(
            run_dir=self.run.root,
            bundle_dir=bundle_dir,
            steps=s.step,
            epochs_completed=s.epoch,
            best_step=s.best_step,
            stopped_early=s.stopped_early,
            valid_metrics=valid_metrics,
            test_metrics=test_metrics,
            model=self.model,
            test=test,
            valid=valid,
        )

    def _whole_ensemble(self) -> EnsembleCTR:
        """The K-component model (on the CPU: it may not fit one device) from every rank's slice."""
        assert self.shards is not None
        state = {k: v.cpu() for k, v in self.shards.gather_state(self.model.state_dict()).items()}
        full = EnsembleCTR.from_config(self.cfg.model, self.features.cardinalities, len(self.features.dense_columns))
        full.load_state_dict(state)
        return full

    def _write_bundle(self, valid_metrics: dict[str, float], test_metrics: dict[str, float] | None) -> Path:
        return bundle_mod.save(
            self.run.bundle,
            self.model,
            self.features,
            self.cfg,
            {
                "data_fingerprint": self.fingerprint,
                "data_dir": str(self.data.root),
                "valid_metrics": valid_metrics,
                "test_metrics": test_metrics,
                "best_step": self.state.best_step,
                "steps": self.state.step,
                "world_size": self.ctx.world,
            },
        )


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
    anchor_cache: str | Path | None = None,
) -> TrainResult:
    """Train an ensemble on ``data_dir`` (output of ``ctr-ad ingest``) into ``out_dir``.

    ``config`` is a :class:`Config`, a YAML path, or None (defaults). ``device``/``deterministic``/
    ``progress`` override the config. Raises :class:`UserError` for bad inputs and
    :class:`TrainingInterrupted` after a SIGTERM (a checkpoint is written first).
    Process-wide torch settings it changes (threads, deterministic algorithms) are restored on return,
    so it can be called repeatedly from one process (experiments, tests). ``anchor_cache``: a
    directory where processes training on the same data share the linear anchor's fit.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    updates = {k: v for k, v in {"device": device, "deterministic": deterministic, "progress": progress}.items()
               if v is not None}
    if updates:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(Path(data_dir), cfg, Path(out_dir), resume=resume, verbose=log,
                          anchor_cache=Path(anchor_cache) if anchor_cache is not None else None)
        trainer.fit()
        return trainer.finish(write_bundle)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)

