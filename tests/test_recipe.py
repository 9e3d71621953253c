"""The reproducibility levers of the trainer: weight averaging, the linear anchor, no best-step
selection, the penalty's dropout-free pass, its λ = 0 control and the gradient-ratio λ scale."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers_train import DEMO_CONFIG, ingested_8k, small_config

from ctr_ad import bundle as bundle_mod
from ctr_ad.averaging import WeightAverager
from ctr_ad.features import FeatureProcessor
from ctr_ad.linear import LinearFit, fit_linear, one_hot, shared_fit
from ctr_ad.model import EnsembleCTR
from ctr_ad.selection import improved_components, keep_components
from ctr_ad.train import _ANCHOR_CACHE, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingested_8k(tmp_path_factory)


def test_weight_averager_is_the_ema_with_warmup_and_swaps_back() -> None:
    model = EnsembleCTR([5, 3], 2, components=2, embedding_dim=2, mlp=[3])
    avg = WeightAverager(model, horizon_epochs=1.0, steps_per_epoch=4)  # decay 0.75
    w = model.weights[0]
    start = w.detach().clone()
    expected = start.clone()
    for t in range(3):
        with torch.no_grad():
            w.add_(1.0)
        avg.update()
        decay = min(0.75, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * w.detach()
    assert torch.allclose(avg.averaged["weights.0"], expected)
    current = w.detach().clone()
    with avg.swapped_in():
        assert torch.allclose(model.weights[0], expected)
    assert torch.equal(model.weights[0], current)


def test_averaged_training_is_deterministic_and_bundles_the_average(data_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(train__weight_averaging_epochs=1.0)
    a = train(data_dir, cfg, tmp_path / "a", deterministic=True, log=False)
    train(data_dir, cfg, tmp_path / "b", deterministic=True, log=False)
    wa = (tmp_path / "a" / "bundle" / "model.safetensors").read_bytes()
    assert wa == (tmp_path / "b" / "bundle" / "model.safetensors").read_bytes()
    plain = train(data_dir, small_config(train__weight_averaging_epochs=0.0), tmp_path / "plain", deterministic=True,
                  log=False)
    assert wa != (tmp_path / "plain" / "bundle" / "model.safetensors").read_bytes()
    assert a.test is not None and a.test_metrics is not None
    assert abs(a.test_metrics["logloss"] - plain.test_metrics["logloss"]) < 0.02  # averaging costs no accuracy


def test_no_best_step_selection_keeps_the_final_weights(data_dir: Path, tmp_path: Path) -> None:
    result = train(data_dir, small_config(train__best_step_selection="none", train__epochs=3), tmp_path / "r",
                   log=False)
    assert result.best_step == result.steps
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert result.valid_metrics["logloss"] == pytest.approx(last["valid_logloss"])


def test_anchor_is_the_converged_linear_model_and_survives_the_bundle(data_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(model__anchor="logreg", model__anchor_C=0.03)
    result = train(data_dir, cfg, tmp_path / "r", log=False)
    record = json.loads((tmp_path / "r" / "anchor.json").read_text())
    assert record["converged"] and record["C"] == 0.03
    features = FeatureProcessor.load(data_dir / "features.json")
    valid = pl.read_parquet(data_dir / "valid.parquet")
    fit = fit_linear(pl.read_parquet(data_dir / "train.parquet"), None, features, 0.03)
    cat = torch.from_numpy(valid.select(features.categorical_columns).to_numpy().astype(np.int64))
    dense = torch.from_numpy(valid.select(features.dense_columns).to_numpy().astype(np.float32))
    z_anchor = result.model.anchor_logit(cat, dense).numpy()
    assert np.allclose(z_anchor, fit.decision(one_hot(valid, features)), atol=1e-4)
    loaded = bundle_mod.load(tmp_path / "r")
    assert loaded.model.anchored and torch.equal(loaded.model.anchor_cat, result.model.anchor_cat)
    # The anchor is a buffer: the optimizers never move it.
    assert all(p is not result.model.anchor_cat for p in result.model.parameters())


def test_processes_share_one_anchor_fit_through_the_cache(data_dir: Path, tmp_path: Path) -> None:
    features = FeatureProcessor.load(data_dir / "features.json")
    train_frame = pl.read_parquet(data_dir / "train.parquet")
    calls: list[int] = []

    def fit() -> LinearFit:
        calls.append(1)
        return fit_linear(train_frame, None, features, 0.03)

    cache = tmp_path / "cache" / "anchor.npz"
    # Concurrent askers (the lock is per open file, so threads contend like worker processes): one fit.
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: shared_fit(cache, fit), range(2))
    assert len(calls) == 1 and cache.is_file()
    again = shared_fit(cache, fit)
    assert len(calls) == 1
    for other in (second, again):
        assert np.array_equal(other.cat_weight, first.cat_weight) and other.intercept == first.intercept
        assert other.record() == first.record()
    # Through the trainer: a second "process" (its in-memory cache emptied) reads the file, fits nothing.
    cfg = small_config(model__anchor="logreg", model__anchor_C=0.03, train__epochs=1)
    _ANCHOR_CACHE.clear()  # earlier tests of this process fitted the same anchor
    train(data_dir, cfg, tmp_path / "a", log=False, anchor_cache=tmp_path / "shared")
    _ANCHOR_CACHE.clear()
    stamp = next((tmp_path / "shared").glob("anchor-*.npz")).stat().st_mtime_ns
    train(data_dir, cfg, tmp_path / "b", log=False, anchor_cache=tmp_path / "shared")
    assert next((tmp_path / "shared").glob("anchor-*.npz")).stat().st_mtime_ns == stamp
    assert (tmp_path / "a" / "anchor.json").read_text() == (tmp_path / "b" / "anchor.json").read_text()


def test_auto_anchor_chooses_C_on_validation(data_dir: Path, tmp_path: Path) -> None:
    train(data_dir, small_config(model__anchor="logreg", model__anchor_C="null", train__epochs=1), tmp_path / "r",
          log=False)
    record = json.loads((tmp_path / "r" / "anchor.json").read_text())
    losses = {row["C"]: row["valid_logloss"] for row in record["c_search"]}
    assert record["C"] == min(losses, key=losses.get) and len(losses) >= 4


def test_penalty_control_arm_and_gradient_ratio_scale(data_dir: Path, tmp_path: Path) -> None:
    control = small_config(anti_distillation__data_order="independent", anti_distillation__forward_penalty_batch=True,
                           anti_distillation__penalty_batch_size=128)
    plain = small_config(anti_distillation__data_order="independent")
    a = train(data_dir, control, tmp_path / "control", deterministic=True, log=False)
    b = train(data_dir, plain, tmp_path / "plain", deterministic=True, log=False)
    # The shared rows are forwarded (SparseAdam then touches their embeddings), the penalty is 0.
    metrics = [json.loads(x) for x in (tmp_path / "control" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train_penalty"] == 0.0 for m in metrics)
    assert not torch.equal(a.model.embedding.weight, b.model.embedding.weight)
    ratio = small_config(anti_distillation__data_order="independent", anti_distillation__penalty="kernel_repulsion",
                         anti_distillation__lambda=0.1, anti_distillation__lambda_scale="gradient_ratio",
                         anti_distillation__penalty_batch_size=128)
    r = train(data_dir, ratio, tmp_path / "ratio", log=False)
    assert r.test_metrics is not None and np.isfinite(r.test_metrics["logloss"])
    metrics = [json.loads(x) for x in (tmp_path / "ratio" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["train_penalty"] > 0 for m in metrics)


def test_penalty_pass_has_no_dropout() -> None:
    model = EnsembleCTR([5, 3], 0, components=2, embedding_dim=2, mlp=[16], dropout=0.5)
    model.train()
    cat = torch.tensor([[1, 2], [3, 0], [4, 1]])
    dense = torch.zeros(3, 0)
    a, b = model(cat, dense, dropout=False), model(cat, dense, dropout=False)
    assert torch.equal(a, b)  # deterministic: no dropout mask was drawn
    assert not torch.equal(model(cat, dense), model(cat, dense))


def test_naming_a_penalty_switches_it_on_at_the_documented_strength() -> None:
    from ctr_ad.config import DEFAULT_STRENGTH, load_config

    cfg = load_config(DEMO_CONFIG, ["anti_distillation.penalty=kernel_repulsion"])
    ad = cfg.anti_distillation
    assert ad.active and ad.lam == DEFAULT_STRENGTH and ad.lambda_scale == "gradient_ratio"
    explicit = load_config(DEMO_CONFIG, ["anti_distillation.penalty=kernel_repulsion", "anti_distillation.lambda=0.5"])
    assert explicit.anti_distillation.lam == 0.5 and explicit.anti_distillation.lambda_scale == "absolute"
    assert not load_config(DEMO_CONFIG).anti_distillation.active


def test_keep_components_copies_only_the_chosen_components_parts() -> None:
    model = EnsembleCTR([5, 3], 2, components=3, embedding_dim=2, mlp=[4], anchor=True)
    kept = keep_components(model, None, [0, 1, 2])
    before = {n: t.clone() for n, t in kept.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.anchor_bias.fill_(0.5)
    keep_components(model, kept, [1])
    state = model.state_dict()
    rows = model.rows_per_component
    for name in ("embedding.weight", "weights.0", "weights.1", "biases.0"):
        for k in range(3):
            got, old, new = (model.component_part(name, t, k) for t in (kept[name], before[name], state[name]))
            assert torch.equal(got, new if k == 1 else old), (name, k)
    assert torch.equal(kept["embedding.weight"][rows : 2 * rows], state["embedding.weight"][rows : 2 * rows])
    assert float(kept["anchor_bias"]) == 0.5  # shared (the frozen anchor): taken whole
    assert improved_components([0.4, float("nan"), 0.6], [0.5, 0.5, 0.5]) == [0]


def test_per_component_selection_keeps_each_components_best_evaluation(data_dir: Path, tmp_path: Path) -> None:
    """Each component ends with its weights of the evaluation where *its own* validation logloss was
    lowest: the same weights as a run without selection stopped at that step (deterministic training)."""
    sets = {"train__epochs": 2, "train__eval_every_steps": 5, "train__lr": 0.003}
    result = train(data_dir, small_config(train__best_step_selection="per_component", **sets), tmp_path / "pc",
                   deterministic=True, log=False)
    evals = [json.loads(x) for x in (tmp_path / "pc" / "metrics.jsonl").read_text().splitlines()]
    best_steps = [min(evals, key=lambda e: e["valid_logloss_by_component"][k])["step"] for k in range(2)]
    assert len(set(best_steps)) > 1, best_steps  # the components chose different evaluations
    assert result.best_step == max(best_steps)
    state = result.model.state_dict()
    for step in sorted(set(best_steps)):
        ref = train(data_dir, small_config(train__best_step_selection="none", train__max_steps=step, **sets),
                    tmp_path / f"none{step}", deterministic=True, log=False).model
        ref_state = ref.state_dict()
        for k in (k for k, s in enumerate(best_steps) if s == step):
            for name in ("embedding.weight", "weights.0", "weights.1", "biases.1"):
                assert torch.equal(ref.component_part(name, ref_state[name], k),
                                   ref.component_part(name, state[name], k)), (name, k, step)
    # The kept ensemble mixes steps: its validation figures are measured on the kept weights.
    assert result.valid is not None and result.valid_metrics["logloss"] == pytest.approx(result.valid.logloss)
