"""Replicated experiments: every arm trained R times, accuracy and prediction difference (PD) measured.

An experiment config (YAML, every section ``extra=forbid``)::

    training: demo.yaml          # training config (path relative to this file) or an inline mapping
    set: {train.epochs: 3}       # dotted overrides applied to every model arm
    replicas: 3                  # R ≥ 2 (3+ for a report): replica r uses seed_init = seed_data = seed + r
    seed: 0
    top_fractions: [0.01, 0.1]   # ranking churn of the top 1 % and 10 % rows
    logloss_tolerance: 0.003     # best-arm rule (see select_best)
    arms:
      - {name: single, set: {model.components: 1}}
      - {name: plain-shared, set: {anti_distillation.data_order: shared}}
      - {name: logreg, kind: logreg, C: 1.0}
    grids:                       # penalties × lambdas × data_orders, named <name>-<penalty>-l<λ>-<order>
      - {name: ad, penalties: [output_decorrelation], lambdas: [0.1, 1.0], data_orders: [independent]}

Replicas of one arm differ only in their seeds; data, config and code are identical. Replica r of every
arm uses the same seeds, so arms are compared on common random numbers.

Layout of ``EXP_DIR``::

    experiment.yaml                  the resolved experiment config (arms expanded, training configs inline)
    arms/<arm>/r<r>/predictions.parquet   test rows: row, label, p (ensemble), p_k, z_k per component
    arms/<arm>/r<r>/metrics.json          accuracy + component metrics + wall time of the replica
    arms/<arm>/r<r>/done.json             marker: the replica finished with this config hash
    arms/<arm>/r<r>/run/                  the training run: bundle/ for model arms (its checkpoint is
                                          deleted once the replica is done), fit.json for logreg
    results.json                     per arm: mean ± std over replicas / replica pairs, resolved config

A rerun skips replicas whose ``done.json`` matches the current config hash and redoes the others.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import yaml
from pydantic import Field, field_validator, model_validator

from ctr_ad import metrics as M
from ctr_ad.artifacts import Verdict, data_fingerprint, write_document
from ctr_ad.config import set_dotted
from ctr_ad.dataset import verify_data_dir
from ctr_ad.errors import UserError
from ctr_ad.files import atomic_write_with, utc_timestamp
from ctr_ad.layout import DataDir, ExperimentDir
from ctr_ad.strict import StrictModel, load_yaml_mapping, validate_model

logger = logging.getLogger(__name__)

RESULTS = "results.json"
DONE = "done.json"
PREDICTIONS = "predictions.parquet"
AD_ROLE = "anti_distillation"


# --------------------------------------------------------------------------------------------- config
class ArmSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    kind: Literal["model", "logreg"] = "model"
    set: dict[str, Any] = Field(default_factory=dict, description="dotted training-config overrides")
    C: float = Field(1.0, gt=0.0, description="logreg: inverse L2 strength")
    max_iter: int = Field(300, ge=1, description="logreg: L-BFGS iterations")


class GridSpec(StrictModel):
    name: str = Field("ad", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    penalties: list[str] = Field(min_length=1)
    lambdas: list[float] = Field(min_length=1)
    data_orders: list[Literal["shared", "independent"]] = Field(default_factory=lambda: ["shared"])
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("lambdas")
    @classmethod
    def _positive(cls, lams: list[float]) -> list[float]:
        if any(lam <= 0 for lam in lams):
            raise ValueError("grid lambdas must be > 0 (λ = 0 is a plain arm)")
        return lams

    def expand(self) -> list[ArmSpec]:
        arms = []
        for penalty in self.penalties:
            for lam in self.lambdas:
                for order in self.data_orders:
                    short = {"shared": "shared", "independent": "indep"}[order]
                    arms.append(
                        ArmSpec(
                            name=f"{self.name}-{penalty}-l{lam:g}-{short}",
                            set={
                                **self.set,
                                "anti_distillation.penalty": penalty,
                                "anti_distillation.lambda": lam,
                                "anti_distillation.data_order": order,
                            },
                        )
                    )
        return arms


class ExperimentConfig(StrictModel):
    training: str | dict[str, Any] = Field(description="training config: YAML path or inline mapping")
    set: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(3, ge=2)
    seed: int = Field(0, ge=0)
    top_fractions: list[float] = Field(default_factory=lambda: list(M.DEFAULT_TOP_FRACTIONS))
    logloss_tolerance: float = Field(0.003, ge=0.0)
    pd_rel_goal: float = Field(0.5, gt=0.0, description="goal: pd_rel at most this × the baseline's")
    arms: list[ArmSpec] = Field(default_factory=list)
    grids: list[GridSpec] = Field(default_factory=list)

    @field_validator("top_fractions")
    @classmethod
    def _fractions(cls, fr: list[float]) -> list[float]:
        if not fr or any(not 0 < f <= 1 for f in fr):
            raise ValueError("top_fractions must be non-empty and in (0, 1]")
        return fr

    @model_validator(mode="after")
    def _unique_names(self) -> ExperimentConfig:
        names = [a.name for a in self.all_arms()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate arm names {dupes}")
        if not names:
            raise ValueError("no arms: give 'arms' and/or 'grids'")
        return self

    def all_arms(self) -> list[ArmSpec]:
        return [*self.arms, *(a for g in self.grids for a in g.expand())]


def load_experiment_config(source: str | Path | dict[str, Any], base_dir: Path | None = None) -> ExperimentConfig:
    """Validate an experiment config (a YAML path or a mapping); a relative ``training`` path is
    resolved against the file's directory (or ``base_dir``) and read, so the result is self-contained."""
    origin = "experiment config"
    if isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        origin = str(source)
        data = load_yaml_mapping(source, "experiment config")
        base_dir = base_dir or Path(source).parent
    cfg = validate_model(ExperimentConfig, data, origin)
    if isinstance(cfg.training, str):
        tpath = Path(cfg.training)
        if not tpath.is_absolute():
            tpath = (base_dir or Path.cwd()) / tpath
        if not tpath.is_file():
            raise UserError(f"{origin}: training config {tpath} not found")
        cfg = cfg.model_copy(update={"training": load_yaml_mapping(tpath, "training config")})
    for arm in cfg.all_arms():  # fail on a bad arm before anything trains
        if arm.kind == "model":
            arm_training_config(cfg, arm, 0)
    return cfg


