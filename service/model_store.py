"""Loaded bundles ("slots") and the atomic swap used by reloads.

A :class:`ModelSlot` is everything one bundle needs to answer requests: the bundle, its request
parser and encoder, and its identity. Handlers read ``store.primary`` once at the start of a request
and use that slot to the end, so a reload (which replaces the reference in one assignment) never
mixes two models in one response: in-flight requests finish on the old slot, which is freed when
the last of them drops it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctr_ad import bundle as bundle_mod
from ctr_ad.artifacts import read_offline_metrics
from ctr_ad.errors import UserError
from ctr_ad.files import utc_timestamp
from ctr_ad.layout import PublishedDir
from ctr_ad.small_batch import SMALL_BATCH_ROWS, NumpyEnsemble
from service.encoding import RecordEncoder, RequestParser

if TYPE_CHECKING:
    from service.backends import ScoringModel

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Scores of one batch by one slot (float64 numpy)."""

    ctr: np.ndarray
    component_std: np.ndarray
    components: np.ndarray


@dataclass
class ModelSlot:
    bundle: ScoringModel
    parser: RequestParser
    encoder: RecordEncoder
    version: str
    path: Path
    loaded_at: str
    offline: dict[str, Any] | None
    #: The path the operator gave (RUN_DIR, bundle dir or published/): what a bare reload re-reads.
    source: Path | None = None
    features_digest: str = ""
    warmed_up: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    #: The torch bundle's forward in numpy, for batches up to SMALL_BATCH_ROWS (None: always the bundle's).
    small_batch: NumpyEnsemble | None = None

    @property
    def components(self) -> int:
        return self.bundle.components

    def score_arrays(self, cat: np.ndarray, dense: np.ndarray) -> Scores:
        if self.small_batch is not None and cat.shape[0] <= SMALL_BATCH_ROWS:
            ctr, components, std = self.small_batch.predict(cat, dense)
            return Scores(ctr=ctr, component_std=std, components=components)
        pred = self.bundle.predict_arrays(cat, dense)
        return Scores(ctr=pred.ctr, component_std=pred.component_std, components=pred.components)

    def warm_up(self) -> None:
        """Score one all-missing instance through the whole request path (parse, encode, model)."""
        batch = self.parser.parse(b'{"instances": [{}]}')
        cat, dense = self.encoder.encode(batch)
        scores = self.score_arrays(cat, dense)
        if not np.isfinite(scores.ctr).all():
            raise UserError(f"{self.path}: the model returned a non-finite score on the warm-up instance")
        self.warmed_up = True

    def same_features(self, other: ModelSlot) -> bool:
        return self.features_digest == other.features_digest


def model_version(bundle_dir: Path, metadata: dict[str, Any]) -> str:
    """A version string that changes whenever any bundle file does: creation time + checksum prefix."""
    explicit = metadata.get("model_version")
    if isinstance(explicit, str) and explicit:
        return explicit
    digest = hashlib.sha256((bundle_dir / bundle_mod.CHECKSUMS).read_bytes()).hexdigest()[:12]
    created = str(metadata.get("created_at") or "unknown").replace("-", "").replace(":", "")
    return f"{created}-{digest}"


