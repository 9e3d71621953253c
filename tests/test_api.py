"""The public Python API, imported the way a user does (``import ctr_ad``): the ensemble wrapper against
K separate models, the anchor, averaging, penalties and PD metrics on numpy and torch, docs/api.md's
examples and examples/own_model.py."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import torch
from helpers_train import PYTHON, REPO, ingested_8k, subprocess_env
from torch import nn

import ctr_ad

N_EMB, F, D = 20, 3, 2


class TinyCTR(nn.Module):
    """Embeddings + dense → MLP → logit [B] (vmappable)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(N_EMB, 4)
        self.mlp = nn.Sequential(nn.Linear(F * 4 + D, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 1))

    def forward(self, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.emb(cat).flatten(1), dense], dim=1))  # [B, 1]: squeezed by Ensemble


class BranchingCTR(TinyCTR):
    """Python control flow on tensor values: vmap cannot trace it, so the ensemble must loop."""

    def forward(self, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        out = super().forward(cat, dense)
        if bool(out.mean() > 0):
            out = out * 1.0
        return out


class NormCTR(TinyCTR):
    """Running statistics updated in place during training (buffers per component)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(D)

    def forward(self, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return super().forward(cat, self.norm(dense))


def _batch(seed: int, rows: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, N_EMB, (rows, F), generator=g), torch.randn(rows, D, generator=g),
            torch.randint(0, 2, (rows,), generator=g).float())


def _separate(factory, k: int, seed: int) -> list[nn.Module]:
    models = []
    for c in range(k):
        torch.manual_seed(ctr_ad.component_seed(seed, c))
        models.append(factory())
    return models


def _train_both(factory, vectorize: str, steps: int = 3, k: int = 3):
    """Train an Ensemble and K separate models side by side with Adam; return both and the last logits."""
    ens = ctr_ad.Ensemble(factory, k, seed=5, vectorize=vectorize)
    seps = _separate(factory, k, seed=5)
    opt_e = torch.optim.Adam(ens.parameters(), lr=1e-2)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in seps]
    for step in range(steps):
        cat, dense, y = _batch(step)
        z_e = ens(cat, dense)
        z_s = [m(cat, dense).squeeze(-1) for m in seps]  # one forward each: BatchNorm counts forwards
        torch.testing.assert_close(z_e, torch.stack(z_s), rtol=1e-5, atol=1e-6)
        opt_e.zero_grad()
        ctr_ad.ensemble_loss(z_e, y).backward()
        for z, o in zip(z_s, opts):
            o.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(z, y).backward()
        for name, stacked in ens.stacked_parameters().items():
            for c, m in enumerate(seps):
                torch.testing.assert_close(stacked.grad[c], m.get_parameter(name).grad, rtol=1e-5, atol=1e-6)
        opt_e.step()
        for o in opts:
            o.step()
    return ens, seps


@pytest.mark.parametrize("vectorize", ["auto", "vmap", "loop"])
def test_ensemble_matches_k_separate_models(vectorize: str) -> None:
    ens, seps = _train_both(TinyCTR, vectorize)
    assert ens.mode == ("loop" if vectorize == "loop" else "vmap")
    for name, stacked in ens.stacked_parameters().items():
        for c, m in enumerate(seps):
            torch.testing.assert_close(stacked[c], m.get_parameter(name), rtol=1e-5, atol=1e-6)
    # Components start apart (own seeds), and a standalone copy of one predicts like it.
    w = ens.stacked_parameters()["emb.weight"]
    assert not torch.equal(w[0], w[1])
    cat, dense, _ = _batch(99)
    torch.testing.assert_close(ens.component(1)(cat, dense).squeeze(-1), ens(cat, dense)[1])


def test_ensemble_falls_back_to_a_loop_when_vmap_cannot_trace_the_module() -> None:
    ens, _ = _train_both(BranchingCTR, "auto")
    assert ens.mode == "loop"
    with pytest.raises(Exception):  # noqa: B017 - whatever vmap raises for data-dependent control flow
        ctr_ad.Ensemble(BranchingCTR, 2, vectorize="vmap")(*_batch(0)[:2])


def test_ensemble_keeps_per_component_buffers() -> None:
    ens, seps = _train_both(NormCTR, "auto")
    stats = ens.stacked_buffers()["norm.running_mean"]
    for c, m in enumerate(seps):
        torch.testing.assert_close(stats[c], m.norm.running_mean)
    assert not torch.equal(stats[0], torch.zeros(D))  # updated in training mode
    ens.eval()
    for m in seps:
        m.eval()
    cat, dense, _ = _batch(7)
    torch.testing.assert_close(ens(cat, dense), torch.stack([m(cat, dense).squeeze(-1) for m in seps]))


def test_ensemble_with_its_own_rows_per_component_and_a_frozen_anchor() -> None:
    k = 2
    cats, denses = zip(*(_batch(10 + c)[:2] for c in range(k)))
    cat, dense = torch.stack(cats), torch.stack(denses)  # [K, B, ...]
    anchor = ctr_ad.LinearAnchor([N_EMB] * F, D)
    anchor.load_weights(torch.linspace(-1, 1, N_EMB * F), torch.tensor([0.5, -0.25]), 0.3)
    ens = ctr_ad.Ensemble(TinyCTR, k, seed=1, anchor=anchor)
    plain = ctr_ad.Ensemble(TinyCTR, k, seed=1)
    z, z0 = ens(cat, dense, per_component=True), plain(cat, dense, per_component=True)
    torch.testing.assert_close(z - z0, anchor(cat, dense))
    assert z.shape == (k, cat.shape[1])
    # The anchor's weights are buffers: the optimizer never moves them, the state dict keeps them.
    assert all(not n.startswith("anchor.") for n, _ in ens.named_parameters())
    assert "anchor.cat_weight" in ens.state_dict()


def test_linear_anchor_fits_like_the_trainers_anchor(tmp_path_factory: pytest.TempPathFactory) -> None:
    import polars as pl

    from ctr_ad.data import load_split
    from ctr_ad.features import FeatureProcessor
    from ctr_ad.linear import fit_linear

    data = ingested_8k(tmp_path_factory)
    features = FeatureProcessor.load(data / "features.json")
    cols = (features.categorical_columns, features.dense_columns)
    train, test = load_split(data / "train.parquet", *cols), load_split(data / "test.parquet", *cols)
    anchor = ctr_ad.LinearAnchor.fit(train.cat, train.dense, train.label, features.cardinalities, C=0.03)
    reference = fit_linear(pl.read_parquet(data / "train.parquet"), None, features, 0.03)
    assert anchor.fit_record["converged"] and anchor.fit_record["C"] == 0.03
    offsets = np.concatenate([[0], np.cumsum(features.cardinalities)[:-1]])
    expected = (reference.cat_weight[test.cat.numpy() + offsets].sum(1) + test.dense.numpy() @ reference.dense_weight
                + reference.intercept)
    np.testing.assert_allclose(anchor(test.cat, test.dense).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_weight_averager_and_penalties_work_on_an_ensemble() -> None:
    ens = ctr_ad.Ensemble(TinyCTR, 3, seed=0)
    averager = ctr_ad.WeightAverager(ens, horizon_epochs=1.0, steps_per_epoch=4)
    opt = torch.optim.SGD(ens.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in ens.named_parameters()}
    for step in range(4):
        cat, dense, y = _batch(step)
        z = ens(cat, dense)
        loss = ctr_ad.ensemble_loss(z, y) + 0.1 * ctr_ad.penalty("output_decorrelation", z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        averager.update()
    current = {n: p.detach().clone() for n, p in ens.named_parameters()}
    with averager.swapped_in():
        averaged = {n: p.detach().clone() for n, p in ens.named_parameters()}
    for n in before:
        assert not torch.equal(averaged[n], current[n])  # the average lags the last step
    assert all(torch.equal(p, current[n]) for n, p in ens.named_parameters())  # restored after the block
    assert "output_decorrelation" in ctr_ad.available_penalties()
    z = torch.randn(3, 64)
    assert float(ctr_ad.penalty("none", z)) == 0.0
    with pytest.raises(ValueError, match="unknown penalty"):
        ctr_ad.penalty("no_such_penalty", z)


def test_pd_metrics_accept_numpy_and_torch_alike() -> None:
    rng = np.random.default_rng(0)
    p1, p2 = rng.uniform(0.01, 0.5, 500), rng.uniform(0.01, 0.5, 500)
    expected = float(np.mean(2 * np.abs(p1 - p2) / (p1 + p2)))
    assert ctr_ad.prediction_difference(p1, p2) == pytest.approx(expected, rel=1e-12)
    t1 = torch.tensor(p1, dtype=torch.float32, requires_grad=True)
    t2 = torch.tensor(p2, dtype=torch.float32)
    assert ctr_ad.prediction_difference(t1, t2) == pytest.approx(expected, rel=1e-6)
    assert ctr_ad.prediction_difference(t1, t2, "pd_abs") == pytest.approx(np.abs(p1 - p2).mean(), rel=1e-6)
    from_torch, from_numpy = ctr_ad.pd_metrics(t1, t2), ctr_ad.pd_metrics(p1, p2)
    assert from_torch.keys() == from_numpy.keys()
    for key, value in from_numpy.items():
        assert from_torch[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    z = torch.randn(3, 100)
    assert ctr_ad.component_correlation(z) == pytest.approx(ctr_ad.component_correlation(z.numpy()))
    assert ctr_ad.component_spread(torch.sigmoid(z)) > 0
    with pytest.raises(ValueError, match="unknown PD kind"):
        ctr_ad.prediction_difference(p1, p2, "pd_nope")
    with pytest.raises(ValueError, match="same rows"):
        ctr_ad.prediction_difference(p1, p2[:10])


def test_import_ctr_ad_stays_light_and_lists_the_api() -> None:
    code = "import sys, ctr_ad; assert 'torch' not in sys.modules; print(sorted(ctr_ad.__all__))"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=True)
    for name in ("Ensemble", "LinearAnchor", "WeightAverager", "prediction_difference", "penalty"):
        assert name in out.stdout
    with pytest.raises(AttributeError):
        _ = ctr_ad.no_such_name


def test_docs_api_python_examples_run(tmp_path) -> None:
    """Every ```python block of docs/api.md runs as written, in order, in one namespace."""
    text = (REPO / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "docs_api"}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)


def test_own_model_example_trains_and_prints_pd() -> None:
    proc = subprocess.run([PYTHON, str(REPO / "examples" / "own_model.py")], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = re.search(r"single cross network, plain\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    ensemble = re.search(r"K=4 ensemble \+ anchor \+ averaging\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    assert single and ensemble, proc.stdout
    pd_single, pd_ensemble = float(single.group(1)), float(ensemble.group(1))
    assert 0 < pd_ensemble < pd_single  # the recipe makes retrainings agree more
    assert 0.6 < float(ensemble.group(3)) <= 1.0  # a working model: test AUC

