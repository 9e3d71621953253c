"""Where every artifact lives on disk: one place for the paths that writers and readers share.

::

    DATA_DIR/                    ctr-ad ingest
        train.parquet valid.parquet test.parquet features.json manifest.json quarantine.jsonl
    RUN_DIR/                     ctr-ad train
        config.yaml metrics.jsonl checkpoint.pt bundle/
    EXP_DIR/                     ctr-ad experiment
        experiment.yaml results.json report.html report.md
        arms/<arm>/r<r>/         one replica: predictions.parquet metrics.json done.json run/ (a RUN_DIR)
    PIPELINE_OUT/                ctr-ad pipeline run
        raw/<dataset>.tsv.gz data/<dataset>/ experiments/<dataset>/ pipeline-state.json
        published/               CURRENT offline_metrics.json bundles/<name>/ bundles/<name>-shadow/

Code asks these classes for a path instead of joining strings, so a layout change is made here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataDir:
    root: Path

    def split(self, name: str) -> Path:
        return self.root / f"{name}.parquet"

    @property
    def train(self) -> Path:
        return self.split("train")

    @property
    def valid(self) -> Path:
        return self.split("valid")

    @property
    def test(self) -> Path:
        return self.split("test")

    @property
    def features(self) -> Path:
        return self.root / "features.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def logreg_fit(self) -> Path:
        """A logistic-regression replica's convergence record (experiments only)."""
        return self.root / "fit.json"


@dataclass(frozen=True)
class ReplicaDir:
    root: Path

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def valid_predictions(self) -> Path:
        return self.root / "valid_predictions.parquet"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def done(self) -> Path:
        return self.root / "done.json"

    @property
    def run(self) -> RunDir:
        return RunDir(self.root / "run")


@dataclass(frozen=True)
class ExperimentDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def anchor_cache(self) -> Path:
        """Linear anchor fits shared by the worker processes (by data fingerprint and C)."""
        return self.root / "anchor-cache"

    def arm(self, name: str) -> Path:
        return self.root / "arms" / name

    def replica(self, arm: str, replica: int) -> ReplicaDir:
        return ReplicaDir(self.arm(arm) / f"r{replica}")


@dataclass(frozen=True)
class PublishedDir:
    """What the pipeline publishes and the service follows: ``CURRENT`` names the live bundle."""

    root: Path

    @property
    def current(self) -> Path:
        return self.root / "CURRENT"

    @property
    def offline_metrics(self) -> Path:
        return self.root / "offline_metrics.json"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    def bundle(self, name: str) -> Path:
        return self.bundles / name

    @classmethod
    def containing(cls, bundle_dir: Path) -> PublishedDir | None:
        """The published directory a bundle was published into (``<published>/bundles/<name>``)."""
        parent = bundle_dir.resolve().parent
        if parent.name != "bundles":
            return None
        published = cls(parent.parent)
        return published if published.offline_metrics.is_file() else None


@dataclass(frozen=True)
class PipelineDir:
    root: Path

    def raw(self, dataset: str) -> Path:
        return self.root / "raw" / f"{dataset}.tsv.gz"

    def data(self, dataset: str) -> DataDir:
        return DataDir(self.root / "data" / dataset)

    def experiment(self, dataset: str) -> ExperimentDir:
        return ExperimentDir(self.root / "experiments" / dataset)

    @property
    def published(self) -> PublishedDir:
        return PublishedDir(self.root / "published")

    @property
    def state(self) -> Path:
        return self.root / "pipeline-state.json"
