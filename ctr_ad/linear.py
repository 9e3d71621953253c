"""The linear reference: logistic regression on one-hot categoricals + dense features.

Convex, fitted by L-BFGS to convergence, it retrains to the same predictions (PD ≈ 0). It serves twice:
as an experiment arm (the reproducible reference a deep ensemble has to beat) and as the frozen
*anchor* of an anchored ensemble (z_k = z_anchor(x) + h_k(x)), so that only the residual h_k varies
between retrainings. ``C`` (inverse L2 strength) is chosen on the validation split from a grid when
not given; every fit records its iterations and whether L-BFGS converged.
"""

from __future__ import annotations

import fcntl
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import sparse
from threadpoolctl import threadpool_limits

from ctr_ad import metrics as M
from ctr_ad.files import atomic_write_with

logger = logging.getLogger(__name__)

C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def one_hot(frame: pl.DataFrame, features: Any) -> sparse.csr_matrix:
    """CSR matrix [one-hot of every categorical index ‖ dense features] of a model-ready frame."""
    cat_cols, dense_cols = features.categorical_columns, features.dense_columns
    cat = frame.select(cat_cols).to_numpy()
    dense = frame.select(dense_cols).to_numpy() if dense_cols else np.zeros((frame.height, 0))
    return one_hot_arrays(cat, dense, features.cardinalities)


def one_hot_arrays(cat: np.ndarray, dense: np.ndarray, cardinalities: Sequence[int]) -> sparse.csr_matrix:
    """CSR matrix [one-hot of every categorical index ‖ dense features] of encoded arrays:
    ``cat`` int [N, F] (index per field, < its cardinality), ``dense`` float [N, D]."""
    n = int(cat.shape[0])
    offsets = np.concatenate([[0], np.cumsum(cardinalities)]).astype(np.int64)
    cat = np.asarray(cat).astype(np.int64) + offsets[:-1]
    dense = np.asarray(dense, dtype=np.float64).reshape(n, -1)
    n_cat = int(offsets[-1])
    dense_idx = np.broadcast_to(n_cat + np.arange(dense.shape[1]), (n, dense.shape[1]))
    cols = np.concatenate([cat, dense_idx], axis=1)
    vals = np.concatenate([np.ones_like(cat, dtype=np.float64), dense], axis=1)
    indptr = np.arange(0, n * cols.shape[1] + 1, cols.shape[1])
    return sparse.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=(n, n_cat + dense.shape[1]))


