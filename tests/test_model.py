"""EnsembleCTR: the vectorized forward equals a per-component loop; SmeLU; init; sparse gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctr_ad.model import EnsembleCTR, ensemble_probability, smelu

CARDS = [5, 7, 3, 11]
N_DENSE = 6


def reference_logits(model: EnsembleCTR, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Component-by-component computation with ordinary per-field tables and F.linear (the slow way)."""
    out = []
    rows = model.rows_per_component
    for k in range(model.components):
        ck = cat[k] if cat.dim() == 3 else cat
        dk = dense[k] if dense.dim() == 3 else dense
        table = model.embedding.weight[k * rows : (k + 1) * rows]
        parts, start = [], 0
        for f, card in enumerate(model.cardinalities):
            parts.append(F.embedding(ck[:, f], table[start : start + card]))
            start += card
        x = torch.cat([*parts, dk], dim=1)
        for i, (w, b) in enumerate(zip(model.weights, model.biases)):
            x = F.linear(x, w[k].T, b[k, 0])
            if i < len(model.weights) - 1:
                x = torch.relu(x) if model.activation == "relu" else smelu(x, model.smelu_beta)
        out.append(x.squeeze(-1))
    return torch.stack(out)


def random_inputs(k: int, batch: int, per_component: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (k, batch) if per_component else (batch,)
    cat = torch.stack([torch.randint(0, c, shape, generator=g) for c in CARDS], dim=-1)
    dense = torch.randn(*shape, N_DENSE, generator=g)
    return cat, dense


@pytest.mark.parametrize("activation", ["relu", "smelu"])
@pytest.mark.parametrize("per_component", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_vectorized_forward_equals_component_loop(activation: str, per_component: bool, k: int) -> None:
    model = EnsembleCTR(CARDS, N_DENSE, components=k, embedding_dim=3, mlp=[8, 5], activation=activation)
    model.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.embedding.weight.mul_(50.0)  # make SmeLU's three regions all occur
    model.eval()
    cat, dense = random_inputs(k, 32, per_component)
    with torch.no_grad():
        got = model(cat, dense)
        want = reference_logits(model, cat, dense)
    assert got.shape == (k, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_linear_head_and_no_dense() -> None:
    model = EnsembleCTR(CARDS, 0, components=2, embedding_dim=2, mlp=[])
    cat, _ = random_inputs(2, 10, False)
    dense = torch.zeros(10, 0)
    torch.testing.assert_close(model(cat, dense), reference_logits(model, cat, dense), atol=1e-6, rtol=1e-6)


def test_smelu_regions_and_smoothness() -> None:
    beta = 0.5
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.5, 3.0], requires_grad=True)
    y = smelu(x, beta)
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 0.0, 0.125, 0.28125, 0.5, 3.0]))
    (grad,) = torch.autograd.grad(y.sum(), x)
    # Gradient (x + β)/(2β) inside, continuous at ±β: 0 → 0 and 1 → 1.
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_components_differ_and_init_is_seeded() -> None:
    a = EnsembleCTR(CARDS, N_DENSE, components=3)
    b = EnsembleCTR(CARDS, N_DENSE, components=3)
    a.reset_parameters(torch.Generator().manual_seed(7))
    b.reset_parameters(torch.Generator().manual_seed(7))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    cat, dense = random_inputs(3, 16, False)
    logits = a(cat, dense)
    assert not torch.allclose(logits[0], logits[1])


def test_sparse_embedding_gradient_touches_only_batch_rows() -> None:
    model = EnsembleCTR(CARDS, N_DENSE, components=2, sparse=True)
    model.reset_parameters(torch.Generator().manual_seed(0))
    cat, dense = random_inputs(2, 4, False)
    model(cat, dense).sum().backward()
    grad = model.embedding.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].unique().tolist())
    # Row of (component k, field f, id i) is k·ΣCARDS + ΣCARDS[:f] + i, worked out here independently.
    rows = sum(CARDS)
    batch_rows = {k * rows + sum(CARDS[:f]) + i for k in range(2) for row in cat.tolist() for f, i in enumerate(row)}
    assert touched == batch_rows and len(batch_rows) < model.embedding.weight.shape[0]
    opt = torch.optim.SparseAdam([model.embedding.weight], lr=0.1)
    before = model.embedding.weight.detach().clone()
    opt.step()
    changed = set((model.embedding.weight.detach() != before).any(dim=1).nonzero().flatten().tolist())
    assert changed and changed <= batch_rows  # SparseAdam moved some batch rows and nothing else


def test_ensemble_probability_modes() -> None:
    z = torch.tensor([[0.0, 2.0], [2.0, -2.0]])
    torch.testing.assert_close(ensemble_probability(z, "mean_prob"), torch.sigmoid(z).mean(0))
    torch.testing.assert_close(ensemble_probability(z, "mean_logit"), torch.sigmoid(torch.tensor([1.0, 0.0])))
