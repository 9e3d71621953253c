"""ONNX export of a bundle, so a trained ensemble can run in any serving stack (``ctr-ad export``).

The graph takes what ``FeatureProcessor.encode`` produces and returns what ``Bundle.predict_arrays``
does, for a batch of any size:

    inputs   cat    int64   [batch, F]   vocabulary index of each categorical field (features.json order)
             dense  float32 [batch, D]   transformed dense features
    outputs  ctr         float32 [batch]     the ensemble probability (the bundle's model.prediction rule)
             components  float32 [batch, K]  each component's probability

Beside ``model.onnx`` the export writes ``features.json`` (the feature encoding, copied from the bundle:
raw JSON instances are encoded with it) and ``<name>.README.md`` describing the inputs. The graph's
``metadata_props`` carry the bundle's metadata, its model version and the SHA-256 of features.json,
so a server can check that the two files belong together.

Requires the optional extra ``[onnx]`` (onnx, onnxruntime). The export is checked before it is
written: onnxruntime scores the bundle's own warm-up rows and must agree with PyTorch within
:data:`PARITY_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ctr_ad import bundle as bundle_mod
from ctr_ad.errors import UserError
from ctr_ad.files import atomic_write_text
from ctr_ad.model import EnsembleCTR, ensemble_probability

logger = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-5
INPUTS = ("cat", "dense")
OUTPUTS = ("ctr", "components")
META_KEY = "ctr_ad"  # metadata_props key holding the JSON document below


def require_onnx() -> None:
    """UserError naming the extra when onnx / onnxruntime are not installed."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX support needs {' and '.join(missing)}: pip install 'ctr-ad[onnx]'")