def arm_training_config(cfg: ExperimentConfig, arm: ArmSpec, replica: int) -> Any:
    """The resolved ``ctr_ad.config.Config`` of one replica of a model arm."""
    from ctr_ad.config import Config

    assert isinstance(cfg.training, dict)
    data = set_dotted(copy.deepcopy(cfg.training), cfg.set)
    set_dotted(data, arm.set)
    seed = cfg.seed + replica
    set_dotted(data, {"train.seed_init": seed, "train.seed_data": seed, "train.progress": False})
    return Config.from_dict(data, origin=f"arm {arm.name}")


def arm_role(kind: str, config: dict[str, Any]) -> str:
    """linear | single | plain | anti_distillation."""
    if kind == "logreg":
        return "linear"
    if config["model"]["components"] == 1:
        return "single"
    ad = config["anti_distillation"]
    return AD_ROLE if ad["penalty"] != "none" and ad["lambda"] > 0 else "plain"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- replicas
def _replica_config(cfg: ExperimentConfig, arm: ArmSpec, replica: int) -> dict[str, Any]:
    if arm.kind == "logreg":
        return {"kind": "logreg", "C": arm.C, "max_iter": arm.max_iter, "seed": cfg.seed + replica}
    return arm_training_config(cfg, arm, replica).to_dict()


def _load_test(data_dir: Path) -> tuple[pl.DataFrame, Any]:
    from ctr_ad.features import FeatureProcessor

    features = FeatureProcessor.load(data_dir / "features.json")
    test_path = data_dir / "test.parquet"
    if not test_path.is_file():
        raise UserError(f"{test_path}: an experiment needs a labelled test split")
    return pl.read_parquet(test_path), features


def _train_model_replica(data_dir: Path, config: dict[str, Any], run_dir: Path, device: str | None) -> np.ndarray:
    """Train one replica; return its test logits [K, N] (from the best evaluation's weights)."""
    from ctr_ad.config import Config
    from ctr_ad.train import train

    result = train(data_dir, Config.from_dict(config), run_dir, device=device, progress=False, log=False)
    assert result.test is not None  # run_experiment checked that the split exists
    return result.test.logits


