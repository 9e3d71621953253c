"""Anti-distillation penalties: hand-computed values, eps safety, gradient direction, registry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr_ad.losses import lambda_at, summed_bce
from ctr_ad.penalties import (
    PENALTIES,
    negative_correlation,
    output_decorrelation,
    pairwise_correlation,
    penalty_value,
    register_penalty,
)

TINY = 1e-12  # eps small enough not to move hand-computed correlations


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_output_decorrelation_hand_values() -> None:
    up, down = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    assert output_decorrelation(t([up, up]), eps=TINY).item() == pytest.approx(1.0)
    assert output_decorrelation(t([up, down]), eps=TINY).item() == pytest.approx(1.0)
    assert output_decorrelation(t([up, down]), signed=True, eps=TINY).item() == pytest.approx(-1.0)
    # centred [-1.5, -.5, .5, 1.5] · [1, -1, -1, 1] = 0: uncorrelated
    assert output_decorrelation(t([[1, 2, 3, 4], [1, -1, -1, 1]]), eps=TINY).item() == pytest.approx(0.0)
    # K = 3: corr(a,b) = -1, corr(a,c) = 1, corr(b,c) = -1 → mean corr² 1, mean corr -1/3
    three = t([up, down, up])
    assert output_decorrelation(three, eps=TINY).item() == pytest.approx(1.0)
    assert output_decorrelation(three, signed=True, eps=TINY).item() == pytest.approx(-1 / 3)
    # Shifting or scaling a component's logits does not change a correlation.
    assert output_decorrelation(t([[1, 2, 3, 4], [11, 9, 9, 11]]), eps=TINY).item() == pytest.approx(0.0)


def test_pairwise_correlation_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=g, dtype=torch.float64)
    import numpy as np

    assert torch.allclose(pairwise_correlation(x, eps=TINY), torch.from_numpy(np.corrcoef(x.numpy())), atol=1e-9)


def test_deviation_decorrelation_is_gone_and_named_in_the_error() -> None:
    # Removed: it rewarded identical components (see ctr_ad/penalties.py).
    assert "deviation_decorrelation" not in PENALTIES
    with pytest.raises(ValueError, match="unknown penalty 'deviation_decorrelation'"):
        penalty_value("deviation_decorrelation", torch.zeros(2, 3))


def test_negative_correlation_hand_value() -> None:
    # σ(0) = 0.5, σ(ln 3) = 0.75 → p = 0.625, each (p_k - p)² = 0.015625
    z = t([[0.0, 0.0], [math.log(3.0), math.log(3.0)]])
    assert negative_correlation(z).item() == pytest.approx(-0.015625)
    assert negative_correlation(t([[0.2, -1.0]])).item() == 0.0


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_single_component_and_constant_inputs_are_safe(name: str) -> None:
    assert penalty_value(name, torch.randn(1, 8)).item() == pytest.approx(0.0)
    z = torch.zeros(3, 8, requires_grad=True)  # every component constant on the batch
    value = penalty_value(name, z, eps=1e-6)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


def mean_offdiag_corr(z: torch.Tensor) -> float:
    c = pairwise_correlation(z.detach(), eps=TINY)
    k = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (k * (k - 1)))


@pytest.mark.parametrize("name", ["output_decorrelation", "negative_correlation", "kernel_repulsion", "ncl_logit"])
def test_penalty_gradient_pushes_components_apart(name: str) -> None:
    """A small gradient step on the penalty alone lowers the penalty and the components' correlation."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(1, 256, generator=g, dtype=torch.float64)
    z = (shared + 0.5 * torch.randn(4, 256, generator=g, dtype=torch.float64)).requires_grad_(True)
    before = penalty_value(name, z)
    before.backward()
    with torch.no_grad():
        stepped = z - 0.5 * z.grad / z.grad.norm()
    if name != "kernel_repulsion":  # its bandwidth follows the spread, so its value is scale-free
        assert penalty_value(name, stepped).item() < before.item()
    assert mean_offdiag_corr(stepped) < mean_offdiag_corr(z)


def test_lambda_warmup_and_bce() -> None:
    assert lambda_at(0, 0.5, 10) == 0.0
    assert lambda_at(5, 0.5, 10) == pytest.approx(0.25)
    assert lambda_at(50, 0.5, 10) == 0.5
    assert lambda_at(0, 0.5, 0) == 0.5
    logits = torch.zeros(3, 4)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert summed_bce(logits, labels).item() == pytest.approx(3 * math.log(2.0))
    # Per-component labels [K, B] and an explicit denominator (DDP shards).
    assert summed_bce(logits, labels.expand(3, 4), denominator=8).item() == pytest.approx(1.5 * math.log(2.0))


def test_registry_accepts_new_penalties_once() -> None:
    name = "test_only_mean_logit"
    if name not in PENALTIES:

        @register_penalty(name)
        def mean_logit(z: torch.Tensor, *, signed: bool = False, eps: float = 1e-6) -> torch.Tensor:
            return z.mean()

    assert penalty_value(name, torch.ones(2, 3)).item() == 1.0
    with pytest.raises(ValueError, match="twice"):
        register_penalty(name)(lambda z, **kw: z.sum())
    with pytest.raises(ValueError, match="unknown penalty"):
        penalty_value("nope", torch.ones(2, 3))
    PENALTIES.pop(name)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 5),
    b=st.integers(3, 40),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 10.0),
    shift=st.floats(-5.0, 5.0),
)
def test_output_decorrelation_properties(k: int, b: int, seed: int, scale: float, shift: float) -> None:
    """Bounded, invariant to the order of components and to a positive affine map of one component."""
    z = torch.randn(k, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    value = output_decorrelation(z).item()
    signed = output_decorrelation(z, signed=True).item()
    assert 0.0 <= value <= 1.0 + 1e-9 and -1.0 - 1e-9 <= signed <= 1.0 + 1e-9
    assert output_decorrelation(z.flip(0)).item() == pytest.approx(value, abs=1e-9)
    moved = z.clone()
    moved[0] = moved[0] * scale + shift
    # eps floors the variances, so invariance holds up to eps relative to the variances.
    assert output_decorrelation(moved, eps=1e-12).item() == pytest.approx(
        output_decorrelation(z, eps=1e-12).item(), abs=1e-6
    )
    assert negative_correlation(z).item() <= 0.0


def test_kernel_repulsion_hand_value_and_scale() -> None:
    # K = 2: d² = mean((z1 − z2)²) = 4, h = median = 4 → exp(−1); scaling z keeps the value (the bandwidth adapts).
    z = t([[0.0, 0.0], [2.0, 2.0]])
    assert penalty_value("kernel_repulsion", z).item() == pytest.approx(math.exp(-1.0))
    assert penalty_value("kernel_repulsion", 1e-3 * z).item() == pytest.approx(math.exp(-1.0))
    assert penalty_value("kernel_repulsion", z[:1]).item() == 0.0


def test_ncl_logit_is_capped() -> None:
    z = t([[0.0, 0.0], [0.5, 10.0]])  # deviations ±0.25 and ±5 → squares 0.0625 and capped 1.0
    assert penalty_value("ncl_logit", z).item() == pytest.approx(-(0.0625 + 1.0) / 2)


def test_codistillation_pulls_components_together() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 128, generator=g, dtype=torch.float64).requires_grad_(True)
    penalty_value("codistillation", z).backward()
    with torch.no_grad():
        stepped = z - 0.5 * z.grad / z.grad.norm()
    spread = lambda x: (torch.sigmoid(x) - torch.sigmoid(x).mean(0)).square().mean().item()  # noqa: E731
    assert spread(stepped) < spread(z)
