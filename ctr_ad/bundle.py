"""Trained-model bundles: save, load, validate, predict.

A bundle is the directory ``RUN_DIR/bundle/``::

    model.safetensors   EnsembleCTR weights (embedding.weight [K·rows, d] — [rows, d] with one shared table —,
                        weights.i [K, in, out], biases.i)
    features.json       the fitted FeatureProcessor (the one transform shared by ingest, predict, service)
    config.yaml         the resolved training config
    metadata.json       version, created_at, K, penalty, lambda, data fingerprint, valid/test metrics, …
    checksums.sha256    ``sha256sum -c``-compatible checksums of the four files above

Public API (used by ``ctr-ad predict`` and the REST service)::

    from ctr_ad.bundle import load, Bundle, Prediction, BundleError

    bundle = load("runs/demo")              # RUN_DIR or RUN_DIR/bundle; raises BundleError (a UserError)
    bundle.features                         # FeatureProcessor: .transform(raw polars frame) -> model-ready
    bundle.config                           # ctr_ad.config.Config
    bundle.metadata                         # dict: version, created_at, components, penalty, lambda, ...
    bundle.components                       # K
    pred = bundle.predict_frame(model_ready_frame)   # columns as produced by features.transform
    pred = bundle.predict_raw(raw_frame)             # = predict_arrays(*features.encode(raw_frame))
    pred = bundle.predict_arrays(cat_int64_NxF, dense_float32_NxD)
    pred.ctr            # float64 numpy [N]: ensemble probability (config model.prediction)
    pred.components     # float64 numpy [N, K]: each component's probability
    pred.component_std  # float64 numpy [N]: std over components of their probabilities (ddof = 0)

Prediction runs on CPU (or ``load(..., device=...)``), in eval mode under ``torch.inference_mode``;
the model is built once at load time, so a call allocates only the batch's own tensors. A loaded
bundle can be shared by threads: prediction does not mutate it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import ctr_ad
from ctr_ad.config import Config
from ctr_ad.errors import UserError
from ctr_ad.files import finite_or_none, replace_dir, utc_timestamp
from ctr_ad.hashing import sha256_file
from ctr_ad.model import EnsembleCTR, ensemble_probability

BUNDLE_FORMAT = 1
WEIGHTS = "model.safetensors"
FEATURES = "features.json"
CONFIG = "config.yaml"
METADATA = "metadata.json"
CHECKSUMS = "checksums.sha256"
CHECKED_FILES = (WEIGHTS, FEATURES, CONFIG, METADATA)


class BundleError(UserError):
    """A bundle is missing, incomplete, corrupt or inconsistent; the message names the file."""


@dataclass
class Prediction:
    """Scores of N rows by a K-component ensemble (numpy float64)."""

    ctr: np.ndarray  # [N]
    components: np.ndarray  # [N, K]
    component_std: np.ndarray  # [N]

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"ctr": self.ctr, "components": self.components, "component_std": self.component_std}


def save(
    bundle_dir: Path,
    model: EnsembleCTR,
    features: Any,
    config: Config,
    metadata: dict[str, Any],
) -> Path:
    """Write a bundle atomically (to a temporary sibling, then renamed over ``bundle_dir``)."""
    bundle_dir = Path(bundle_dir)
    tmp = bundle_dir.with_name(bundle_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    _check_finite(state, bundle_dir)
    save_file(state, str(tmp / WEIGHTS))
    (tmp / FEATURES).write_text(json.dumps(features.to_dict(), indent=1, sort_keys=True, ensure_ascii=False))
    (tmp / CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    meta = {
        "bundle_format": BUNDLE_FORMAT,
        "version": ctr_ad.__version__,
        "created_at": utc_timestamp(),
        "components": config.model.components,
        "penalty": config.anti_distillation.penalty,
        "lambda": config.anti_distillation.lam,
        "data_order": config.anti_distillation.data_order,
        "prediction": config.model.prediction,
        "source": getattr(features, "source", None),
        "cardinalities": list(model.cardinalities),
        "embedding_table_rows": list(model.table_rows),
        "share_embeddings": model.share_embeddings,
        "n_dense": model.n_dense,
        **metadata,
    }
    (tmp / METADATA).write_text(json.dumps(finite_or_none(meta), indent=1, sort_keys=True, allow_nan=False))
    lines = [f"{sha256_file(tmp / name)}  {name}\n" for name in CHECKED_FILES]
    (tmp / CHECKSUMS).write_text("".join(lines))
    replace_dir(tmp, bundle_dir)
    return bundle_dir


def _check_finite(state: dict[str, torch.Tensor], where: Path) -> None:
    """A NaN or infinite weight turns every prediction into NaN: refuse it at the boundary."""
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise BundleError(f"{where}: non-finite values (NaN or inf) in weight tensor(s) {bad}; the model diverged")


class Bundle:
    """A validated, loaded bundle ready to predict. Build it with :func:`load`."""

    def __init__(self, path: Path, model: EnsembleCTR, features: Any, config: Config, metadata: dict[str, Any]) -> None:
        self.path = path
        self.model = model.eval()
        self.features = features
        self.config = config
        self.metadata = metadata
        self.components = model.components
        self.device = next(model.parameters()).device
        self._cat_cols: list[str] = list(features.categorical_columns)
        self._dense_cols: list[str] = list(features.dense_columns)
        self._cardinalities = torch.tensor(model.cardinalities, dtype=torch.long, device=self.device)
        self._cardinalities_np = np.asarray(model.cardinalities, dtype=np.int64)

    @property
    def metadata_file(self) -> Path:
        return self.path / METADATA

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, K={self.components}, penalty={self.metadata.get('penalty')!r})"

    def predict_arrays(self, cat: np.ndarray | torch.Tensor, dense: np.ndarray | torch.Tensor) -> Prediction:
        """Score model-ready arrays: cat int [N, F] (vocab indices), dense float [N, D]."""
        cat_t = torch.as_tensor(cat).to(self.device, torch.long)
        dense_t = torch.as_tensor(dense).to(self.device, torch.float32)
        n = cat_t.shape[0]
        if cat_t.dim() != 2 or cat_t.shape[1] != len(self._cat_cols):
            raise ValueError(f"cat must be [N, {len(self._cat_cols)}], got {tuple(cat_t.shape)}")
        if dense_t.dim() != 2 or dense_t.shape != (n, len(self._dense_cols)):
            raise ValueError(f"dense must be [{n}, {len(self._dense_cols)}], got {tuple(dense_t.shape)}")
        if n and self._out_of_range(cat, cat_t):
            raise ValueError("categorical index out of range for this bundle's vocabularies")
        k = self.components
        with torch.inference_mode():
            logits = self.model(cat_t, dense_t).float()  # [K, N]
            probs = torch.sigmoid(logits)
            ctr = ensemble_probability(logits, self.config.model.prediction)
            std = probs.std(dim=0, correction=0)
            # One device->host copy and one float64 conversion for all three outputs: per request
            # each tensor op costs more than its arithmetic on a handful of rows.
            table = torch.cat([probs, ctr.unsqueeze(0), std.unsqueeze(0)]).T.cpu().double().numpy()
        return Prediction(ctr=table[:, k], components=table[:, :k], component_std=table[:, k + 1])

    def _out_of_range(self, cat: np.ndarray | torch.Tensor, cat_t: torch.Tensor) -> bool:
        if isinstance(cat, np.ndarray):  # numpy's reductions on a few rows cost a fraction of torch's
            return bool(cat.min() < 0 or (cat >= self._cardinalities_np).any())
        return bool((cat_t < 0).any() or (cat_t >= self._cardinalities).any())

    def predict_frame(self, frame: pl.DataFrame) -> Prediction:
        """Score a model-ready frame (the output of ``bundle.features.transform``)."""
        missing = [c for c in (*self._cat_cols, *self._dense_cols) if c not in frame.columns]
        if missing:
            raise ValueError(f"frame lacks model columns {missing[:5]}")
        from ctr_ad.features import model_arrays

        return self.predict_arrays(*model_arrays(frame, self._cat_cols, self._dense_cols))

    def predict_raw(self, raw: pl.DataFrame) -> Prediction:
        """Encode a validated raw frame with the bundle's features (``FeatureProcessor.encode``: small
        batches go straight to arrays, without a model-ready frame in between), then score it."""
        return self.predict_arrays(*self.features.encode(raw))


def resolve_dir(path: str | Path) -> Path:
    """RUN_DIR or RUN_DIR/bundle → the bundle directory."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: bundle not found")
    if (path / "bundle").is_dir() and not (path / METADATA).exists():
        return path / "bundle"
    return path