def _one_hot(frame: pl.DataFrame, features: Any) -> Any:
    """CSR matrix [one-hot of every categorical index ‖ dense features] of a model-ready frame."""
    from scipy import sparse

    cat_cols, dense_cols = features.categorical_columns, features.dense_columns
    n = frame.height
    offsets = np.concatenate([[0], np.cumsum(features.cardinalities)]).astype(np.int64)
    cat = frame.select(cat_cols).to_numpy().astype(np.int64) + offsets[:-1]
    dense = frame.select(dense_cols).to_numpy().astype(np.float64) if dense_cols else np.zeros((n, 0))
    n_cat = int(offsets[-1])
    dense_idx = np.broadcast_to(n_cat + np.arange(dense.shape[1]), (n, dense.shape[1]))
    cols = np.concatenate([cat, dense_idx], axis=1)
    vals = np.concatenate([np.ones_like(cat, dtype=np.float64), dense], axis=1)
    indptr = np.arange(0, n * cols.shape[1] + 1, cols.shape[1])
    return sparse.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=(n, n_cat + dense.shape[1]))


def _train_logreg_replica(data_dir: Path, config: dict[str, Any], run_dir: Path) -> np.ndarray:
    """Logistic regression on one-hot categoricals + dense features; rows shuffled by the replica seed.

    L-BFGS on a convex loss: once converged, replicas differ only by floating-point summation order
    (PD ≈ 0); an unconverged fit (``run/fit.json``: converged false) keeps a dependence on row order.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    test_frame, features = _load_test(data_dir)
    train_frame = pl.read_parquet(data_dir / "train.parquet")
    order = np.random.default_rng(config["seed"]).permutation(train_frame.height)
    train_frame = train_frame[order]
    model = LogisticRegression(C=config["C"], max_iter=config["max_iter"], solver="lbfgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(_one_hot(train_frame, features), train_frame["label"].to_numpy())
    run_dir.mkdir(parents=True, exist_ok=True)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    fit = {"iterations": int(model.n_iter_[0]), "converged": converged}
    (run_dir / "fit.json").write_text(json.dumps(fit))
    np.save(run_dir / "coef.npy", np.concatenate([model.intercept_, model.coef_.ravel()]))
    return model.decision_function(_one_hot(test_frame, features)).reshape(1, -1).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def ensemble_prob(logits: np.ndarray, mode: Literal["mean_prob", "mean_logit"] = "mean_prob") -> np.ndarray:
    """Ensemble probability [N] in float64 from component logits [K, N], by the model's own rule."""
    import torch

    from ctr_ad.model import ensemble_probability

    return ensemble_probability(torch.from_numpy(np.asarray(logits, dtype=np.float64)), mode).numpy()


def write_predictions(path: Path, labels: np.ndarray, logits: np.ndarray, prediction: str) -> pl.DataFrame:
    cols: dict[str, Any] = {
        "row": np.arange(labels.size, dtype=np.int32),
        "label": labels.astype(np.float32),
        "p": ensemble_prob(logits, prediction),
    }
    for k in range(logits.shape[0]):
        cols[f"p_{k}"] = _sigmoid(logits[k])
    for k in range(logits.shape[0]):
        cols[f"z_{k}"] = logits[k].astype(np.float32)
    frame = pl.DataFrame(cols)
    atomic_write_with(path, frame.write_parquet)
    return frame


def component_logits(frame: pl.DataFrame) -> np.ndarray:
    """[K, N] logits of a predictions frame."""
    names = sorted((c for c in frame.columns if c.startswith("z_")), key=lambda c: int(c[2:]))
    return frame.select(names).to_numpy().T.astype(np.float64)


def replica_metrics(frame: pl.DataFrame) -> dict[str, float]:
    y, p = frame["label"].to_numpy(), frame["p"].to_numpy()
    z = component_logits(frame)
    out = M.accuracy_metrics(y, p)
    out["component_corr"] = M.component_correlation(z) if z.shape[0] > 1 else math.nan
    out["component_spread"] = M.component_spread(_sigmoid(z))
    return out


