"""Loaded bundles ("slots") and the atomic swap used by reloads.

A :class:`ModelSlot` is everything one bundle needs to answer requests: the bundle, its request
parser and encoder, and its identity. Handlers read ``store.primary`` once at the start of a request
and use that slot to the end, so a reload (which replaces the reference in one assignment) never
mixes two models in one response: in-flight requests finish on the old slot, which is freed when
the last of them drops it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctr_ad import bundle as bundle_mod
from ctr_ad.errors import UserError
from service.encoding import ParsedBatch, RecordEncoder, RequestParser

OFFLINE_METRICS_FILE = "offline_metrics.json"


@dataclass
class Scores:
    """Scores of one batch by one slot (float64 numpy)."""

    ctr: np.ndarray
    component_std: np.ndarray
    components: np.ndarray


@dataclass
class ModelSlot:
    bundle: bundle_mod.Bundle
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

    @property
    def components(self) -> int:
        return self.bundle.components

    def score_arrays(self, cat: np.ndarray, dense: np.ndarray) -> Scores:
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


def _find_pd_rel(node: Any, depth: int = 0) -> float | None:
    """The first ``pd_rel`` in a metrics document: a number or ``{"mean": number}`` (breadth first)."""
    if depth > 6 or not isinstance(node, dict):
        return None
    value = node.get("pd_rel")
    if isinstance(value, dict):
        value = value.get("mean")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    for child in node.values():
        found = _find_pd_rel(child, depth + 1)
        if found is not None:
            return found
    return None


def find_offline_metrics(bundle_dir: Path, metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The offline reproducibility of the bundle's own experiment, if recorded anywhere we know.

    Looked up in order: ``offline_metrics.json`` in the bundle directory, next to it (RUN_DIR/), and
    two levels up — the pipeline publishes ``<out>/published/{CURRENT, offline_metrics.json,
    bundles/<name>/}`` — then the bundle's own metadata (``offline_metrics`` / ``pd_rel``). A file
    that names its bundle (the pipeline's ``"bundle"`` key) counts only for that bundle, so serving
    an older published bundle does not borrow the current one's figures.
    Returns ``{"pd_rel", "source", ...}`` or None.
    """
    candidates = [bundle_dir / OFFLINE_METRICS_FILE, bundle_dir.parent / OFFLINE_METRICS_FILE,
                  bundle_dir.parent.parent / OFFLINE_METRICS_FILE]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a broken side file must not stop the service; monitoring just lacks it
        named = doc.get("bundle") if isinstance(doc, dict) else None
        if isinstance(named, str) and (path.parent / named).resolve() != bundle_dir.resolve():
            continue
        pd_rel = _find_pd_rel(doc)
        if pd_rel is not None:
            out: dict[str, Any] = {"pd_rel": pd_rel, "source": str(path)}
            if isinstance(doc, dict):
                for key in ("pd_abs", "arm", "dataset", "replicas", "baseline_pd_rel", "published_at"):
                    if key in doc and isinstance(doc[key], str | int | float):
                        out[key] = doc[key]
            return out
    pd_rel = _find_pd_rel({"m": metadata.get("offline_metrics")}) or _find_pd_rel(
        {k: v for k, v in metadata.items() if k == "pd_rel"}
    )
    if pd_rel is not None:
        return {"pd_rel": pd_rel, "source": str(bundle_dir / bundle_mod.METADATA)}
    return None


def resolve_published(path: str | Path) -> Path:
    """A pipeline's ``published/`` directory -> the bundle its ``CURRENT`` file points to.

    Serving ``<out>/published`` (rather than one bundle) lets ``POST /v1/admin/reload`` with an
    empty body pick up whatever the pipeline published since.
    """
    path = Path(path)
    pointer = path / "CURRENT"
    if pointer.is_file() and not (path / bundle_mod.METADATA).exists():
        target = pointer.read_text().strip()
        if not target:
            raise UserError(f"{pointer}: empty; nothing published yet")
        return path / target
    return path


def load_slot(path: str | Path, max_instances: int, offline_pd_rel: float | None = None) -> ModelSlot:
    """Load, validate and warm up a bundle; a bad bundle raises ``BundleError`` (a ``UserError``)."""
    source = Path(path)
    bundle = bundle_mod.load(resolve_published(source))
    features = bundle.features
    if not features.raw_fields:
        raise UserError(f"{bundle.path}: the bundle's features name no raw fields")
    meta = bundle.metadata
    offline = find_offline_metrics(bundle.path, meta)
    if offline_pd_rel is not None:
        offline = {"pd_rel": float(offline_pd_rel), "source": "--offline-pd-rel"}
    slot = ModelSlot(
        bundle=bundle,
        parser=RequestParser(features, max_instances),
        encoder=RecordEncoder(features),
        version=model_version(bundle.path, meta),
        path=bundle.path,
        loaded_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        offline=offline,
        source=source,
        features_digest=hashlib.sha256((bundle.path / bundle_mod.FEATURES).read_bytes()).hexdigest(),
    )
    slot.info = {
        "model_version": slot.version,
        "created_at": meta.get("created_at"),
        "loaded_at": slot.loaded_at,
        "bundle_path": str(bundle.path),
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


class ModelStore:
    """The current primary and shadow slots; swaps are single reference assignments."""

    def __init__(self, primary: ModelSlot, shadow: ModelSlot | None = None) -> None:
        self.primary = primary
        self.shadow = shadow
        self.started = time.time()
        # Serialises reloads (two admins reloading at once); never taken on the request path.
        self.reload_lock = threading.Lock()
        self.reloads = 0

    @property
    def ready(self) -> bool:
        return self.primary.warmed_up

    def swap(self, primary: ModelSlot, shadow: ModelSlot | bool | None = False) -> ModelSlot:
        """Install ``primary`` (and ``shadow`` unless False); returns the old primary."""
        old = self.primary
        if shadow is not False:
            self.shadow = shadow  # type: ignore[assignment]
        self.primary = primary
        self.reloads += 1
        return old


def score_batch(slot: ModelSlot, batch: ParsedBatch) -> Scores:
    cat, dense = slot.encoder.encode(batch)
    return slot.score_arrays(cat, dense)
