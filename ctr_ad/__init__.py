"""ctr-ad: reproducible CTR prediction with anti-distillation ensembles.

The public Python API (documented in docs/api.md) is importable from the package itself::

    from ctr_ad import Ensemble, LinearAnchor, WeightAverager, ensemble_loss, penalty, prediction_difference

Names are resolved lazily on first use, so ``import ctr_ad`` (which every ``ctr-ad`` command does)
does not import torch: ``ctr-ad ingest`` never pays for it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    # your own model, our recipe
    "Ensemble": ("ctr_ad.ensemble", "Ensemble"),
    "component_seed": ("ctr_ad.ensemble", "component_seed"),
    "LinearAnchor": ("ctr_ad.anchor", "LinearAnchor"),
    "WeightAverager": ("ctr_ad.averaging", "WeightAverager"),
    "ensemble_loss": ("ctr_ad.losses", "summed_bce"),
    "lambda_at": ("ctr_ad.losses", "lambda_at"),
    "ensemble_probability": ("ctr_ad.model", "ensemble_probability"),
    # penalties
    "penalty": ("ctr_ad.penalties", "penalty_value"),
    "available_penalties": ("ctr_ad.penalties", "available_penalties"),
    "register_penalty": ("ctr_ad.penalties", "register_penalty"),
    # metrics (numpy arrays or torch tensors)
    "prediction_difference": ("ctr_ad.metrics", "prediction_difference"),
    "pd_metrics": ("ctr_ad.metrics", "pd_metrics"),
    "pairwise_pd": ("ctr_ad.metrics", "pairwise_pd"),
    "top_churn": ("ctr_ad.metrics", "top_churn"),
    "component_correlation": ("ctr_ad.metrics", "component_correlation"),
    "component_spread": ("ctr_ad.metrics", "component_spread"),
    "accuracy_metrics": ("ctr_ad.metrics", "accuracy_metrics"),
    # our own model, data and bundles
    "EnsembleCTR": ("ctr_ad.model", "EnsembleCTR"),
    "load_bundle": ("ctr_ad.bundle", "load"),
    "load_split": ("ctr_ad.data", "load_split"),
    "FeatureProcessor": ("ctr_ad.features", "FeatureProcessor"),
    "load_config": ("ctr_ad.config", "load_config"),
    "UserError": ("ctr_ad.errors", "UserError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'ctr_ad' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
