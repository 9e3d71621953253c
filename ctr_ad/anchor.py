"""The frozen linear anchor as a module of its own, for a user's training loop.

The reproducibility recipe fits a logistic regression first (convex, so every retraining finds the
same one), freezes it and lets the deep model learn only a residual: z_k(x) = z_anchor(x) + h_k(x).
:class:`ctr_ad.model.EnsembleCTR` builds that in; :class:`LinearAnchor` gives the same thing to any
model: fit it on the encoded training arrays, then add ``anchor(cat, dense)`` to the model's logits
(or pass it as ``Ensemble(..., anchor=anchor)``). Its weights are buffers: an optimizer never sees
them, a ``state_dict`` keeps them.

    z_anchor = bias + Σ_f cat_weight[offset_f + cat_f] + dense · dense_weight
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn


def _numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


class LinearAnchor(nn.Module):
    """A fitted, frozen logistic regression over encoded categorical indices and dense features."""

    def __init__(self, cardinalities: Sequence[int], n_dense: int) -> None:
        super().__init__()
        self.cardinalities = [int(c) for c in cardinalities]
        self.n_dense = int(n_dense)
        offsets = np.concatenate([[0], np.cumsum(self.cardinalities)[:-1]]).astype(np.int64)
        self.register_buffer("field_offsets", torch.from_numpy(offsets), persistent=False)
        self.register_buffer("cat_weight", torch.zeros(max(sum(self.cardinalities), 1)))
        self.register_buffer("dense_weight", torch.zeros(self.n_dense))
        self.register_buffer("bias", torch.zeros(1))
        #: What the fit recorded (C, iterations, converged, validation logloss); empty until fitted.
        self.fit_record: dict = {}

    @classmethod
    def fit(
        cls,
        cat: np.ndarray | Tensor,
        dense: np.ndarray | Tensor,
        labels: np.ndarray | Tensor,
        cardinalities: Sequence[int],
        *,
        valid: tuple[np.ndarray | Tensor, np.ndarray | Tensor, np.ndarray | Tensor] | None = None,
        C: float | None = None,
        max_iter: int = 1000,
    ) -> LinearAnchor:
        """L-BFGS to convergence on ``cat`` int [N, F], ``dense`` float [N, D], ``labels`` 0/1 [N].

        With ``C`` None and ``valid = (cat, dense, labels)``, the inverse L2 strength is chosen on the
        validation rows from :data:`ctr_ad.linear.C_GRID`; without validation rows C = 1.
        """
        from ctr_ad.linear import fit_linear_matrices, one_hot_arrays

        cat_np, dense_np = _numpy(cat), _numpy(dense)
        x = one_hot_arrays(cat_np, dense_np, cardinalities)
        xv = yv = None
        if valid is not None:
            xv = one_hot_arrays(_numpy(valid[0]), _numpy(valid[1]), cardinalities)
            yv = _numpy(valid[2]).astype(np.float64)
        n_cat = int(sum(cardinalities))
        result = fit_linear_matrices(x, _numpy(labels).astype(np.float64), xv, yv, n_cat, C, max_iter)
        anchor = cls(cardinalities, dense_np.shape[1])
        anchor.load_weights(result.cat_weight, result.dense_weight, result.intercept)
        anchor.fit_record = result.record()
        return anchor

    @torch.no_grad()
    def load_weights(self, cat_weight: np.ndarray | Tensor, dense_weight: np.ndarray | Tensor, bias: float) -> None:
        self.cat_weight.copy_(torch.as_tensor(_numpy(cat_weight), dtype=torch.float32).reshape(-1))
        self.dense_weight.copy_(torch.as_tensor(_numpy(dense_weight), dtype=torch.float32).reshape(-1))
        self.bias.fill_(float(bias))

    def forward(self, cat: Tensor, dense: Tensor) -> Tensor:
        """z_anchor [B] (or [..., B]) for cat [..., B, F] and dense [..., B, D]."""
        z = self.cat_weight[cat + self.field_offsets].sum(dim=-1) + self.bias
        if self.n_dense:
            z = z + dense.to(self.dense_weight.dtype) @ self.dense_weight
        return z