@dataclass
class LinearFit:
    """A fitted logistic regression: z = intercept + Σ_f cat_weight[offset_f + i_f] + dense · dense_weight."""

    C: float
    intercept: float
    cat_weight: np.ndarray  # [Σ cardinalities]
    dense_weight: np.ndarray  # [D]
    iterations: int
    converged: bool
    valid_logloss: float | None = None
    c_search: list[dict[str, float]] = field(default_factory=list)
    estimator: Any = field(default=None, repr=False)

    def decision(self, x: sparse.csr_matrix) -> np.ndarray:
        coef = np.concatenate([self.cat_weight, self.dense_weight])
        return np.asarray(x @ coef + self.intercept, dtype=np.float64)

    def record(self) -> dict[str, Any]:
        """What a run stores about the fit (no arrays)."""
        # Field by field: asdict() would deep-copy the weight arrays and the fitted estimator first.
        skip = {"cat_weight", "dense_weight", "estimator"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def fit_logreg(x: sparse.csr_matrix, y: np.ndarray, C: float, max_iter: int = 1000, warm_from: Any = None) -> LinearFit:
    """L-BFGS to convergence (tol 1e-6). ``warm_from``: a fitted ``LogisticRegression`` to start from
    (the C search walks C upwards, each fit starting at the previous optimum: a few iterations each)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if np.unique(y).size < 2:
        # One label value (the trainer has warned): the optimum is a constant at the clipped base rate.
        rate = float(np.clip(np.mean(y), 1e-4, 1 - 1e-4)) if y.size else 0.5
        return LinearFit(C=C, intercept=float(np.log(rate / (1 - rate))), cat_weight=np.zeros(x.shape[1]),
                         dense_weight=np.zeros(0), iterations=0, converged=True)
    model = warm_from if warm_from is not None else LogisticRegression(solver="lbfgs", tol=1e-6, warm_start=True)
    model.set_params(C=C, max_iter=max_iter)
    # One BLAS/OpenMP thread: on a busy or shared host the library's spinning worker threads made a fit
    # 25× slower (37 s against 1.5 s for 80 L-BFGS iterations on the Criteo 8k sample).
    with threadpool_limits(1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    # cat_weight holds every coefficient until _split_weights separates the dense ones.
    fit = LinearFit(C=C, intercept=float(model.intercept_[0]), cat_weight=model.coef_.ravel().copy(),
                    dense_weight=np.zeros(0), iterations=int(model.n_iter_[0]), converged=converged)
    fit.estimator = model
    return fit


def _split_weights(fit: LinearFit, n_cat: int) -> LinearFit:
    coef = fit.cat_weight
    fit.cat_weight, fit.dense_weight = coef[:n_cat].astype(np.float32), coef[n_cat:].astype(np.float32)
    return fit


def fit_linear(train: pl.DataFrame, valid: pl.DataFrame | None, features: Any, C: float | None,
               max_iter: int = 1000) -> LinearFit:
    """Fit on ``train``; with ``C`` None choose it from :data:`C_GRID` by validation logloss."""
    n_cat = int(sum(features.cardinalities))
    x, y = one_hot(train, features), train["label"].to_numpy()
    if valid is None or valid.height == 0:
        return fit_linear_matrices(x, y, None, None, n_cat, C, max_iter)
    return fit_linear_matrices(x, y, one_hot(valid, features), valid["label"].to_numpy(), n_cat, C, max_iter)


def fit_linear_matrices(x: sparse.csr_matrix, y: np.ndarray, xv: sparse.csr_matrix | None, yv: np.ndarray | None,
                        n_cat: int, C: float | None, max_iter: int = 1000) -> LinearFit:
    """:func:`fit_linear` on one-hot matrices (:func:`one_hot_arrays`) whose first ``n_cat`` columns
    are the categorical rows; with ``C`` None and validation rows, C is chosen from :data:`C_GRID`."""
    if C is not None or xv is None or yv is None or xv.shape[0] == 0:
        return _split_weights(fit_logreg(x, y, C if C is not None else 1.0, max_iter), n_cat)
    search, best = [], None
    previous = None
    for c in sorted(C_GRID):
        fit = fit_logreg(x, y, c, max_iter, warm_from=previous)
        previous = fit.estimator
        loss = M.logloss(yv, 1.0 / (1.0 + np.exp(-fit.decision(xv))))
        search.append({"C": c, "valid_logloss": loss, "converged": fit.converged})
        if best is None or loss < best[0]:
            best = (loss, fit)
    assert best is not None
    chosen = _split_weights(best[1], n_cat)
    chosen.valid_logloss, chosen.c_search = best[0], search
    logger.info(f"linear model: C={chosen.C:g} chosen on validation (logloss {best[0]:.5f}), "
                f"{chosen.iterations} iterations, converged={chosen.converged}")
    return chosen


def shared_fit(cache_file: Path | None, fit: Callable[[], LinearFit]) -> LinearFit:
    """``fit()`` once for every process that asks for the same ``cache_file``.

    An experiment's worker processes each train anchored replicas on the same data with the same
    ``anchor_C``; on 1M rows the anchor's L-BFGS fit is ~60 % of a replica's CPU, so they share it
    through this file (an ``.npz`` of the weights and the fit's record). An exclusive lock on a
    sidecar file makes a second worker wait for the first one's fit instead of repeating it.
    ``cache_file`` None: just ``fit()``.
    """
    if cache_file is None:
        return fit()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_name(cache_file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if fit() raises
        if cache_file.is_file():
            with np.load(cache_file) as saved:
                record = json.loads(str(saved["record"]))
                return LinearFit(cat_weight=saved["cat_weight"], dense_weight=saved["dense_weight"], **record)
        result = fit()
        arrays = {"cat_weight": result.cat_weight, "dense_weight": result.dense_weight,
                  "record": np.array(json.dumps(result.record()))}
        atomic_write_with(cache_file, lambda fh: np.savez(fh, **arrays))
        return result