def _read_checksums(bundle_dir: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for n, line in enumerate((bundle_dir / CHECKSUMS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise BundleError(f"{bundle_dir / CHECKSUMS}:{n}: malformed line")
        sums[parts[1].strip().lstrip("*")] = parts[0]
    return sums


def _check_shapes(expected: dict[str, Sequence[int]], found: dict[str, torch.Tensor], where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise BundleError(f"{where}: weights do not match the config (missing {missing}, unexpected {extra})")
    for key, shape in expected.items():
        if tuple(found[key].shape) != tuple(shape):
            raise BundleError(
                f"{where}: tensor '{key}' has shape {tuple(found[key].shape)}, but config.yaml and "
                f"features.json imply {tuple(shape)}"
            )


def load(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load and validate a bundle; every problem raises :class:`BundleError` naming the file."""
    from ctr_ad.features import FeatureProcessor

    bundle_dir = resolve_dir(path)
    for name in (*CHECKED_FILES, CHECKSUMS):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"{bundle_dir}: incomplete bundle, missing {name}")
    sums = _read_checksums(bundle_dir)
    for name in CHECKED_FILES:
        if name not in sums:
            raise BundleError(f"{bundle_dir / CHECKSUMS}: no checksum for {name}")
    weights_path = bundle_dir / WEIGHTS
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights_path}: weights file is truncated or corrupt ({exc})") from None
    for name in CHECKED_FILES:
        if sha256_file(bundle_dir / name) != sums[name]:
            raise BundleError(f"{bundle_dir / name}: checksum mismatch (file modified or corrupted)")
    try:
        metadata = json.loads((bundle_dir / METADATA).read_text())
        config_data = yaml.safe_load((bundle_dir / CONFIG).read_text())
        features = FeatureProcessor.from_dict(json.loads((bundle_dir / FEATURES).read_text()))
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise BundleError(f"{bundle_dir}: unreadable metadata/config/features ({exc})") from None
    if metadata.get("bundle_format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle_dir / METADATA}: unsupported bundle_format {metadata.get('bundle_format')!r}")
    if isinstance(config_data, dict) and isinstance(config_data.get("model"), dict):
        # Bundles written before the anchor existed have no such key and no anchor weights; the
        # built-in default (an anchored model) must not be read into them.
        config_data["model"].setdefault("anchor", "none")
    try:
        config = Config.from_dict(config_data, origin=str(bundle_dir / CONFIG))
    except UserError as exc:
        raise BundleError(str(exc)) from None
    try:
        model = EnsembleCTR.from_config(config.model, features.cardinalities, len(features.dense_columns),
                                        fields=features.categorical_columns)
    except UserError as exc:
        raise BundleError(f"{bundle_dir / CONFIG}: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_shapes(expected, state, weights_path)
    _check_finite(state, weights_path)
    model.load_state_dict(state)
    model.to(device)
    return Bundle(bundle_dir, model, features, config, metadata)
