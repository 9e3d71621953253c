"""The ensemble's data loss and the schedule of the penalty weight λ.

Notation: ``z`` are component logits of shape [K, B] (K components, B rows of a mini-batch), ``y`` the
0/1 labels [B], σ the sigmoid. The training loss is

    L = Σ_k BCE(y, σ(z_k)) + λ(t) · penalty(z),      λ(t) = λ · min(1, t / warmup_steps)

with BCE averaged over the rows of the batch. λ = 0 (or penalty ``none``) is the plain ensemble.

The penalties and their registry live in :mod:`ctr_ad.penalties`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lambda_at(step: int, lam: float, warmup_steps: int) -> float:
    """λ after ``step`` optimizer steps: linear warm-up from 0 over ``warmup_steps`` (0 = none)."""
    if warmup_steps <= 0:
        return lam
    return lam * min(1.0, step / warmup_steps)


def summed_bce(logits: Tensor, labels: Tensor, denominator: int | None = None) -> Tensor:
    """Σ_k BCE(y, σ(z_k)): per-component BCE summed over components, averaged over rows.

    ``logits`` [K, B]; ``labels`` [B] (shared rows) or [K, B] (each component its own rows).
    ``denominator`` replaces B in the row average: data-parallel ranks pass the *global* batch size
    times the reciprocal of the world size, so that DDP's gradient averaging yields the exact
    global-batch mean even when the shards are uneven.
    """
    if labels.dim() == 1:
        labels = labels.unsqueeze(0).expand_as(logits)
    total = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    return total / (logits.shape[1] if denominator is None else denominator)
