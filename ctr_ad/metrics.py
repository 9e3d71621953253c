"""Accuracy, calibration and prediction-difference (PD) metrics, on numpy arrays or torch tensors.

Accuracy of one prediction vector ``p`` against 0/1 labels ``y``:
    logloss, auc, calibration = mean(p) / mean(y), ece (expected calibration error over equal-mass bins).

PD between two replicas' predictions ``p1``, ``p2`` on the same rows:
    pd_abs = mean |p1 − p2|
    pd_rel = mean 2|p1 − p2| / (p1 + p2)            (0 where p1 = p2 = 0; always in [0, 2])
    pd_rms = sqrt(mean (p1 − p2)²), pd_max and pd_q50/q90/q99 = quantiles of |p1 − p2|
    churn_top{k} = 1 − |top-k% rows of p1 ∩ top-k% rows of p2| / size of the top-k%
    spearman = rank correlation of p1 and p2

Within one ensemble (component logits ``z`` [K, N], probabilities σ(z)):
    component_corr = mean over k ≠ l of the Pearson correlation of z_k and z_l over the rows
    component_spread = mean over rows of the std over components of σ(z_k)   (ddof = 0)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

EPS = 1e-7
DEFAULT_TOP_FRACTIONS: tuple[float, ...] = (0.01, 0.1)


def _as_numpy(x: object) -> np.ndarray:
    """numpy view of an array-like; a torch tensor (any device, with or without grad) is detached and
    copied to the CPU first. Duck-typed so that importing this module never imports torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if getattr(x, "dtype", None) is not None and not x.dtype.is_floating_point:
            return x.numpy()
        return x.double().numpy()
    return np.asarray(x)


def _f64(x: object) -> np.ndarray:
    return np.asarray(_as_numpy(x), dtype=np.float64).reshape(-1)


# --------------------------------------------------------------------------------------------- accuracy
def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [1e-7, 1 − 1e-7]."""
    y, p = _f64(y), np.clip(_f64(p), EPS, 1 - EPS)
    if y.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (NaN when only one class is present)."""
    y, p = _f64(y), _f64(p)
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, p))


def calibration(y: np.ndarray, p: np.ndarray) -> float:
    """mean(p) / mean(y): 1 is calibrated on average, > 1 over-predicts (NaN without positives)."""
    y, p = _f64(y), _f64(p)
    mean_y = float(y.mean()) if y.size else 0.0
    return float(p.mean()) / mean_y if mean_y > 0 else math.nan


def _equal_mass_bins(p: np.ndarray, bins: int) -> np.ndarray:
    """Bin index per row: rows sorted by p cut into ``bins`` groups of (nearly) equal size."""
    order = np.argsort(p, kind="stable")
    index = np.empty(p.size, dtype=np.int64)
    index[order] = (np.arange(p.size) * bins) // max(p.size, 1)
    return index


def calibration_curve(
    y: np.ndarray, p: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean prediction, mean label, rows) per equal-mass bin of p — the reliability diagram."""
    y, p = _f64(y), _f64(p)
    index = _equal_mass_bins(p, bins)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    keep = counts > 0
    mean_p = np.bincount(index, weights=p, minlength=bins)[keep] / counts[keep]
    mean_y = np.bincount(index, weights=y, minlength=bins)[keep] / counts[keep]
    return mean_p, mean_y, counts[keep]


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: Σ_bins (rows/N) · |mean p − mean y| over equal-mass bins of p.

    Equal-mass bins suit CTR data, where almost every prediction falls in the lowest equal-width bin.
    """
    y, p = _f64(y), _f64(p)
    if y.size == 0:
        return math.nan
    mean_p, mean_y, counts = calibration_curve(y, p, bins)
    return float(np.sum(counts * np.abs(mean_p - mean_y)) / counts.sum())


def accuracy_metrics(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, float]:
    """{logloss, auc, calibration, ece} of predictions ``p``."""
    return {
        "logloss": logloss(y, p),
        "auc": auc(y, p),
        "calibration": calibration(y, p),
        "ece": ece(y, p, bins),
    }