def run_replica(
    data_dir: Path, exp_dir: Path, cfg: ExperimentConfig, arm: ArmSpec, replica: int, device: str | None
) -> tuple[dict[str, Any], bool]:
    """Train (or skip, when done with the same config) one replica; returns (its metrics, skipped)."""
    rdir = ExperimentDir(exp_dir).replica(arm.name, replica)
    config = _replica_config(cfg, arm, replica)
    key = _hash({"config": config, "data": data_fingerprint(data_dir)})
    if _is_done(exp_dir, cfg, arm, replica, data_dir):
        return json.loads(rdir.done.read_text())["metrics"], True
    if rdir.root.exists():
        shutil.rmtree(rdir.root)  # a partial or stale replica: start it again
    rdir.root.mkdir(parents=True)
    started = time.perf_counter()
    if arm.kind == "logreg":
        logits = _train_logreg_replica(data_dir, config, rdir.run.root)
        prediction = "mean_prob"
    else:
        logits = _train_model_replica(data_dir, config, rdir.run.root, device)
        prediction = config["model"]["prediction"]
    labels = pl.read_parquet(DataDir(data_dir).test, columns=["label"])["label"].to_numpy()
    frame = write_predictions(rdir.predictions, labels, logits, prediction)
    metrics = replica_metrics(frame)
    metrics["wall_s"] = time.perf_counter() - started
    # The training checkpoint only serves resuming an unfinished run; the bundle stays (publish, shadow).
    rdir.run.checkpoint.unlink(missing_ok=True)
    write_document(rdir.metrics, metrics)
    write_document(rdir.done, {"hash": key, "metrics": metrics, "config": config})
    return metrics, False


def _is_done(exp_dir: Path, cfg: ExperimentConfig, arm: ArmSpec, replica: int, data_dir: Path) -> bool:
    rdir = ExperimentDir(exp_dir).replica(arm.name, replica)
    if not rdir.done.is_file() or not rdir.predictions.is_file():
        return False
    key = _hash({"config": _replica_config(cfg, arm, replica), "data": data_fingerprint(data_dir)})
    return json.loads(rdir.done.read_text()).get("hash") == key


# --------------------------------------------------------------------------------------------- summaries
def summarise_arm(exp_dir: Path, cfg: ExperimentConfig, arm: ArmSpec) -> dict[str, Any]:
    """mean ± std over replicas (accuracy, components, wall time) and over replica pairs (PD)."""
    frames, per_replica = [], []
    for r in range(cfg.replicas):
        rdir = ExperimentDir(exp_dir).replica(arm.name, r)
        frames.append(pl.read_parquet(rdir.predictions))
        per_replica.append(json.loads(rdir.done.read_text())["metrics"])
    pairs = M.pairwise_pd([f["p"].to_numpy() for f in frames], cfg.top_fractions)
    config = _replica_config(cfg, arm, 0)
    if arm.kind == "model":
        config["train"].pop("seed_init")
        config["train"].pop("seed_data")
    else:
        config.pop("seed")
    acc_keys = ("logloss", "auc", "calibration", "ece")
    comp_keys = ("component_corr", "component_spread")
    summary = M.mean_std(per_replica)
    role = arm_role(arm.kind, config) if arm.kind == "model" else "linear"
    ad = config.get("anti_distillation", {})
    return {
        "kind": arm.kind,
        "role": role,
        "components": config["model"]["components"] if arm.kind == "model" else 1,
        "penalty": ad.get("penalty", "none"),
        "lambda": ad.get("lambda", 0.0),
        "data_order": ad.get("data_order", "shared") if arm.kind == "model" else "n/a",
        "activation": config["model"]["activation"] if arm.kind == "model" else "linear",
        "replicas": cfg.replicas,
        "accuracy": {k: summary[k] for k in acc_keys},
        "pd": M.mean_std(pairs),
        "component": {k: summary[k] for k in comp_keys},
        "wall_s": summary["wall_s"],
        "per_replica": per_replica,
        "pairs": pairs,
        "config": config,
    }


def select_baseline(arms: dict[str, dict[str, Any]], tolerance: float = 0.003) -> str | None:
    """The honest baseline: the best ensemble without anti-distillation (any data order).

    Among plain arms (K > 1, no penalty) whose mean test logloss is within (1 + tolerance) of the most
    accurate plain arm, the one with the lowest mean pd_rel — so a plain arm cannot become the
    baseline by being reproducibly worse.
    """
    plain = [n for n, a in arms.items() if a["role"] == "plain"]
    if not plain:
        return None
    limit = min(_logloss(arms[n]) for n in plain) * (1 + tolerance)
    ok = [n for n in plain if _logloss(arms[n]) <= limit + 1e-12]
    return min(ok, key=lambda n: arms[n]["pd"]["pd_rel"]["mean"])


def _logloss(arm: dict[str, Any]) -> float:
    return arm["accuracy"]["logloss"]["mean"]