class ScoringGraph(nn.Module):
    """(cat, dense) → (ctr [N], components [N, K]) of an :class:`EnsembleCTR`, as the bundle scores them."""

    def __init__(self, model: EnsembleCTR, prediction: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.prediction = prediction

    def forward(self, cat: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(cat, dense, dropout=False).float()  # [K, N]
        ctr = ensemble_probability(logits, self.prediction)  # type: ignore[arg-type]
        return ctr, torch.sigmoid(logits).transpose(0, 1)


def _example_inputs(bundle: bundle_mod.Bundle, rows: int = 3) -> tuple[Tensor, Tensor]:
    features = bundle.features
    cards = torch.tensor(bundle.model.cardinalities)
    cat = (torch.arange(rows).unsqueeze(1) * 7 + torch.arange(len(cards))) % cards
    n_dense = len(features.dense_columns)
    dense = torch.linspace(-1.0, 1.0, rows * n_dense).reshape(rows, n_dense)
    return cat.long(), dense.float()


def _export_graph(bundle: bundle_mod.Bundle, path: Path) -> None:
    # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, recursively, and a
    # fresh module is in training mode — that would leave the bundle's model running dropout.
    graph = ScoringGraph(bundle.model, bundle.config.model.prediction).eval()
    axes = {"cat": {0: "batch"}, "dense": {0: "batch"}, "ctr": {0: "batch"}, "components": {0: "batch"}}
    # The TorchScript exporter (dynamo=False): it handles every op of the model, needs no onnxscript, and
    # its deprecation notices are torch's business, not the user's.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(graph, _example_inputs(bundle), str(path), input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    bundle.model.eval()


def _document(bundle: bundle_mod.Bundle, features_sha256: str) -> dict[str, Any]:
    from service.model_store import model_version, offline_metrics

    metadata = dict(bundle.metadata)
    # The offline reproducibility the service compares live PD with: a published bundle's figures live
    # in published/offline_metrics.json, which does not travel with the graph, so carry them inside it.
    offline = offline_metrics(bundle.path, bundle.metadata)
    if offline is not None:
        metadata["offline_metrics"] = offline
    return {
        "format": 1,
        "model_version": model_version(bundle.path, bundle.metadata),
        "features_sha256": features_sha256,
        "components": bundle.components,
        "inputs": {"cat": list(bundle.features.categorical_columns), "dense": list(bundle.features.dense_columns)},
        "bundle": str(bundle.path),
        "config": bundle.config.to_dict(),
        "metadata": metadata,
    }


def _readme(bundle: bundle_mod.Bundle, onnx_name: str) -> str:
    f = bundle.features
    cats = ", ".join(f"{c} (< {n})" for c, n in zip(f.categorical_columns, bundle.model.cardinalities))
    dense = ", ".join(f.dense_columns)
    n_cat, n_dense = len(f.categorical_columns), len(f.dense_columns)
    return f"""# {onnx_name}: a ctr-ad ensemble as an ONNX graph

Exported from `{bundle.path}` (K = {bundle.components} components, prediction rule
`{bundle.config.model.prediction}`). The batch dimension is dynamic.

| name | type | shape | meaning |
| --- | --- | --- | --- |
| input `cat` | int64 | [batch, {n_cat}] | vocabulary index of each categorical field, in this order: {cats} |
| input `dense` | float32 | [batch, {n_dense}] | transformed dense features, in this order: {dense} |
| output `ctr` | float32 | [batch] | the ensemble's click probability |
| output `components` | float32 | [batch, {bundle.components}] | each component's click probability |

The indices and dense values are what `features.json` (beside this file) produces from raw records:

```python
import onnxruntime
from ctr_ad.features import FeatureProcessor

features = FeatureProcessor.load("features.json")
cat, dense = features.encode(raw_polars_frame)      # raw log columns, as `ctr-ad predict` reads them
ctr, components = onnxruntime.InferenceSession("{onnx_name}").run(None, {{"cat": cat, "dense": dense}})
```

Or serve it with the same REST routes as the bundle: `ctr-ad serve --backend onnxruntime --bundle {onnx_name}`.
"""


def check_parity(bundle: bundle_mod.Bundle, onnx_path: Path, cat: np.ndarray, dense: np.ndarray) -> float:
    """max |Δp| between onnxruntime and the bundle on these rows, over ``ctr`` and every component."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ctr, comps = session.run(None, {"cat": cat.astype(np.int64), "dense": dense.astype(np.float32)})
    ref = bundle.predict_arrays(cat, dense)
    return float(max(np.abs(ctr - ref.ctr).max(initial=0.0), np.abs(comps - ref.components).max(initial=0.0)))


def export_onnx(bundle_path: str | Path, out: str | Path) -> dict[str, Any]:
    """Export the bundle at ``bundle_path`` (RUN_DIR, RUN_DIR/bundle or published/) to ``out`` (an .onnx file) with
    ``features.json`` and ``<stem>.README.md`` beside it. Returns what was written and the parity check."""
    require_onnx()
    import onnx

    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out names the .onnx file to write")
    if out.suffix != ".onnx":
        raise UserError(f"{out}: --out must end in .onnx")
    from service.model_store import resolve_published

    bundle = bundle_mod.load(resolve_published(bundle_path))  # a pipeline's published/ follows CURRENT
    features_src = bundle.path / bundle_mod.FEATURES
    features_dst = out.parent / bundle_mod.FEATURES
    features_bytes = features_src.read_bytes()
    if features_dst.is_file() and features_dst.read_bytes() != features_bytes:
        raise UserError(f"{features_dst}: exists with another feature encoding; export into another directory "
                        "(the graph and its features.json must stay together)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / out.name
        try:
            _export_graph(bundle, staged)
        except Exception as exc:  # an exporter failure is a bug report, not a user error: keep the cause
            raise RuntimeError(f"ONNX export of {bundle.path} failed: {exc}") from exc
        proto = onnx.load(str(staged))
        doc = _document(bundle, hashlib.sha256(features_bytes).hexdigest())
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(doc, sort_keys=True, default=str)
        proto.producer_name, proto.doc_string = "ctr-ad", f"ctr-ad ensemble exported from {bundle.path}"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(staged))
        cat, dense = _example_inputs(bundle, rows=64)
        delta = check_parity(bundle, staged, cat.numpy(), dense.numpy())
        if not delta <= PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX export of {bundle.path}: onnxruntime differs from PyTorch by {delta:.3g} "
                               f"(> {PARITY_TOLERANCE:g}); not written")
        shutil.move(str(staged), out)  # same directory: a rename
    if not features_dst.is_file():
        atomic_write_text(features_dst, features_bytes.decode())
    readme = out.with_name(f"{out.stem}.README.md")
    atomic_write_text(readme, _readme(bundle, out.name))
    logger.info(f"{out}: K={bundle.components}, inputs cat [batch, {len(bundle.features.categorical_columns)}] "
                f"dense [batch, {len(bundle.features.dense_columns)}]; onnxruntime max |Δp| {delta:.2g}")
    return {"onnx": str(out), "features": str(features_dst), "readme": str(readme), "max_abs_diff": delta,
            "model_version": doc["model_version"]}
