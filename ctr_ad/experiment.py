"""Replicated experiments: every arm trained R times, accuracy and prediction difference (PD) measured.

An experiment config (YAML, every section ``extra=forbid``)::

    training: demo.yaml          # training config (path relative to this file) or an inline mapping
    set: {train.epochs: 3}       # dotted overrides applied to every model arm
    replicas: 3                  # R ≥ 2 (3+ for a report): replica r uses seed_init = seed_data = seed + r
    seed: 0
    top_fractions: [0.01, 0.1]   # ranking churn of the top 1 % and 10 % rows
    logloss_tolerance: 0.003     # best-arm rule (see select_best) and the goal's logloss condition
    selection_logloss_tolerance: 0.0015  # optional: choose on validation with a margin (default: as above)
    arms:
      - {name: single, set: {model.components: 1}}
      - {name: plain-shared, set: {anti_distillation.data_order: shared}}
      - {name: logreg, kind: logreg, C: 1.0}
      - {name: k8-narrow, role: recipe, set: {model.components: 8, model.embedding_dim: 4, model.mlp: [54, 27]}}
                                 # role: a lever the config does not show (`ctr-ad capacity` sizes it)
    grids:                       # penalties × lambdas × data_orders, named <name>-<penalty>-l<λ>-<order>
      - {name: ad, penalties: [output_decorrelation], lambdas: [0.1, 1.0], data_orders: [independent]}
    sweeps:                      # any training keys × values, named <name>-<label><value>[-<label><value>…]
      - {name: smelu, values: {model.smelu_beta: [0.1, 1, 10]}, labels: {model.smelu_beta: beta},
         set: {model.activation: smelu}}            # → smelu-beta0.1, smelu-beta1, smelu-beta10
    tracking: {experiment: ctr-ad}   # optional: log params, per-arm metrics, verdict, artifacts to MLflow

Replicas of one arm differ only in their seeds; data, config and code are identical. Replica r of every
arm uses the same seeds, so arms are compared on common random numbers.

Layout of ``EXP_DIR``::

    experiment.yaml                  the resolved experiment config (arms expanded, training configs inline)
    arms/<arm>/r<r>/predictions.parquet   test rows: row, label, p (ensemble), p_k, z_k per component
    arms/<arm>/r<r>/metrics.json          accuracy + component metrics + wall time of the replica
    arms/<arm>/r<r>/done.json             marker: the replica finished with this config hash
    arms/<arm>/r<r>/run/                  the training run: bundle/ for model arms (its checkpoint is
                                          deleted once the replica is done), fit.json for logreg
    anchor-cache/anchor-<data>-C<C>.npz   the linear anchor's fit, shared by the worker processes
    results.json                     per arm: mean ± std over replicas / replica pairs, resolved config

A rerun skips replicas whose ``done.json`` matches the current config hash and redoes the others.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import yaml
from pydantic import Field, field_validator, model_validator
from scipy.special import expit

from ctr_ad import metrics as M
from ctr_ad.artifacts import data_fingerprint, write_document
from ctr_ad.config import set_dotted
from ctr_ad.dataset import verify_data_dir
from ctr_ad.errors import UserError
from ctr_ad.files import atomic_write_with, utc_timestamp
from ctr_ad.layout import DataDir, ExperimentDir
from ctr_ad.protocol import AD_ROLE, decide_verdict
from ctr_ad.strict import StrictModel, load_yaml_mapping, validate_model
from ctr_ad.tracking import TrackingConfig

logger = logging.getLogger(__name__)

RESULTS = "results.json"
DONE = "done.json"
PREDICTIONS = "predictions.parquet"


# --------------------------------------------------------------------------------------------- config
ARM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
SweepValue = bool | int | float | str


class ArmSpec(StrictModel):
    name: str = Field(pattern=ARM_NAME)
    kind: Literal["model", "logreg"] = "model"
    set: dict[str, Any] = Field(default_factory=dict, description="dotted training-config overrides")
    C: float | None = Field(None, gt=0.0, description="logreg: inverse L2 strength (None: chosen on validation)")
    max_iter: int = Field(1000, ge=1, description="logreg: L-BFGS iterations")
    seed_offset: int = Field(0, ge=0, description="added to every replica's seed (fresh seeds of a confirmation)")
    role: Literal["plain", "recipe"] | None = Field(
        None, description="the arm's role in the protocol (None: inferred from its config by arm_role); 'recipe' "
        "for a lever the config alone does not show, such as K' narrower components at the baseline's size; "
        "'plain' for a baseline that shares a setting every arm of the study has (a fixed length, no selection)"
    )


class GridSpec(StrictModel):
    name: str = Field("ad", pattern=ARM_NAME)
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


class SweepSpec(StrictModel):
    """Arms over the product of training-key values, e.g. ``{model.smelu_beta: [0.1, 1, 10]}``.

    The arm of values (v₁, v₂, …) is named ``<name>-<label₁><v₁>-<label₂><v₂>…``; a key's label is
    ``labels[key]``, or its last part (``smelu_beta``)."""

    name: str = Field(pattern=ARM_NAME)
    values: dict[str, list[SweepValue]] = Field(min_length=1, description="dotted training key → values")
    labels: dict[str, str] = Field(default_factory=dict, description="dotted key → short label in arm names")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides shared by every arm")
    role: Literal["plain", "recipe"] | None = Field(None, description="as ArmSpec.role, for every arm")

    @model_validator(mode="after")
    def _axes(self) -> SweepSpec:
        empty = sorted(k for k, v in self.values.items() if not v)
        if empty:
            raise ValueError(f"values of {empty} must not be empty")
        stray = sorted(set(self.labels) - set(self.values))
        if stray:
            raise ValueError(f"labels {stray} name no key of values")
        return self

    def label(self, key: str) -> str:
        return self.labels.get(key, key.rsplit(".", 1)[-1])

    def expand(self) -> list[ArmSpec]:
        keys = list(self.values)
        arms = []
        for combo in itertools.product(*(self.values[k] for k in keys)):
            parts = [f"{self.label(k)}{_value_text(v)}" for k, v in zip(keys, combo, strict=True)]
            name = "-".join([self.name, *parts])
            if not re.match(ARM_NAME, name):
                raise ValueError(f"sweep {self.name!r}: arm name {name!r} is not a valid name (labels and values "
                                 "may use letters, digits and _.+-)")
            arms.append(ArmSpec(name=name, set={**self.set, **dict(zip(keys, combo, strict=True))}, role=self.role))
        return arms


def _value_text(value: SweepValue) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class ExperimentConfig(StrictModel):
    training: str | dict[str, Any] = Field(description="training config: YAML path or inline mapping")
    set: dict[str, Any] = Field(default_factory=dict)
    replicas: int = Field(3, ge=2)
    seed: int = Field(0, ge=0)
    top_fractions: list[float] = Field(default_factory=lambda: list(M.DEFAULT_TOP_FRACTIONS))
    logloss_tolerance: float = Field(0.003, ge=0.0)
    selection_logloss_tolerance: float | None = Field(
        None, ge=0.0, description="the logloss tolerance the arms are chosen with on validation rows (None = "
        "logloss_tolerance). Smaller than logloss_tolerance leaves a margin: the arm chosen at the edge of the "
        "tolerance on validation tends to land just outside it on fresh test rows (winner's curse)"
    )
    pd_rel_goal: float = Field(0.5, gt=0.0, description="goal: pd_rel at most this × the baseline's")
    confirm: bool = Field(True, description="retrain the chosen arms and the baseline with fresh seeds")
    confirm_replicas: int | None = Field(None, ge=2, description="replicas of the confirmation round (None = replicas)")
    confirm_seed_offset: int = Field(
        1000, ge=1, description="added to the confirmation round's replica seeds; change it when the default "
        "seeds were already looked at (a probe on them chose the arms), so the confirmation stays fresh"
    )
    workers: int | None = Field(None, ge=1, description="replicas trained at once, one torch thread each (None = CPUs)")
    arms: list[ArmSpec] = Field(default_factory=list)
    grids: list[GridSpec] = Field(default_factory=list)
    sweeps: list[SweepSpec] = Field(default_factory=list)
    tracking: TrackingConfig | None = Field(None, description="log the experiment to MLflow (ctr_ad.tracking)")

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
        main_seeds = max(a.seed_offset for a in self.all_arms()) + self.replicas
        if self.confirm and self.confirm_seed_offset < main_seeds:
            raise ValueError(f"confirm_seed_offset {self.confirm_seed_offset} reuses the main round's seeds "
                             f"(up to {main_seeds - 1}): the confirmation needs fresh ones")
        return self

    def all_arms(self) -> list[ArmSpec]:
        return [*self.arms, *(a for g in self.grids for a in g.expand()), *(a for w in self.sweeps for a in w.expand())]


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
    seed = cfg.seed + arm.seed_offset + replica
    set_dotted(data, {"train.seed_init": seed, "train.seed_data": seed, "train.progress": False})
    return Config.from_dict(data, origin=f"arm {arm.name}")


def arm_role(kind: str, config: dict[str, Any]) -> str:
    """linear | single | plain | anti_distillation | recipe.

    ``recipe``: an ensemble with a reproducibility lever other than a penalty (weight averaging, a linear
    anchor, no best-step selection, one embedding table shared by the components, the smooth SmeLU
    activation). Such arms are candidates, never the plain baseline they are measured against. A lever
    the config cannot show (K' narrower components sized to the baseline's parameter count) is named
    by the arm's ``role``."""
    if kind == "logreg":
        return "linear"
    if config["model"]["components"] == 1:
        return "single"
    ad = config["anti_distillation"]
    if ad["penalty"] != "none" and ad["lambda"] > 0:
        return AD_ROLE
    train, model = config["train"], config["model"]
    levers = (model.get("anchor", "none") != "none" or model.get("share_embeddings", False)
              or train.get("weight_averaging_epochs", 0) > 0
              or train.get("best_step_selection", "ensemble") != "ensemble" or ad.get("forward_penalty_batch")
              or model.get("activation", "relu") == "smelu")
    return "recipe" if levers else "plain"