def select_best(arms: dict[str, dict[str, Any]], tolerance: float) -> tuple[str | None, str]:
    """Best arm: the lowest mean pd_rel among the deep-model arms whose mean test logloss is at most
    (1 + tolerance) × the baseline's (:func:`select_baseline`). Returns (name, the rule in words)."""
    baseline = select_baseline(arms, tolerance)
    candidates = [n for n, a in arms.items() if a["kind"] == "model"]
    rule = (
        f"lowest mean pd_rel among deep-model arms whose mean test logloss ≤ (1 + {tolerance:g}) × that of "
        f"the baseline '{baseline}' (among plain ensembles — no anti-distillation, any data order — within "
        f"the same tolerance of the most accurate one, the one with the lowest pd_rel); "
        "the logistic regression is the reproducible reference, not a candidate"
    )
    if baseline is None:
        rule = "lowest mean pd_rel among deep-model arms (no plain ensemble to bound the logloss)"
        limit = math.inf
    else:
        limit = _logloss(arms[baseline]) * (1 + tolerance)
    ok = [n for n in candidates if _logloss(arms[n]) <= limit + 1e-12]
    if not ok:
        return None, rule
    return min(ok, key=lambda n: arms[n]["pd"]["pd_rel"]["mean"]), rule


def _ratio(arms: dict[str, dict[str, Any]], name: str, base: str, metric: str) -> float:
    value = _pd_rel(arms[name]) if metric == "pd_rel" else _logloss(arms[name])
    ref = _pd_rel(arms[base]) if metric == "pd_rel" else _logloss(arms[base])
    return value / ref if ref > 0 else math.nan


def _within_noise(arms: dict[str, dict[str, Any]], name: str, base: str) -> bool:
    """The pd_rel difference is at most the larger std over replica pairs: not distinguishable."""
    spread = max(arms[name]["pd"]["pd_rel"]["std"], arms[base]["pd"]["pd_rel"]["std"])
    return abs(_pd_rel(arms[name]) - _pd_rel(arms[base])) <= spread


def decide_verdict(arms: dict[str, dict[str, Any]], tolerance: float, goal: float) -> Verdict:
    """The experiment's answer, computed once and stored in results.json: the best arm (see
    :func:`select_best`) and, reported separately, the best anti-distillation arm within the logloss
    tolerance, each as pd_rel and logloss ratios to the baseline, against the goal
    (pd_rel ratio ≤ ``goal`` at logloss ratio ≤ 1 + ``tolerance``)."""
    best, rule = select_best(arms, tolerance)
    base = select_baseline(arms, tolerance)
    verdict = Verdict(best_arm=best, baseline_arm=base, rule=rule, logloss_tolerance=tolerance, pd_rel_goal=goal)
    if base is None:
        return verdict
    limit = 1 + tolerance + 1e-12
    if best is not None:
        verdict.pd_rel_ratio = _ratio(arms, best, base, "pd_rel")
        verdict.logloss_ratio = _ratio(arms, best, base, "logloss")
        verdict.within_noise = _within_noise(arms, best, base)
        verdict.goal_met = verdict.pd_rel_ratio <= goal and verdict.logloss_ratio <= limit
    ad = [n for n, a in arms.items() if a["role"] == AD_ROLE and _ratio(arms, n, base, "logloss") <= limit]
    if ad:
        pick = min(ad, key=lambda n: _pd_rel(arms[n]))
        verdict.ad_arm = pick
        verdict.ad_pd_rel_ratio = _ratio(arms, pick, base, "pd_rel")
        verdict.ad_logloss_ratio = _ratio(arms, pick, base, "logloss")
        verdict.ad_within_noise = _within_noise(arms, pick, base)
        verdict.ad_goal_met = verdict.ad_pd_rel_ratio <= goal
    return verdict


def _pd_rel(arm: dict[str, Any]) -> float:
    return arm["pd"]["pd_rel"]["mean"]


