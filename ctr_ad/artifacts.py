"""The documents that one step writes and another reads, as pydantic models used on both sides.

* :class:`DatasetManifest` — ``DATA_DIR/manifest.json`` (``ctr-ad ingest``); read by training,
  experiments and the pipeline for the data fingerprint.
* :class:`Verdict` — the decision of an experiment, stored in ``results.json`` so that reports and
  scripts read it instead of recomputing it.
* :class:`OfflineMetrics` — ``published/offline_metrics.json`` (pipeline publish); read by the
  service for the expected prediction difference of the live bundle.

Readers go through :func:`read_manifest` / :func:`read_offline_metrics`, which name the file in every
error instead of raising a ``KeyError`` three modules away.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ctr_ad.errors import UserError
from ctr_ad.files import atomic_write_json, finite_or_none
from ctr_ad.layout import DataDir
from ctr_ad.strict import validate_model


class _Document(BaseModel):
    # Artifacts written by newer versions may carry keys this one does not know: keep them.
    model_config = ConfigDict(extra="allow")


class InputRecord(_Document):
    path: str
    rows_read: int
    rows_written: int
    rows_quarantined: int
    sha256: str


class DatasetManifest(_Document):
    format_version: int = 1
    source: str
    fingerprint: str = Field(description="SHA-256 over the output files' hashes and the options")
    inputs: list[InputRecord] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    rows: dict[str, int] = Field(default_factory=dict)
    quarantine_reasons: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, int] = Field(default_factory=dict)
    features: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict, description="file name -> SHA-256")
    run: dict[str, Any] = Field(default_factory=dict)


class Verdict(_Document):
    """The experiment's answer, chosen on validation rows and stated on test rows.

    The recipe arm (lowest validation pd_rel among deep arms within the logloss tolerance of the
    baseline on validation) and the best anti-distillation arm are compared with the baseline (the most
    reproducible plain ensemble within the same tolerance); with a confirmation round every ratio is
    taken on the test rows of R *fresh* replicas of the three arms, with a bootstrap interval over test
    rows and replica pairs, and ``call`` says *better*, *worse* or *not distinguishable*.
    """

    recipe_arm: str | None = Field(description="the arm chosen on validation (the report's best arm)")
    baseline_arm: str | None = Field(description="the plain ensemble every ratio is taken against")
    rule: str
    selection: str = "validation"
    logloss_tolerance: float
    pd_rel_goal: float = Field(description="goal: pd_rel ratio at most this at logloss ratio ≤ 1 + tolerance")
    confirmed: bool = Field(False, description="the ratios come from a confirmation round with fresh seeds")
    confirm_replicas: int | None = None
    pd_rel_ratio: float | None = None
    pd_rel_ratio_ci: list[float] | None = Field(None, description="95 % bootstrap interval [low, high]")
    logloss_ratio: float | None = None
    call: str | None = Field(None, description="better | worse | not distinguishable")
    goal_met: bool = False
    ad_arm: str | None = Field(None, description="the best anti-distillation arm, reported separately")
    ad_pd_rel_ratio: float | None = None
    ad_pd_rel_ratio_ci: list[float] | None = None
    ad_logloss_ratio: float | None = None
    ad_call: str | None = None
    ad_goal_met: bool = False


class OfflineMetrics(_Document):
    """What the pipeline publishes beside the live bundle; ``pd_rel`` is the PD expected between two
    retrains of it, which the service compares with the live PD against its shadow replica."""

    bundle: str = Field(description="the live bundle, relative to the published directory")
    shadow_bundle: str | None = None
    dataset: str
    arm: str
    best_rule: str = ""
    pd_rel: float
    pd_rel_std: float | None = None
    pd_abs: float | None = None
    logloss: float | None = None
    auc: float | None = None
    replicas: int | None = None
    baseline: str | None = None
    baseline_pd_rel: float | None = None
    data_fingerprint: str | None = None
    report: str | None = None
    published_at: str | None = None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: {what} is not valid JSON") from None


def read_manifest(data_dir: str | Path) -> DatasetManifest:
    path = DataDir(Path(data_dir)).manifest
    return validate_model(DatasetManifest, _read_json(path, "dataset manifest"), str(path))


def data_fingerprint(data_dir: str | Path) -> str | None:
    """The dataset's fingerprint, or None for a directory without a manifest (hand-made data)."""
    path = DataDir(Path(data_dir)).manifest
    return read_manifest(data_dir).fingerprint if path.is_file() else None


def read_offline_metrics(path: str | Path) -> OfflineMetrics:
    path = Path(path)
    return validate_model(OfflineMetrics, _read_json(path, "offline metrics"), str(path))


def write_document(path: str | Path, doc: BaseModel | dict[str, Any]) -> Path:
    """Atomically write a document as strict JSON (non-finite numbers become null)."""
    data = doc.model_dump(mode="json") if isinstance(doc, BaseModel) else doc
    return atomic_write_json(path, finite_or_none(data))
