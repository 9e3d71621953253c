"""Metrics: exact values on small cases and properties (hypothesis) of the PD metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ctr_ad import metrics as m

probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def prob_pairs(min_size: int = 1, max_size: int = 200) -> st.SearchStrategy:
    return st.integers(min_size, max_size).flatmap(
        lambda n: st.tuples(arrays(np.float64, n, elements=probs), arrays(np.float64, n, elements=probs))
    )


@settings(max_examples=60, deadline=None)
@given(prob_pairs())
def test_pd_of_a_vector_with_itself_is_zero(pair: tuple[np.ndarray, np.ndarray]) -> None:
    p, _ = pair
    out = m.pd_metrics(p, p.copy())
    zero_keys = ("pd_abs", "pd_rel", "pd_rms", "pd_max", "pd_q50", "pd_q90", "pd_q99")
    zero_keys += ("churn_top1", "churn_top10")
    for key in zero_keys:
        assert out[key] == 0.0, key
    assert out["spearman"] == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(prob_pairs())
def test_pd_is_symmetric_and_bounded(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    ab, ba = m.pd_metrics(a, b), m.pd_metrics(b, a)
    for key in ab:
        if key.startswith("churn"):
            continue  # ties are broken by row order, which can differ between the two directions
        assert ab[key] == pytest.approx(ba[key], abs=1e-12), key
    assert 0.0 <= ab["pd_abs"] <= ab["pd_rms"] + 1e-12 <= ab["pd_max"] + 2e-12 <= 1.0 + 2e-12
    assert ab["pd_q50"] <= ab["pd_q90"] + 1e-12 <= ab["pd_q99"] + 2e-12 <= ab["pd_max"] + 3e-12
    assert 0.0 <= ab["pd_rel"] <= 2.0
    assert 0.0 <= ab["churn_top1"] <= 1.0 and 0.0 <= ab["churn_top10"] <= 1.0
    assert -1.0 <= ab["spearman"] <= 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.001, 0.999), min_size=2, max_size=200, unique=True))
def test_churn_symmetric_without_ties(values: list[float]) -> None:
    a = np.array(values)
    b = np.random.default_rng(len(values)).permutation(a)
    assert m.top_churn(a, b, 0.1) == m.top_churn(b, a, 0.1)
    assert m.top_churn(a, a[::-1].copy(), 1.0) == 0.0  # the whole set always overlaps


def test_pd_exact_values() -> None:
    p1 = np.array([0.1, 0.2, 0.0, 0.5])
    p2 = np.array([0.3, 0.2, 0.0, 0.25])
    out = m.pd_metrics(p1, p2, top_fractions=(0.25, 0.5))
    assert out["pd_abs"] == pytest.approx((0.2 + 0 + 0 + 0.25) / 4)
    assert out["pd_rel"] == pytest.approx((2 * 0.2 / 0.4 + 0 + 0 + 2 * 0.25 / 0.75) / 4)
    assert out["pd_rms"] == pytest.approx(math.sqrt((0.04 + 0.0625) / 4))
    assert out["pd_max"] == pytest.approx(0.25)
    assert out["churn_top25"] == 1.0  # top row: 0.5 (row 3) vs 0.3 (row 0)
    assert out["churn_top50"] == 0.5  # top two: rows {3, 1} vs {0, 3}
    assert m.churn_key(0.01) == "churn_top1" and m.churn_key(0.1) == "churn_top10"


def test_pd_rel_maximum_is_two() -> None:
    assert m.pd_metrics(np.array([0.0, 1.0]), np.array([1.0, 0.0]))["pd_rel"] == 2.0


def test_pd_requires_same_rows() -> None:
    with pytest.raises(ValueError):
        m.pd_metrics(np.zeros(3), np.zeros(4))


def test_spearman_reversed_and_constant() -> None:
    a = np.arange(10.0)
    assert m.spearman(a, -a) == pytest.approx(-1.0)
    assert m.spearman(np.ones(5), np.ones(5)) == 1.0
    assert m.spearman(np.ones(5), a[:5]) == 0.0


def test_accuracy_metrics() -> None:
    y = np.array([0, 0, 1, 1], dtype=float)
    p = np.array([0.1, 0.4, 0.35, 0.8])
    out = m.accuracy_metrics(y, p, bins=2)
    assert out["auc"] == pytest.approx(0.75)
    assert out["logloss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))
    assert out["calibration"] == pytest.approx(p.mean() / 0.5)
    # bins {0.1, 0.35} and {0.4, 0.8}: |0.225 − 0.5| and |0.6 − 0.5|, half the rows each
    assert out["ece"] == pytest.approx(0.5 * 0.275 + 0.5 * 0.1)
    assert math.isnan(m.auc(np.zeros(3), np.array([0.1, 0.2, 0.3])))


def test_perfectly_calibrated_bins_have_zero_ece() -> None:
    p = np.repeat([0.2, 0.5], 10)
    y = np.array([1] * 2 + [0] * 8 + [1] * 5 + [0] * 5, dtype=float)
    assert m.ece(y, p, bins=2) == pytest.approx(0.0)
    assert m.calibration(y, p) == pytest.approx(1.0)


def test_component_diversity() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=500)
    z = np.stack([base, base * 2 + 1, -base])
    corr = m.component_correlation_matrix(z)
    assert corr.shape == (3, 3) and np.allclose(np.diag(corr), 1.0)
    assert m.component_correlation(z) == pytest.approx((1 - 1 - 1) / 3)
    assert math.isnan(m.component_correlation(z[:1]))
    probs = 1 / (1 + np.exp(-z))
    assert m.component_spread(probs[:1]) == 0.0
    assert m.component_spread(np.stack([np.full(4, 0.2), np.full(4, 0.4)])) == pytest.approx(0.1)


def test_pairwise_and_mean_std() -> None:
    preds = [np.array([0.1, 0.2]), np.array([0.1, 0.3]), np.array([0.2, 0.2])]
    pairs = m.pairwise_pd(preds)
    assert len(pairs) == 3
    summary = m.mean_std(pairs)
    assert summary["pd_abs"]["n"] == 3
    assert summary["pd_abs"]["mean"] == pytest.approx(np.mean([0.05, 0.05, 0.1]))
    assert m.mean_std([{"a": 1.0}])["a"]["std"] == 0.0
    assert math.isnan(m.mean_std([{"a": math.nan}])["a"]["mean"])


def test_pd_by_group_and_deciles() -> None:
    p1 = np.array([0.1, 0.2, 0.3, 0.4])
    p2 = np.array([0.1, 0.4, 0.3, 0.2])
    pd_abs, pd_rel, counts = m.pd_by_group(p1, p2, np.array([0, 1, 0, 1]), 3)
    assert counts.tolist() == [2, 2, 0]
    assert pd_abs.tolist() == pytest.approx([0.0, 0.2, 0.0])
    assert pd_rel[1] == pytest.approx(2 * 0.2 / 0.6)
    assert m.deciles(np.array([0.4, 0.1, 0.3, 0.2]), bins=2).tolist() == [1, 0, 1, 0]