def environment() -> dict[str, Any]:
    import sklearn
    import torch

    import ctr_ad

    return {
        "ctr_ad": ctr_ad.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "polars": pl.__version__,
        "sklearn": sklearn.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def write_results(
    exp_dir: Path, data_dir: Path, cfg: ExperimentConfig, arms: dict[str, dict[str, Any]], run: dict[str, Any]
) -> dict[str, Any]:
    verdict = decide_verdict(arms, cfg.logloss_tolerance, cfg.pd_rel_goal)
    manifest_path = DataDir(data_dir).manifest
    results = {
        "format": 1,
        "data_dir": str(data_dir.resolve()),
        "manifest": json.loads(manifest_path.read_text()) if manifest_path.is_file() else None,
        "experiment": cfg.model_dump(mode="json"),
        "environment": environment(),
        "run": run,
        "baseline": verdict.baseline_arm,
        "best": verdict.best_arm,
        "best_rule": verdict.rule,
        "verdict": verdict.model_dump(mode="json"),
        "arms": arms,
    }
    write_document(ExperimentDir(exp_dir).results, results)
    # Read back as written: NaN became null, so callers see exactly what a script reading the file sees.
    return json.loads(ExperimentDir(exp_dir).results.read_text())


# --------------------------------------------------------------------------------------------- driver
def run_experiment(
    data_dir: str | Path,
    config: ExperimentConfig | str | Path,
    exp_dir: str | Path,
    *,
    only: Sequence[str] | None = None,
    device: str | None = None,
    train_missing: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every arm × replica and write ``results.json``; returns the results.

    ``train_missing=False`` trains nothing: it summarises the arms whose replicas are all finished
    (e.g. after workers ran disjoint ``only`` subsets in parallel) and leaves the others out.
    """
    data_dir, exp_dir = Path(data_dir), Path(exp_dir)
    cfg = config if isinstance(config, ExperimentConfig) else load_experiment_config(config)
    verify_data_dir(data_dir)
    if not (data_dir / "test.parquet").is_file():
        raise UserError(f"{data_dir / 'test.parquet'}: an experiment needs a labelled test split")
    arms = cfg.all_arms()
    if only:
        unknown = sorted(set(only) - {a.name for a in arms})
        if unknown:
            raise UserError(f"--arms: unknown arm(s) {unknown}; known: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in set(only)]
    exp_dir.mkdir(parents=True, exist_ok=True)
    ExperimentDir(exp_dir).config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    started_at = utc_timestamp()
    t0 = time.perf_counter()
    summaries: dict[str, dict[str, Any]] = {}
    trained = skipped = 0
    for i, arm in enumerate(arms, 1):
        arm_t0 = time.perf_counter()
        if not train_missing and not all(_is_done(exp_dir, cfg, arm, r, data_dir) for r in range(cfg.replicas)):
            logger.info(f"arm {i}/{len(arms)} {arm.name}: unfinished replicas, left out")
            continue
        for r in range(cfg.replicas):
            metrics, was_skipped = run_replica(data_dir, exp_dir, cfg, arm, r, device)
            skipped += was_skipped
            trained += not was_skipped
            state = "skipped (done)" if was_skipped else f"{metrics['wall_s']:.1f}s"
            logger.info(
                f"arm {i}/{len(arms)} {arm.name}: replica {r + 1}/{cfg.replicas} {state}, "
                f"test logloss {metrics['logloss']:.5f} auc {metrics['auc']:.4f}"
            )
        summaries[arm.name] = summarise_arm(exp_dir, cfg, arm)
        s = summaries[arm.name]
        logger.info(
            f"arm {i}/{len(arms)} {arm.name}: logloss {s['accuracy']['logloss']['mean']:.5f} "
            f"pd_rel {s['pd']['pd_rel']['mean']:.4f} ± {s['pd']['pd_rel']['std']:.4f} "
            f"({time.perf_counter() - arm_t0:.1f}s)"
        )
        run = {
            "started_at": started_at,
            "wall_s": time.perf_counter() - t0,
            "trained": trained,
            "skipped": skipped,
        }
        write_results(exp_dir, data_dir, cfg, summaries, run)
    if not summaries:
        raise UserError(f"{exp_dir}: no finished arm to summarise")
    run = {"started_at": started_at, "wall_s": time.perf_counter() - t0, "trained": trained, "skipped": skipped}
    run["finished_at"] = utc_timestamp()
    results = write_results(exp_dir, data_dir, cfg, summaries, run)
    logger.info(f"done: {trained} trained, {skipped} skipped, {run['wall_s']:.1f}s; best arm {results['best']}")
    return results


def load_results(exp_dir: str | Path) -> dict[str, Any]:
    path = ExperimentDir(Path(exp_dir)).results
    if not path.is_file():
        raise UserError(f"{path}: not found (run `ctr-ad experiment` first)")
    return json.loads(path.read_text())


def best_bundle(exp_dir: str | Path, results: dict[str, Any] | None = None) -> Path | None:
    """Bundle of replica 0 of the best arm (None when no deep arm qualifies)."""
    results = results or load_results(exp_dir)
    if not results.get("best"):
        return None
    path = ExperimentDir(Path(exp_dir)).replica(results["best"], 0).run.bundle
    return path if path.is_dir() else None
