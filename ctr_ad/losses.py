"""Ensemble loss and the anti-distillation penalties.

Notation: ``z`` are component logits of shape [K, B] (K components, B rows of a mini-batch), ``y`` the
0/1 labels [B], σ the sigmoid. The training loss is

    L = Σ_k BCE(y, σ(z_k)) + λ(t) · penalty(z),      λ(t) = λ · min(1, t / warmup_steps)

with BCE averaged over the rows of the batch. λ = 0 (or penalty ``none``) is the plain ensemble.

Penalties are registered by name in :data:`PENALTIES`; a new one is a function
``fn(z: Tensor[K, B], *, signed: bool, eps: float) -> Tensor[]`` decorated with
``@register_penalty("name")``. All of them return 0 for K = 1 (nothing to push apart).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PenaltyFn = Callable[..., Tensor]
PENALTIES: dict[str, PenaltyFn] = {}
# Modules that register further penalties; imported on demand by :func:`available_penalties` so that
# a config or bundle naming one of them validates in any process (trainer, predict, service).
PLUGIN_MODULES = ("ctr_ad.penalties_extra",)


def available_penalties() -> dict[str, PenaltyFn]:
    """:data:`PENALTIES` after importing the plugin modules that exist in this build."""
    import importlib

    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return PENALTIES


def register_penalty(name: str) -> Callable[[PenaltyFn], PenaltyFn]:
    """Add a penalty to :data:`PENALTIES` under ``name`` (the ``anti_distillation.penalty`` config value)."""

    def wrap(fn: PenaltyFn) -> PenaltyFn:
        if name in PENALTIES:
            raise ValueError(f"penalty {name!r} registered twice")
        PENALTIES[name] = fn
        return fn

    return wrap


def pairwise_correlation(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Pearson correlation matrix [K, K] of the rows of ``x`` [K, B], centred over the batch.

    corr[k, l] = Σ_b x̃_kb x̃_lb / sqrt((Σ_b x̃_kb² + B·eps)(Σ_b x̃_lb² + B·eps)),  x̃ = x − mean_b x.
    The ``eps`` floor on the variances keeps the gradient bounded when a component is nearly constant
    on the batch: normalising tiny deviations would otherwise amplify noise.
    """
    xc = x - x.mean(dim=1, keepdim=True)
    n = x.shape[1]
    cov = xc @ xc.T / n
    std = torch.sqrt(torch.diagonal(cov) + eps)
    return cov / (std[:, None] * std[None, :])


def _mean_off_diagonal(corr: Tensor, signed: bool) -> Tensor:
    k = corr.shape[0]
    if k < 2:
        return corr.new_zeros(())
    mask = ~torch.eye(k, dtype=torch.bool, device=corr.device)
    off = corr[mask]
    return off.mean() if signed else off.square().mean()


@register_penalty("output_decorrelation")
def output_decorrelation(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """Mean over k ≠ l of corr(z_k, z_l)² (``signed``: of corr(z_k, z_l)).

    corr is the Pearson correlation over the batch of the centred logits z_k − mean_b z_k
    (see :func:`pairwise_correlation`). Minimising it makes the components' outputs disagree on
    which rows of the batch are above their own average.
    """
    return _mean_off_diagonal(pairwise_correlation(z, eps), signed)


@register_penalty("deviation_decorrelation")
def deviation_decorrelation(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """Mean over k ≠ l of corr(d_k, d_l)², with d_k = z_k − mean_k z_k (``signed``: of corr).

    The same correlation as :func:`output_decorrelation`, on each component's deviation from the
    ensemble mean logit, so that the shared signal does not enter the penalty. Note Σ_k d_k = 0, so for
    K = 2 the deviations are exactly anti-correlated (corr² = 1, a constant).
    """
    d = z - z.mean(dim=0, keepdim=True)
    return _mean_off_diagonal(pairwise_correlation(d, eps), signed)


@register_penalty("negative_correlation")
def negative_correlation(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """Negative correlation learning (Liu & Yao 1999): −mean_k mean_b (σ(z_kb) − p_b)², p = mean_k σ(z_k).

    Rewards the spread of the component probabilities around the ensemble prediction.
    ``signed`` and ``eps`` are accepted for a uniform signature and unused.
    """
    p_k = torch.sigmoid(z)
    p = p_k.mean(dim=0, keepdim=True)
    return -(p_k - p).square().mean()


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


def penalty_value(name: str, logits: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """Evaluate the named penalty ('none' gives 0) on logits [K, B]."""
    if name == "none":
        return logits.new_zeros(())
    fn = PENALTIES.get(name) or available_penalties().get(name)
    if fn is None:
        raise ValueError(f"unknown penalty {name!r}; known: {sorted(PENALTIES)}")
    return fn(logits, signed=signed, eps=eps)
