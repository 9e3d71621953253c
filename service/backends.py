"""Which runtime scores requests: the interface a model slot needs, and the loader per backend.

A slot (``service.model_store.ModelSlot``) needs very little from the model it serves — its path, its
feature encoding, its training config and metadata, K, and ``predict_arrays(cat, dense)`` returning a
``ctr_ad.bundle.Prediction``. :class:`ScoringModel` spells that out; two runtimes provide it:

* ``torch`` — a ctr-ad bundle (``RUN_DIR``, ``RUN_DIR/bundle`` or a pipeline's ``published/``),
  scored by PyTorch (``ctr_ad.bundle.Bundle``);
* ``onnxruntime`` — a graph written by ``ctr-ad export --format onnx`` with its ``features.json``,
  scored by onnxruntime (``service.onnx_backend.OnnxBundle``; the optional extra ``[onnx]``).

Routes, encoding, micro-batching, the shadow replica and monitoring are the same for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from ctr_ad.bundle import Prediction

Backend = Literal["torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")


class ScoringModel(Protocol):
    path: Path  # the directory holding features.json
    features: Any  # ctr_ad.features.FeatureProcessor
    config: Any  # ctr_ad.config.Config
    metadata: dict[str, Any]
    metadata_file: Path  # where ``metadata`` was read (named as the offline figures' source)
    components: int

    def predict_arrays(self, cat: np.ndarray, dense: np.ndarray) -> Prediction: ...


def load_model(path: str | Path, backend: str = "torch", threads: int = 1) -> ScoringModel:
    """Load what ``path`` names with ``backend``; a bad path or file raises ``BundleError`` naming it."""
    if backend == "onnxruntime":
        from service.onnx_backend import OnnxBundle

        return OnnxBundle.load(path, threads=threads)
    if backend != "torch":
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    from ctr_ad import bundle as bundle_mod
    from service.model_store import resolve_published

    return bundle_mod.load(resolve_published(path))
