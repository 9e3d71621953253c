"""Parameter counts of an ensemble, and a K' ensemble sized to the same parameter budget.

"More, narrower components" is a reproducibility lever only if it is compared at equal capacity:
K = 8 components as wide as K = 4 have twice the parameters, and any gain could be the size. So
:func:`equal_budget` rescales a model config to K' components with the parameter count of the
original:

* the embedding tables hold ``tables × rows × d`` parameters, so d' = d · K / K' keeps that part
  exactly equal on any data (when K · d is a multiple of K'; otherwise the nearest d');
* each component's MLP tower holds Σ (w_in · w_out + w_out) parameters, which depends on the number
  of categorical fields F and dense features D only, not on the vocabulary; the hidden widths are
  scaled together (their ratios kept) to the scale whose K' towers come closest to the K towers.

:func:`parameter_count` is the analytic count of :class:`~ctr_ad.model.EnsembleCTR`'s trainable
parameters (the frozen anchor is a buffer, not a parameter); the tests check it against the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ctr_ad.config import ModelConfig
from ctr_ad.errors import UserError
from ctr_ad.model import table_rows


def tower_parameters(n_fields: int, n_dense: int, embedding_dim: int, mlp: Sequence[int]) -> int:
    """Weights and biases of one component's MLP: [F·d + D] → mlp → 1."""
    widths = [n_fields * embedding_dim + n_dense, *mlp, 1]
    return sum(w_in * w_out + w_out for w_in, w_out in itertools.pairwise(widths))


def embedding_parameters(cfg: ModelConfig, cardinalities: Sequence[int], fields: Sequence[str] | None = None) -> int:
    """Rows of every table (hashing bounds them) × d, for each component's table or the one shared table."""
    names = list(fields) if fields is not None else [f"field{i}" for i in range(len(cardinalities))]
    rows = sum(table_rows(cardinalities, cfg.hash_buckets_for(names)))
    tables = 1 if cfg.share_embeddings else cfg.components
    return tables * max(rows, 1) * cfg.embedding_dim


def parameter_count(
    cfg: ModelConfig, cardinalities: Sequence[int], n_dense: int, fields: Sequence[str] | None = None
) -> int:
    """Trainable parameters of ``EnsembleCTR.from_config(cfg, cardinalities, n_dense)``."""
    towers = cfg.components * tower_parameters(len(cardinalities), n_dense, cfg.embedding_dim, cfg.mlp)
    return embedding_parameters(cfg, cardinalities, fields) + towers


def _scaled_widths(mlp: Sequence[int], first: int) -> list[int]:
    """``mlp`` rescaled so that its first width is ``first``, the others in proportion (each ≥ 1)."""
    return [first, *(max(1, round(w * first / mlp[0])) for w in mlp[1:])]


def equal_budget(cfg: ModelConfig, components: int, n_fields: int, n_dense: int) -> ModelConfig:
    """``cfg`` with ``components`` components whose total parameter count is the closest to ``cfg``'s.

    The embedding dimension becomes round(d · K / K') (≥ 1) and the hidden widths are scaled together;
    among first widths 1 … 4 × the original, the one whose K' towers' parameters are nearest the K
    towers' wins (the smallest on a tie), so the result is a pure function of its arguments."""
    if components < 1:
        raise UserError(f"equal_budget: components must be >= 1 (got {components})")
    dim = max(1, round(cfg.embedding_dim * cfg.components / components))
    target = cfg.components * tower_parameters(n_fields, n_dense, cfg.embedding_dim, cfg.mlp)
    mlp: list[int] = []
    if cfg.mlp:
        candidates = (_scaled_widths(cfg.mlp, first) for first in range(1, 4 * cfg.mlp[0] + 1))
        mlp = min(candidates, key=lambda m: abs(components * tower_parameters(n_fields, n_dense, dim, m) - target))
    return cfg.model_copy(update={"components": components, "embedding_dim": dim, "mlp": mlp})
