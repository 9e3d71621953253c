"""Anti-distillation penalties: one registry, every penalty the trainer can name.

Notation: ``z`` are component logits [K, B] (K components, B rows of the batch every component sees).
A penalty is ``fn(z, *, signed: bool, eps: float) -> Tensor[]``, 0 for K = 1 (nothing to push apart),
registered under its config name (``anti_distillation.penalty``) with ``@register_penalty("name")``.
The training loss is Σ_k BCE(y, σ(z_k)) + λ(t) · penalty(z) (``ctr_ad.losses``).

* ``output_decorrelation`` — mean over k ≠ l of corr(z_k, z_l)² over the batch.
* ``negative_correlation`` — negative correlation learning (Liu & Yao 1999) on probabilities.
* ``prob_decorrelation`` — output decorrelation of the probabilities σ(z_k) rather than the logits.
* ``hinge_decorrelation_<ρ0>`` — corr pushed down only above ρ0 ∈ {0.5, 0.8}, so a large λ cannot
  drive components to anti-correlated, individually useless solutions.
* ``kernel_repulsion`` — components repel in function space with an RBF kernel whose bandwidth is
  the median pairwise distance (a scale that does not vanish as components change).
* ``ncl_logit`` — negative correlation learning on logits, each squared deviation capped at τ² = 1.
* ``codistillation`` — the opposite of anti-distillation: each component fits the stop-gradient mean
  probability of the others (λ > 0 pulls components together).

``deviation_decorrelation`` (corr² of the deviations from the ensemble mean) was removed: it is
scale-invariant, and since the K deviations sum to zero its floor (−1/(K−1) correlation) is reached by
any independent deviations and it only decreases further as components become identical — it
rewarded collapse, which is what the experiments saw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


def _off_diagonal(m: Tensor) -> Tensor:
    k = m.shape[0]
    return m[~torch.eye(k, dtype=torch.bool, device=m.device)]


@register_penalty("kernel_repulsion")
def kernel_repulsion(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """Mean over k ≠ l of exp(−d²_kl / h), d²_kl = mean_b (z_kb − z_lb)², h = median_{k≠l} d²_kl (no gradient).

    Minimising it pushes the components' logit functions apart; the median-heuristic bandwidth keeps
    the penalty's gradient at a useful size whatever the current spread (unlike corr² or NCL, whose
    values become tiny). ``signed`` is unused.
    """
    if z.shape[0] < 2:
        return z.new_zeros(())
    d2 = (z.unsqueeze(0) - z.unsqueeze(1)).square().mean(dim=-1)
    off = _off_diagonal(d2)
    h = off.detach().median().clamp(min=eps)
    return torch.exp(-off / h).mean()


NCL_CAP = 1.0  # τ² in logit units: beyond a deviation of one logit, more spread earns nothing


@register_penalty("ncl_logit")
def ncl_logit(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """−mean_k mean_b min((z_kb − z̄_b)², τ²), z̄ = mean_k z_k: NCL on logits, capped so it cannot run away."""
    if z.shape[0] < 2:
        return z.new_zeros(())
    dev = (z - z.mean(dim=0, keepdim=True)).square()
    return -torch.clamp(dev, max=NCL_CAP).mean()


@register_penalty("codistillation")
def codistillation(z: Tensor, *, signed: bool = False, eps: float = 1e-6) -> Tensor:
    """mean_k BCE(stopgrad(mean_{l≠k} σ(z_l)), σ(z_k)): each component also fits the others' mean."""
    k = z.shape[0]
    if k < 2:
        return z.new_zeros(())
    p = torch.sigmoid(z).detach()
    others = (p.sum(dim=0, keepdim=True) - p) / (k - 1)
    return F.binary_cross_entropy_with_logits(z, others)