def offline_metrics(bundle_dir: Path, metadata: dict[str, Any], given: float | None = None,
                    metadata_file: Path | None = None) -> dict[str, Any] | None:
    """The offline reproducibility (``pd_rel`` between two retrains) the live PD is compared with.

    In order: ``given`` (``--offline-pd-rel``, the operator's word); for a bundle the pipeline
    published (``<published>/bundles/<name>``), ``<published>/offline_metrics.json`` if its
    ``bundle`` names this one — so serving an older published bundle does not borrow the current
    one's figures; else the bundle's metadata (``offline_metrics.pd_rel`` or ``pd_rel``).
    Returns ``{"pd_rel", "source", ...}`` or None; a broken metrics file is logged, not fatal.
    """
    if given is not None:
        return {"pd_rel": float(given), "source": "--offline-pd-rel"}
    published = PublishedDir.containing(bundle_dir)
    if published is not None:
        try:
            doc = read_offline_metrics(published.offline_metrics)
        except UserError as exc:
            log.warning("ignoring the offline metrics: %s", exc)
        else:
            if (published.root / doc.bundle).resolve() == bundle_dir.resolve() and math.isfinite(doc.pd_rel):
                keep = {"pd_abs", "arm", "dataset", "replicas", "baseline_pd_rel", "published_at"}
                extra = doc.model_dump(include=keep, exclude_none=True)
                return {"pd_rel": doc.pd_rel, "source": str(published.offline_metrics), **extra}
    nested = metadata.get("offline_metrics")
    for value in (nested.get("pd_rel") if isinstance(nested, dict) else None, metadata.get("pd_rel")):
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return {"pd_rel": float(value), "source": str(metadata_file or bundle_dir / bundle_mod.METADATA)}
    return None


def resolve_published(path: str | Path) -> Path:
    """A pipeline's ``published/`` directory -> the bundle its ``CURRENT`` file points to.

    Serving ``<out>/published`` (rather than one bundle) lets ``POST /v1/admin/reload`` with an
    empty body pick up whatever the pipeline published since.
    """
    path = Path(path)
    pointer = PublishedDir(path).current
    if pointer.is_file() and not (path / bundle_mod.METADATA).exists():
        target = pointer.read_text().strip()
        if not target:
            raise UserError(f"{pointer}: empty; nothing published yet")
        return path / target
    return path


def small_batch_forward(bundle: ScoringModel) -> NumpyEnsemble | None:
    """The numpy forward of a torch bundle on the CPU (one request's rows cost a fifth of torch's
    time there); None for other backends and devices, which score every batch themselves."""
    if not isinstance(bundle, bundle_mod.Bundle) or bundle.device.type != "cpu":
        return None
    return NumpyEnsemble(bundle.model, bundle.config.model.prediction)


def load_slot(path: str | Path, max_instances: int, offline_pd_rel: float | None = None, backend: str = "torch",
              threads: int = 1) -> ModelSlot:
    """Load, validate and warm up a bundle (or, with ``backend="onnxruntime"``, an exported graph);
    a bad one raises ``BundleError`` (a ``UserError``)."""
    from service.backends import load_model

    source = Path(path)
    bundle = load_model(source, backend, threads)
    features = bundle.features
    if not features.raw_fields:
        raise UserError(f"{bundle.path}: the bundle's features name no raw fields")
    meta = bundle.metadata
    offline = offline_metrics(bundle.path, meta, offline_pd_rel, bundle.metadata_file)
    slot = ModelSlot(
        bundle=bundle,
        parser=RequestParser(features, max_instances),
        encoder=RecordEncoder(features),
        version=model_version(bundle.path, meta),
        path=bundle.path,
        loaded_at=utc_timestamp(),
        offline=offline,
        source=source,
        features_digest=hashlib.sha256((bundle.path / bundle_mod.FEATURES).read_bytes()).hexdigest(),
        small_batch=small_batch_forward(bundle),
    )
    slot.info = {
        "model_version": slot.version,
        "created_at": meta.get("created_at"),
        "loaded_at": slot.loaded_at,
        "bundle_path": str(bundle.path),
        "backend": backend,
        "package_version": meta.get("version"),
        "components": bundle.components,
        "penalty": meta.get("penalty"),
        "lambda": meta.get("lambda"),
        "data_order": meta.get("data_order"),
        "prediction": meta.get("prediction"),
        "source": meta.get("source"),
        "data_fingerprint": meta.get("data_fingerprint"),
        "valid_metrics": meta.get("valid_metrics"),
        "test_metrics": meta.get("test_metrics"),
        "offline_pd_rel": offline["pd_rel"] if offline else None,
        "fields": {"dense": list(features.dense), "categorical": list(features.categorical)},
    }
    slot.warm_up()
    return slot
