"""Experiment tracking: ``ctr-ad train`` and ``ctr-ad experiment`` runs logged to MLflow.

Switched on by a ``tracking`` section in the training or experiment config, or by ``--mlflow``::

    tracking:
      experiment: ctr-ad          # MLflow experiment name
      uri: null                   # null: $MLFLOW_TRACKING_URI, else a local ./mlruns file store
      run_name: null              # null: the run / experiment directory's name
      log_artifacts: true         # the bundle, report.html, results.json
      tags: {team: ads}

What is logged:

* ``ctr-ad train`` — one run: every config value as a param (``model.components``, ``train.lr``, …),
  the kept weights' validation and test metrics (``best_valid_logloss``, ``test_auc``, …), the curves
  of ``metrics.jsonl`` step by step (``valid_logloss``, ``valid_auc``, ``train_loss``), and the bundle
  and ``config.yaml`` as artifacts.
* ``ctr-ad experiment`` — one parent run with the experiment's settings as params, the verdict
  (recipe arm, baseline, pd_rel and logloss ratios with the bootstrap interval, call, goal) as
  params and metrics, and ``results.json``, ``report.html`` and the best arm's bundle as artifacts;
  one child run per arm with its training config as params and, per metric, the mean and std over
  replicas (accuracy) or replica pairs (PD: ``pd_rel_mean``, ``pd_rel_std``, ``churn_top1_mean``…).

MLflow is the optional extra ``[mlflow]``. MLflow 3 keeps the plain-directory store only in
maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; the default ``./mlruns``
store sets that for this process. Any other store (``sqlite:///mlflow.db``, an ``http://`` server)
is used as given.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from ctr_ad.errors import UserError
from ctr_ad.strict import StrictModel

logger = logging.getLogger(__name__)

DEFAULT_STORE = "mlruns"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


class TrackingConfig(StrictModel):
    backend: str = Field("mlflow", pattern="^mlflow$", description="the tracking system (MLflow)")
    experiment: str = Field("ctr-ad", min_length=1, description="MLflow experiment name")
    uri: str | None = Field(None, description="tracking URI (None: $MLFLOW_TRACKING_URI, else ./mlruns)")
    run_name: str | None = Field(None, description="run name (None: the output directory's name)")
    log_artifacts: bool = Field(True, description="log the bundle / report.html / results.json")
    tags: dict[str, str] = Field(default_factory=dict)


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store to log to: the config's, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns`` (a file store)."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # our default; MLflow 3 refuses it otherwise
    return Path(DEFAULT_STORE).resolve().as_uri()


def _client(cfg: TrackingConfig) -> tuple[Any, str, str]:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError("tracking needs MLflow: pip install 'ctr-ad[mlflow]'") from None
    uri = tracking_uri(cfg)
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(cfg.experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(cfg.experiment)
    except Exception as exc:  # an unreachable server, a store MLflow refuses: one line naming the URI
        raise UserError(f"MLflow tracking at {uri}: {str(exc).splitlines()[0]}") from None
    return client, experiment_id, uri


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """("section.key", value) for every leaf of a nested mapping."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, name + ".")
        else:
            yield name, value


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_CHARS]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Run:
    """One MLflow run, written with batched calls and closed with its final status."""

    def __init__(self, client: Any, experiment_id: str, name: str, tags: Mapping[str, str],
                 parent: str | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._metric, self._param, self._tag = Metric, Param, RunTag
        all_tags = {"mlflow.runName": name, **tags}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        self.client = client
        self.run = client.create_run(experiment_id, run_name=name, tags=all_tags)
        self.id = self.run.info.run_id

    def params(self, values: Mapping[str, Any]) -> None:
        items = [self._param(k, _param_value(v)) for k, v in values.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.id, params=items[start:start + 100])

    def metrics(self, values: Mapping[str, Any], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        items = [self._metric(k, float(v), now, step) for k, v in values.items() if _finite(v)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.id, metrics=items[start:start + 1000])

    def artifact(self, path: Path, where: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.id, str(path), where)
        elif path.is_file():
            self.client.log_artifact(self.id, str(path), where)

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.id, "FINISHED" if ok else "FAILED")


# --------------------------------------------------------------------------------------------- training
def log_training(cfg: TrackingConfig, run_dir: Path, config: Mapping[str, Any], result: Any) -> str:
    """Log one training run (a :class:`ctr_ad.train.TrainResult`); returns the MLflow run id."""
    client, experiment_id, uri = _client(cfg)
    run = _Run(client, experiment_id, cfg.run_name or Path(run_dir).resolve().name,
               {"ctr_ad.command": "train", "ctr_ad.run_dir": str(Path(run_dir).resolve()), **cfg.tags})
    ok = False
    try:
        run.params({k: v for k, v in flatten(config) if not k.startswith("tracking.")})
        # best_valid_*: the kept weights' scores; valid_* (below) is the curve, one value per evaluation.
        run.metrics({f"best_valid_{k}": v for k, v in result.valid_metrics.items()})
        run.metrics({f"test_{k}": v for k, v in (result.test_metrics or {}).items()})
        run.metrics({"steps": result.steps, "best_step": result.best_step, "epochs": result.epochs_completed,
                     "stopped_early": float(result.stopped_early)})
        metrics_file = Path(run_dir) / "metrics.jsonl"
        if metrics_file.is_file():
            for line in metrics_file.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    run.metrics({k: record.get(k) for k in ("valid_logloss", "valid_auc", "train_loss", "lambda")},
                                step=int(record["step"]))
        if cfg.log_artifacts:
            if result.bundle_dir is not None:
                run.artifact(Path(result.bundle_dir), "bundle")
            run.artifact(Path(run_dir) / "config.yaml")
        ok = True
    finally:
        run.finish(ok)
    logger.info(f"MLflow run {run.id} in experiment '{cfg.experiment}' at {uri}")
    return run.id


# --------------------------------------------------------------------------------------------- experiments
def arm_metrics(arm: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics of one arm summary of results.json: ``<metric>_mean`` / ``_std`` for accuracy (over
    replicas), PD (over replica pairs) and the component figures; validation PD as ``valid_…``."""
    out: dict[str, float] = {}
    sections = [("", arm.get("accuracy", {})), ("", arm.get("pd", {})), ("", arm.get("component", {})),
                ("valid_", arm.get("valid", {}).get("pd", {})), ("valid_", arm.get("valid", {}).get("accuracy", {}))]
    for prefix, section in sections:
        for name, stats in section.items():
            for stat in ("mean", "std"):
                if isinstance(stats, Mapping) and _finite(stats.get(stat)):
                    out[f"{prefix}{name}_{stat}"] = float(stats[stat])
    wall = arm.get("wall_s")
    if isinstance(wall, Mapping) and _finite(wall.get("mean")):
        out["wall_s_mean"] = float(wall["mean"])
    out["replicas"] = float(arm.get("replicas", 0))
    return out


def log_experiment(cfg: TrackingConfig, exp_dir: Path, results: Mapping[str, Any]) -> str:
    """Log a finished experiment (its results.json document); returns the parent run's id."""
    from ctr_ad.experiment import best_bundle

    client, experiment_id, uri = _client(cfg)
    exp_dir = Path(exp_dir)
    experiment = results.get("experiment", {})
    manifest = results.get("manifest") or {}
    run = _Run(client, experiment_id, cfg.run_name or exp_dir.resolve().name,
               {"ctr_ad.command": "experiment", "ctr_ad.exp_dir": str(exp_dir.resolve()), **cfg.tags})
    ok = False
    try:
        settings = {k: experiment.get(k) for k in ("replicas", "seed", "logloss_tolerance",
                                                   "selection_logloss_tolerance", "pd_rel_goal", "confirm",
                                                   "confirm_replicas", "top_fractions")}
        verdict = results.get("verdict", {})
        run.params({**settings, "arms": sorted(results.get("arms", {})), "data_dir": results.get("data_dir"),
                    "data_fingerprint": manifest.get("fingerprint"),
                    **{f"verdict.{k}": v for k, v in verdict.items() if not _finite(v)}})
        run.metrics({f"verdict_{k}": v for k, v in verdict.items() if _finite(v)})
        ci = verdict.get("pd_rel_ratio_ci") or []
        if len(ci) == 2:
            run.metrics({"verdict_pd_rel_ratio_ci_low": ci[0], "verdict_pd_rel_ratio_ci_high": ci[1]})
        run.metrics({"verdict_goal_met": float(bool(verdict.get("goal_met")))})
        for section, label in (("arms", ""), ("confirmation", "confirm:")):
            for name, arm in results.get(section, {}).items():
                child = _Run(client, experiment_id, f"{label}{name}",
                             {"ctr_ad.arm": name, "ctr_ad.role": str(arm.get("role")),
                              "ctr_ad.round": "confirmation" if label else "main", **cfg.tags}, parent=run.id)
                try:
                    config = arm.get("config", {})
                    child.params({"kind": arm.get("kind"), "role": arm.get("role"), **dict(flatten(config))})
                    child.metrics(arm_metrics(arm))
                finally:
                    child.finish()
        if cfg.log_artifacts:
            for name in ("results.json", "report.html", "report.md"):
                run.artifact(exp_dir / name)
            bundle = best_bundle(exp_dir, dict(results))
            if bundle is not None:
                run.artifact(bundle, "bundle")
        ok = True
    finally:
        run.finish(ok)
    logger.info(f"MLflow run {run.id} in experiment '{cfg.experiment}' at {uri}")
    return run.id