def role_of(arm: ArmSpec, config: dict[str, Any]) -> str:
    """The arm's role in the protocol: its stated ``role``, else what its resolved config shows."""
    if arm.kind == "logreg":
        return "linear"
    return arm.role or arm_role(arm.kind, config)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- replicas
def _replica_config(cfg: ExperimentConfig, arm: ArmSpec, replica: int) -> dict[str, Any]:
    if arm.kind == "logreg":
        return {"kind": "logreg", "C": arm.C, "max_iter": arm.max_iter, "seed": cfg.seed + arm.seed_offset + replica}
    return arm_training_config(cfg, arm, replica).to_dict()


def _load_test(data_dir: Path) -> tuple[pl.DataFrame, Any]:
    from ctr_ad.features import FeatureProcessor

    features = FeatureProcessor.load(data_dir / "features.json")
    test_path = data_dir / "test.parquet"
    if not test_path.is_file():
        raise UserError(f"{test_path}: an experiment needs a labelled test split")
    return pl.read_parquet(test_path), features


def _train_model_replica(
    data_dir: Path, config: dict[str, Any], run_dir: Path, device: str | None, anchor_cache: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Train one replica; return its (test, validation) logits [K, N] from the weights it keeps."""
    from ctr_ad.config import Config
    from ctr_ad.train import train

    result = train(data_dir, Config.from_dict(config), run_dir, device=device, progress=False, log=False,
                   anchor_cache=anchor_cache)
    assert result.test is not None and result.valid is not None  # run_experiment checked the splits
    return result.test.logits, result.valid.logits


def _train_logreg_replica(data_dir: Path, config: dict[str, Any], run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on one-hot categoricals + dense features; rows shuffled by the replica seed.

    L-BFGS on a convex loss: once converged, replicas differ only by floating-point summation order
    (PD ≈ 0); an unconverged fit (``run/fit.json``: converged false) keeps a dependence on row order.
    ``C`` None is chosen on the validation split.
    """
    from ctr_ad.linear import fit_linear, one_hot

    test_frame, features = _load_test(data_dir)
    layout = DataDir(data_dir)
    train_frame = pl.read_parquet(layout.train)
    valid_frame = pl.read_parquet(layout.valid)
    train_frame = train_frame[np.random.default_rng(config["seed"]).permutation(train_frame.height)]
    fit = fit_linear(train_frame, valid_frame, features, config["C"], config["max_iter"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_document(run_dir / "fit.json", fit.record())
    test = fit.decision(one_hot(test_frame, features)).reshape(1, -1).astype(np.float32)
    return test, fit.decision(one_hot(valid_frame, features)).reshape(1, -1).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # expit, not 1 / (1 + exp(-z)): a diverging arm's logit below -710 overflows exp and warns.
    return expit(np.asarray(z, dtype=np.float64))


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


def replica_metrics(frame: pl.DataFrame, valid: pl.DataFrame) -> dict[str, float]:
    y, p = frame["label"].to_numpy(), frame["p"].to_numpy()
    z = component_logits(frame)
    out = M.accuracy_metrics(y, p)
    out["component_corr"] = M.component_correlation(z) if z.shape[0] > 1 else math.nan
    out["component_spread"] = M.component_spread(_sigmoid(z))
    out["valid_logloss"] = M.logloss(valid["label"].to_numpy(), valid["p"].to_numpy())
    out["valid_auc"] = M.auc(valid["label"].to_numpy(), valid["p"].to_numpy())
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
        logits, valid_logits = _train_logreg_replica(data_dir, config, rdir.run.root)
        prediction = "mean_prob"
    else:
        logits, valid_logits = _train_model_replica(data_dir, config, rdir.run.root, device,
                                                    ExperimentDir(exp_dir).anchor_cache)
        prediction = config["model"]["prediction"]
    label = {s: pl.read_parquet(DataDir(data_dir).split(s), columns=["label"])["label"].to_numpy()
             for s in ("test", "valid")}
    frame = write_predictions(rdir.predictions, label["test"], logits, prediction)
    valid = write_predictions(rdir.valid_predictions, label["valid"], valid_logits, prediction)
    metrics = replica_metrics(frame, valid)
    metrics["wall_s"] = time.perf_counter() - started
    # The training checkpoint only serves resuming an unfinished run; the bundle stays (publish, shadow).
    rdir.run.checkpoint.unlink(missing_ok=True)
    write_document(rdir.metrics, metrics)
    write_document(rdir.done, {"hash": key, "metrics": metrics, "config": config})
    return metrics, False


def _is_done(exp_dir: Path, cfg: ExperimentConfig, arm: ArmSpec, replica: int, data_dir: Path) -> bool:
    rdir = ExperimentDir(exp_dir).replica(arm.name, replica)
    if not rdir.done.is_file() or not rdir.predictions.is_file() or not rdir.valid_predictions.is_file():
        return False
    key = _hash({"config": _replica_config(cfg, arm, replica), "data": data_fingerprint(data_dir)})
    return json.loads(rdir.done.read_text()).get("hash") == key


# --------------------------------------------------------------------------------------------- summaries
def summarise_arm(exp_dir: Path, cfg: ExperimentConfig, arm: ArmSpec, replicas: int | None = None) -> dict[str, Any]:
    """mean ± std over replicas (accuracy, components, wall time) and over replica pairs (PD)."""
    frames, valid_frames, per_replica = [], [], []
    for r in range(replicas or cfg.replicas):
        rdir = ExperimentDir(exp_dir).replica(arm.name, r)
        frames.append(pl.read_parquet(rdir.predictions))
        valid_frames.append(pl.read_parquet(rdir.valid_predictions))
        per_replica.append(json.loads(rdir.done.read_text())["metrics"])
    pairs = M.pairwise_pd([f["p"].to_numpy() for f in frames], cfg.top_fractions)
    valid_pairs = M.pairwise_pd([f["p"].to_numpy() for f in valid_frames], cfg.top_fractions)
    config = _replica_config(cfg, arm, 0)
    if arm.kind == "model":
        config["train"].pop("seed_init")
        config["train"].pop("seed_data")
    else:
        config.pop("seed")
    acc_keys = ("logloss", "auc", "calibration", "ece")
    comp_keys = ("component_corr", "component_spread")
    summary = M.mean_std(per_replica)
    role = role_of(arm, config)
    ad = config.get("anti_distillation", {})
    return {
        "kind": arm.kind,
        "role": role,
        "components": config["model"]["components"] if arm.kind == "model" else 1,
        "penalty": ad.get("penalty", "none"),
        "lambda": ad.get("lambda", 0.0),
        "data_order": ad.get("data_order", "shared") if arm.kind == "model" else "n/a",
        "activation": config["model"]["activation"] if arm.kind == "model" else "linear",
        "replicas": len(frames),
        "accuracy": {k: summary[k] for k in acc_keys},
        "pd": M.mean_std(pairs),
        "valid": {
            "accuracy": {"logloss": summary["valid_logloss"], "auc": summary["valid_auc"]},
            "pd": M.mean_std(valid_pairs),
        },
        "component": {k: summary[k] for k in comp_keys},
        "wall_s": summary["wall_s"],
        "per_replica": per_replica,
        "pairs": pairs,
        "config": config,
    }


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
    exp_dir: Path, data_dir: Path, cfg: ExperimentConfig, arms: dict[str, dict[str, Any]], run: dict[str, Any],
    confirmation: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    exp = ExperimentDir(exp_dir)
    stated = confirmation or arms
    probs = {name: _test_probs(exp, name if not confirmation else _confirm_name(name), a["replicas"])
             for name, a in stated.items() if a["kind"] == "model"}
    verdict = decide_verdict(arms, cfg.logloss_tolerance, cfg.pd_rel_goal, probs, confirmation, seed=cfg.seed,
                             select_tolerance=cfg.selection_logloss_tolerance)
    manifest_path = DataDir(data_dir).manifest
    results = {
        "format": 2,
        "data_dir": str(data_dir.resolve()),
        "manifest": json.loads(manifest_path.read_text()) if manifest_path.is_file() else None,
        "experiment": cfg.model_dump(mode="json"),
        "environment": environment(),
        "run": run,
        "baseline": verdict.baseline_arm,
        "best": verdict.recipe_arm,
        "best_rule": verdict.rule,
        "verdict": verdict.model_dump(mode="json"),
        "arms": arms,
        "confirmation": confirmation or {},
    }
    write_document(exp.results, results)
    # Read back as written: NaN became null, so callers see exactly what a script reading the file sees.
    return json.loads(exp.results.read_text())


def _test_probs(exp: ExperimentDir, arm: str, replicas: int) -> list[np.ndarray]:
    return [pl.read_parquet(exp.replica(arm, r).predictions, columns=["p"])["p"].to_numpy() for r in range(replicas)]


CONFIRM_SUFFIX = ".confirm"
CONFIRM_SEED_OFFSET = ExperimentConfig.model_fields["confirm_seed_offset"].default


def _confirm_name(arm: str) -> str:
    return arm + CONFIRM_SUFFIX


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _replica_task(args: tuple[Any, ...]) -> tuple[str, int, dict[str, Any], bool]:
    """One replica in a worker process (one torch thread: the workers share the cores)."""
    import torch

    data_dir, exp_dir, cfg, arm, replica, device = args
    os.environ["CTR_AD_THREADS"] = "1"  # the trainer's own choice would oversubscribe the shared cores
    torch.set_num_threads(1)
    metrics, skipped = run_replica(data_dir, exp_dir, cfg, arm, replica, device)
    return arm.name, replica, metrics, skipped


def _run_replicas(
    data_dir: Path, exp_dir: Path, cfg: ExperimentConfig, arms: list[ArmSpec], replicas: int,
    device: str | None, counts: dict[str, int],
) -> None:
    """Train every (arm, replica) not yet done, ``cfg.workers`` at a time (default: the available CPUs).

    Replicas are pure functions of their config and seeds, so running them in parallel changes nothing
    but the wall time."""
    todo = []
    for a in arms:
        for r in range(replicas):
            if _is_done(exp_dir, cfg, a, r, data_dir):
                logger.info(f"{a.name}: replica {r + 1}/{replicas} skipped (done)")
                counts["skipped"] += 1
            else:
                todo.append((a, r))
    workers = min(cfg.workers or _available_cpus(), max(len(todo), 1))
    if device not in (None, "cpu") or workers <= 1:
        for arm, r in todo:
            metrics, _ = run_replica(data_dir, exp_dir, cfg, arm, r, device)
            _log_replica(arm.name, r, replicas, metrics)
            counts["trained"] += 1
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from ctr_ad.ingest.lifecycle import die_with_parent

    tasks = [(data_dir, exp_dir, cfg, arm, r, device) for arm, r in todo]
    # Workers die with the experiment (kill -9 included) instead of training on as orphans.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        for name, r, metrics, _ in pool.map(_replica_task, tasks):
            _log_replica(name, r, replicas, metrics)
            counts["trained"] += 1


def _log_replica(name: str, r: int, replicas: int, metrics: dict[str, Any]) -> None:
    logger.info(f"{name}: replica {r + 1}/{replicas} {metrics['wall_s']:.1f}s, test logloss "
                f"{metrics['logloss']:.5f} auc {metrics['auc']:.4f}")


def _log_arm(name: str, s: dict[str, Any]) -> None:
    v = s["valid"]
    logger.info(f"{name}: valid logloss {v['accuracy']['logloss']['mean']:.5f} pd_rel {v['pd']['pd_rel']['mean']:.4f}"
                f" | test logloss {s['accuracy']['logloss']['mean']:.5f} pd_rel {s['pd']['pd_rel']['mean']:.4f}")


def _confirmation_arms(cfg: ExperimentConfig, arms: dict[str, dict[str, Any]]) -> list[ArmSpec]:
    """Fresh-seed copies of the arms the verdict rests on: the recipe, the best AD arm, the baseline."""
    chosen = decide_verdict(arms, cfg.logloss_tolerance, cfg.pd_rel_goal,
                            select_tolerance=cfg.selection_logloss_tolerance)
    names = [n for n in (chosen.baseline_arm, chosen.recipe_arm, chosen.ad_arm) if n]
    by_name = {a.name: a for a in cfg.all_arms()}
    return [by_name[n].model_copy(update={"name": _confirm_name(n), "seed_offset": cfg.confirm_seed_offset})
            for n in dict.fromkeys(names)]


def run_experiment(
    data_dir: str | Path,
    config: ExperimentConfig | str | Path,
    exp_dir: str | Path,
    *,
    only: Sequence[str] | None = None,
    device: str | None = None,
    train_missing: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every arm × replica, then the confirmation round; write ``results.json``.

    ``train_missing=False`` trains nothing: it summarises the arms whose replicas are all finished
    (e.g. after workers ran disjoint ``only`` subsets in parallel) and leaves the others out.
    """
    data_dir, exp_dir = Path(data_dir), Path(exp_dir)
    cfg = config if isinstance(config, ExperimentConfig) else load_experiment_config(config)
    verify_data_dir(data_dir)
    for split in ("valid", "test"):
        if not DataDir(data_dir).split(split).is_file():
            raise UserError(f"{DataDir(data_dir).split(split)}: an experiment needs a labelled {split} split")
    arms = cfg.all_arms()
    if only:
        unknown = sorted(set(only) - {a.name for a in arms})
        if unknown:
            raise UserError(f"--arms: unknown arm(s) {unknown}; known: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in set(only)]
    exp_dir.mkdir(parents=True, exist_ok=True)
    ExperimentDir(exp_dir).config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    run: dict[str, Any] = {"started_at": utc_timestamp()}
    t0 = time.perf_counter()
    counts = {"trained": 0, "skipped": 0}
    if train_missing:
        _run_replicas(data_dir, exp_dir, cfg, arms, cfg.replicas, device, counts)
    done = [a for a in arms if all(_is_done(exp_dir, cfg, a, r, data_dir) for r in range(cfg.replicas))]
    if not done:
        raise UserError(f"{exp_dir}: no finished arm to summarise")
    summaries = {a.name: summarise_arm(exp_dir, cfg, a) for a in done}
    for name, s in summaries.items():
        _log_arm(name, s)
    confirmation: dict[str, dict[str, Any]] = {}
    if cfg.confirm and not only:
        r_confirm = cfg.confirm_replicas or cfg.replicas
        confirm_arms = _confirmation_arms(cfg, summaries)
        if train_missing:
            logger.info(f"confirmation round: {[a.name for a in confirm_arms]} with {r_confirm} fresh seeds each")
            _run_replicas(data_dir, exp_dir, cfg, confirm_arms, r_confirm, device, counts)
        for a in confirm_arms:
            if all(_is_done(exp_dir, cfg, a, r, data_dir) for r in range(r_confirm)):
                confirmation[a.name.removesuffix(CONFIRM_SUFFIX)] = summarise_arm(exp_dir, cfg, a, r_confirm)
    run.update(counts, wall_s=time.perf_counter() - t0, finished_at=utc_timestamp())
    results = write_results(exp_dir, data_dir, cfg, summaries, run, confirmation or None)
    v = results["verdict"]
    ratio = "n/a" if v["pd_rel_ratio"] is None else f"{v['pd_rel_ratio']:.3f}"
    ci = "" if not v["pd_rel_ratio_ci"] else " [{:.3f}, {:.3f}]".format(*v["pd_rel_ratio_ci"])
    logger.info(f"done: {counts['trained']} trained, {counts['skipped']} skipped, {run['wall_s']:.1f}s; recipe arm "
                f"{v['recipe_arm']}: pd_rel × {ratio}{ci} ({v['call']}) vs {v['baseline_arm']}")
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
