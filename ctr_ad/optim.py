"""Optimizers, learning-rate schedules and gradient clipping for :class:`~ctr_ad.model.EnsembleCTR`.

The MLP weights use AdamW (``lr``, ``weight_decay``). Embeddings use ``embedding_optimizer``: ``adam``
(dense gradients, the same AdamW without decay), ``sparse_adam`` (SparseAdam) or ``adagrad`` — the last
two on sparse gradients, so a step touches only the rows of the batch. The model says which
parameters form each group (:meth:`EnsembleCTR.parameter_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ctr_ad.config import Config
from ctr_ad.model import EnsembleCTR


def build_optimizers(model: EnsembleCTR, cfg: Config, sparse: bool) -> list[torch.optim.Optimizer]:
    t = cfg.train
    emb_lr = t.embedding_lr or t.lr
    groups = model.parameter_groups()
    if not sparse:
        # One fused AdamW for both groups: embeddings get no weight decay.
        return [
            torch.optim.AdamW(
                [
                    {"params": groups["dense"], "lr": t.lr, "weight_decay": t.weight_decay},
                    {"params": groups["embedding"], "lr": emb_lr, "weight_decay": 0.0},
                ]
            )
        ]
    dense_opt = torch.optim.AdamW(groups["dense"], lr=t.lr, weight_decay=t.weight_decay)
    if t.embedding_optimizer == "sparse_adam":
        emb_opt: torch.optim.Optimizer = torch.optim.SparseAdam(groups["embedding"], lr=emb_lr)
    else:
        emb_opt = torch.optim.Adagrad(groups["embedding"], lr=emb_lr)
    return [dense_opt, emb_opt]


def lr_factor(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warm-up, then constant/cosine/linear."""
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


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], cfg: Config, total_steps: int
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(cfg, total_steps)) for o in optimizers]


def clip_grad_norm(
    params: list[nn.Parameter], max_norm: float, reduce_square: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> float:
    """Clip the global gradient norm; unlike ``torch.nn.utils.clip_grad_norm_`` it takes sparse grads.

    ``reduce_square`` maps this process's squared norm to the whole model's (component parallelism:
    a sum over the ranks), so every rank clips by the norm a single process would see."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads and reduce_square is None:
        return 0.0
    norms = []
    for g in grads:
        if g.is_sparse:
            g = g.coalesce().values()  # duplicates must be summed before the norm
        norms.append(torch.linalg.vector_norm(g.float()))
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if reduce_square is not None:
        total = reduce_square(total.square()).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return float(total)