# --------------------------------------------------------------------------------------------- PD
def abs_diff(p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    p1, p2 = _f64(p1), _f64(p2)
    if p1.shape != p2.shape:
        raise ValueError(f"PD needs predictions on the same rows: shapes {p1.shape} and {p2.shape}")
    return np.abs(p1 - p2)


def rel_diff(p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Per-row symmetric relative difference 2|p1 − p2| / (p1 + p2) (0 where both are 0)."""
    d = abs_diff(p1, p2)
    s = _f64(p1) + _f64(p2)
    return np.divide(2.0 * d, s, out=np.zeros_like(d), where=s > 0)


def top_churn(p1: np.ndarray, p2: np.ndarray, fraction: float) -> float:
    """1 − overlap of the top ``fraction`` of rows by score (ties broken by row order); in [0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    p1, p2 = _f64(p1), _f64(p2)
    n = p1.size
    if n == 0:
        return 0.0
    k = max(1, math.ceil(fraction * n))
    top1 = np.argsort(-p1, kind="stable")[:k]
    top2 = np.argsort(-p2, kind="stable")[:k]
    return 1.0 - np.intersect1d(top1, top2, assume_unique=True).size / k


def spearman(p1: np.ndarray, p2: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties).

    A constant vector has no ranking: 1 if both vectors are constant (they agree), else 0.
    """
    r1, r2 = rankdata(_f64(p1)), rankdata(_f64(p2))
    c1, c2 = r1 - r1.mean(), r2 - r2.mean()
    v1, v2 = float(np.dot(c1, c1)), float(np.dot(c2, c2))
    if v1 == 0.0 or v2 == 0.0:
        return 1.0 if v1 == v2 == 0.0 else 0.0
    den = math.sqrt(v1 * v2)
    return float(np.clip(np.dot(c1, c2) / den, -1.0, 1.0))


def churn_key(fraction: float) -> str:
    """Metric name of the top-``fraction`` churn: 0.01 → ``churn_top1``, 0.1 → ``churn_top10``."""
    pct = fraction * 100
    return f"churn_top{int(pct) if float(pct).is_integer() else pct:g}"


def prediction_difference(p1: object, p2: object, kind: str = "pd_rel") -> float:
    """PD between two models' predictions on the same rows (numpy arrays or torch tensors): by default
    the relative PD, mean 2|p1 − p2| / (p1 + p2); ``kind`` names any key of :func:`pd_metrics`."""
    if kind == "pd_rel":
        d = rel_diff(p1, p2)
        if d.size == 0:
            raise ValueError("PD of empty predictions")
        return float(d.mean())
    if kind == "pd_abs":
        d = abs_diff(p1, p2)
        if d.size == 0:
            raise ValueError("PD of empty predictions")
        return float(d.mean())
    out = pd_metrics(p1, p2)
    if kind not in out:
        raise ValueError(f"unknown PD kind {kind!r}; known: {sorted(out)}")
    return out[kind]


def pd_metrics(
    p1: np.ndarray, p2: np.ndarray, top_fractions: Iterable[float] = DEFAULT_TOP_FRACTIONS
) -> dict[str, float]:
    """All PD metrics between two prediction vectors on the same rows."""
    d = abs_diff(p1, p2)
    if d.size == 0:
        raise ValueError("PD of empty predictions")
    q50, q90, q99 = np.quantile(d, [0.5, 0.9, 0.99])
    out = {
        "pd_abs": float(d.mean()),
        "pd_rel": float(rel_diff(p1, p2).mean()),
        "pd_rms": float(math.sqrt(np.mean(d * d))),
        "pd_max": float(d.max()),
        "pd_q50": float(q50),
        "pd_q90": float(q90),
        "pd_q99": float(q99),
    }
    for frac in top_fractions:
        out[churn_key(frac)] = top_churn(p1, p2, frac)
    out["spearman"] = spearman(p1, p2)
    return out


def pairwise_pd(
    predictions: Sequence[np.ndarray], top_fractions: Iterable[float] = DEFAULT_TOP_FRACTIONS
) -> list[dict[str, float]]:
    """PD metrics of every unordered pair of replicas (R·(R−1)/2 dicts)."""
    fracs = tuple(top_fractions)
    return [pd_metrics(a, b, fracs) for a, b in itertools.combinations(predictions, 2)]


def pd_by_group(
    p1: np.ndarray, p2: np.ndarray, groups: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean |p1 − p2|, mean relative PD, rows) per integer group label in [0, n_groups)."""
    g = np.asarray(_as_numpy(groups), dtype=np.int64).reshape(-1)
    counts = np.bincount(g, minlength=n_groups).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    pd_abs = np.bincount(g, weights=abs_diff(p1, p2), minlength=n_groups) / safe
    pd_rel = np.bincount(g, weights=rel_diff(p1, p2), minlength=n_groups) / safe
    return pd_abs, pd_rel, counts


def deciles(p: np.ndarray, bins: int = 10) -> np.ndarray:
    """Equal-mass bin (0 = lowest predictions) of every row."""
    return _equal_mass_bins(_f64(p), bins)


# --------------------------------------------------------------------------------------------- ensembles
def component_correlation_matrix(logits: np.ndarray) -> np.ndarray:
    """Pearson correlation [K, K] of the component logits over the rows (constant rows → 0, diagonal 1)."""
    z = np.asarray(_as_numpy(logits), dtype=np.float64)
    if z.ndim != 2:
        raise ValueError("logits must be [K, N]")
    zc = z - z.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.sum(zc * zc, axis=1))
    den = np.outer(norms, norms)
    corr = np.divide(zc @ zc.T, den, out=np.zeros((z.shape[0], z.shape[0])), where=den > 0)
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def component_correlation(logits: np.ndarray) -> float:
    """Mean over k ≠ l of corr(z_k, z_l); NaN for K = 1."""
    corr = component_correlation_matrix(logits)
    k = corr.shape[0]
    if k < 2:
        return math.nan
    return float(corr[~np.eye(k, dtype=bool)].mean())


def component_spread(probs: np.ndarray) -> float:
    """Mean over rows of the std over components of their probabilities (0 for K = 1)."""
    q = np.asarray(_as_numpy(probs), dtype=np.float64)
    if q.ndim != 2:
        raise ValueError("probs must be [K, N]")
    return float(q.std(axis=0).mean()) if q.shape[1] else math.nan


# --------------------------------------------------------------------------------------------- summaries
def mean_std(values: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std, n}} over a list of metric dicts (std with ddof = 1; 0 for one value).

    NaN values are left out of a metric's mean; a metric that is NaN everywhere gets mean NaN.
    """
    rows = list(values)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        vals = np.array([row[key] for row in rows if key in row and row[key] is not None], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            out[key] = {"mean": math.nan, "std": math.nan, "n": 0}
            continue
        std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        out[key] = {"mean": float(vals.mean()), "std": std, "n": int(vals.size)}
    return out
