"""Anti-distillation penalties designed by the reproducibility experiments (beyond DESIGN.md's three).

Registered into :data:`ctr_ad.losses.PENALTIES` on import (``ctr_ad.experiment`` imports this module).
Same contract as ``ctr_ad.losses``: ``fn(z [K, B], *, signed, eps) -> scalar``, 0 for K = 1.

* ``prob_decorrelation`` — :func:`ctr_ad.losses.output_decorrelation` on the component
  *probabilities* σ(z_k) instead of the logits: decorrelates what the ensemble actually averages, and
  rows with extreme logits (saturated σ) weigh less.
* ``hinge_decorrelation_<ρ0>`` — mean over k ≠ l of max(0, corr(z_k, z_l) − ρ0)²: pushes components apart
  only while their logits correlate more than ρ0 and leaves them alone below, so a large λ cannot
  drive the components to anti-correlated, individually useless solutions (the collapse seen with
  plain corr² at large λ). Registered for ρ0 ∈ {0.5, 0.8}.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ctr_ad.losses import PENALTIES, _mean_off_diagonal, pairwise_correlation, register_penalty

HINGE_TARGETS = (0.5, 0.8)


def _register(name: str, fn):
    if name not in PENALTIES:  # idempotent: the module may be imported under two names in tests
        register_penalty(name)(fn)
    return fn


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


def _hinge(target: float):
    def fn(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
        return hinge_decorrelation(z, target, eps)

    fn.__doc__ = f"hinge decorrelation of the logits above ρ0 = {target}"
    return fn


_register("prob_decorrelation", prob_decorrelation)
for _t in HINGE_TARGETS:
    _register(f"hinge_decorrelation_{_t:g}", _hinge(_t))
