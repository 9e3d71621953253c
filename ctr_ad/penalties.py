"""Anti-distillation penalties: one registry, every penalty the trainer can name.

Notation: ``z`` are component logits [K, B] (K components, B rows of the batch every component sees).
A penalty is ``fn(z, *, signed: bool, eps: float) -> Tensor[]``, 0 for K = 1 (nothing to push apart),
registered under its config name (``anti_distillation.penalty``) with ``@register_penalty("name")``.
The training loss is Σ_k BCE(y, σ(z_k)) + λ(t) · penalty(z) (``ctr_ad.losses``).

* ``output_decorrelation`` — mean over k ≠ l of corr(z_k, z_l)² over the batch.
* ``deviation_decorrelation`` — the same on the deviations from the ensemble mean logit.
* ``negative_correlation`` — negative correlation learning (Liu & Yao 1999) on probabilities.
* ``prob_decorrelation`` — output decorrelation of the probabilities σ(z_k) rather than the logits.
* ``hinge_decorrelation_<ρ0>`` — corr pushed down only above ρ0 ∈ {0.5, 0.8}, so a large λ cannot
  drive components to anti-correlated, individually useless solutions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

HINGE_TARGETS = (0.5, 0.8)

PenaltyFn = Callable[..., Tensor]
PENALTIES: dict[str, PenaltyFn] = {}


def available_penalties() -> dict[str, PenaltyFn]:
    """Every registered penalty by name."""
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


def prob_decorrelation(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """Mean over k ≠ l of corr(σ(z_k), σ(z_l))² (``signed``: of corr), centred over the batch.

    Probabilities of CTR data have tiny variances, so the eps floor is scaled down by 1e-4.
    """
    return _mean_off_diagonal(pairwise_correlation(torch.sigmoid(z), eps * 1e-4), signed)


def hinge_decorrelation(z: Tensor, target: float, eps: float = 1e-6) -> Tensor:
    """Mean over k ≠ l of max(0, corr(z_k, z_l) − target)²."""
    corr = pairwise_correlation(z, eps)
    k = corr.shape[0]
    if k < 2:
        return corr.new_zeros(())
    off = corr[~torch.eye(k, dtype=torch.bool, device=corr.device)]
    return torch.relu(off - target).square().mean()


def _hinge(target: float) -> PenaltyFn:
    def fn(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
        return hinge_decorrelation(z, target, eps)

    fn.__doc__ = f"hinge decorrelation of the logits above ρ0 = {target}"
    return fn


register_penalty("prob_decorrelation")(prob_decorrelation)
for _t in HINGE_TARGETS:
    register_penalty(f"hinge_decorrelation_{_t:g}")(_hinge(_t))


def penalty_value(name: str, logits: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """Evaluate the named penalty ('none' gives 0) on logits [K, B]."""
    if name == "none":
        return logits.new_zeros(())
    fn = PENALTIES.get(name)
    if fn is None:
        raise ValueError(f"unknown penalty {name!r}; known: {sorted(PENALTIES)}")
    return fn(logits, signed=signed, eps=eps)
