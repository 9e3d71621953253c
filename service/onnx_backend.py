"""The onnxruntime backend: serve a graph written by ``ctr-ad export --format onnx``.

``--bundle`` names the ``.onnx`` file (or the directory holding exactly one). ``features.json`` must lie
beside it and match the SHA-256 the export recorded in the graph's metadata, so a graph is never
served with another encoding than the one it was trained on. The graph's metadata also carries the
bundle's training config and metadata (version, K, offline figures), so ``/v1/model`` and monitoring
say the same as for the PyTorch backend. Needs the optional extra ``[onnx]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ctr_ad.bundle import FEATURES, BundleError, Prediction
from ctr_ad.config import Config
from ctr_ad.errors import UserError


def resolve_graph(path: str | Path) -> Path:
    """A ``.onnx`` file, or the directory holding exactly one."""
    path = Path(path)
    if path.is_dir():
        graphs = sorted(path.glob("*.onnx"))
        if len(graphs) != 1:
            hint = "" if graphs else " (write one with `ctr-ad export --bundle RUN_DIR --format onnx --out FILE`)"
            raise BundleError(f"{path}: expected one .onnx graph, found {len(graphs)}{hint}")
        return graphs[0]
    if not path.is_file():
        raise BundleError(f"{path}: ONNX graph not found")
    if path.suffix != ".onnx":
        raise BundleError(f"{path}: --backend onnxruntime serves an .onnx graph written by `ctr-ad export`")
    return path


class OnnxBundle:
    """An exported ensemble scored by onnxruntime, with the interface of ``ctr_ad.bundle.Bundle``."""

    def __init__(self, graph: Path, session: Any, features: Any, config: Config, metadata: dict[str, Any]) -> None:
        self.graph = graph
        self.path = graph.parent
        self.metadata_file = graph  # the export stores the bundle's metadata inside the graph
        self.session = session
        self.features = features
        self.config = config
        self.metadata = metadata
        self.components = int(metadata["components"])
        self._n_cat = len(features.categorical_columns)
        self._n_dense = len(features.dense_columns)
        self._cardinalities = np.asarray(features.cardinalities, dtype=np.int64)

    def __repr__(self) -> str:
        return f"OnnxBundle({str(self.graph)!r}, K={self.components})"

    @classmethod
    def load(cls, path: str | Path, threads: int = 1) -> OnnxBundle:
        try:
            import onnxruntime
        except ImportError:
            raise UserError("--backend onnxruntime needs onnxruntime: pip install 'ctr-ad[onnx]'") from None
        from ctr_ad.features import FeatureProcessor
        from ctr_ad.onnx_export import META_KEY

        graph = resolve_graph(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise BundleError(f"{graph}: not a loadable ONNX graph ({str(exc).splitlines()[0]})") from None
        raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if not raw:
            raise BundleError(f"{graph}: no ctr-ad metadata; export the graph with `ctr-ad export --format onnx`")
        doc = json.loads(raw)
        features_path = graph.parent / FEATURES
        if not features_path.is_file():
            raise BundleError(f"{features_path}: missing; the export writes it beside {graph.name}")
        data = features_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != doc.get("features_sha256"):
            raise BundleError(f"{features_path}: does not match the encoding {graph.name} was exported with "
                              "(checksum mismatch)")
        try:
            features = FeatureProcessor.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{features_path}: unreadable features ({exc})") from None
        config = Config.from_dict(doc["config"], origin=f"{graph} metadata")
        metadata = {**doc.get("metadata", {}), "model_version": doc["model_version"],
                    "components": doc["components"], "backend": "onnxruntime", "graph": str(graph)}
        return cls(graph, session, features, config, metadata)

    def predict_arrays(self, cat: np.ndarray, dense: np.ndarray) -> Prediction:
        """Score model-ready arrays: cat int [N, F] (vocab indices), dense float [N, D]."""
        cat = np.ascontiguousarray(cat, dtype=np.int64)
        dense = np.ascontiguousarray(dense, dtype=np.float32)
        n = cat.shape[0]
        if cat.ndim != 2 or cat.shape[1] != self._n_cat:
            raise ValueError(f"cat must be [N, {self._n_cat}], got {cat.shape}")
        if dense.shape != (n, self._n_dense):
            raise ValueError(f"dense must be [{n}, {self._n_dense}], got {dense.shape}")
        if n and ((cat < 0).any() or (cat >= self._cardinalities).any()):
            raise ValueError("categorical index out of range for this bundle's vocabularies")
        ctr, components = self.session.run(None, {"cat": cat, "dense": dense})
        components = components.astype(np.float64)
        return Prediction(ctr=ctr.astype(np.float64), components=components,
                          component_std=components.std(axis=1))
