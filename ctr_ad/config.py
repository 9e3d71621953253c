"""Training configuration: pydantic models loaded from YAML, overridable with ``--set key.sub=value``.

Every section forbids unknown keys, so a typo (``embeding_dim``) is an error naming the key instead of
a silently ignored setting. Load with :func:`load_config`; the resolved config is stored in every run
and bundle (``config.to_dict()``), so a bundle always says exactly how it was trained.

YAML layout (all sections optional, defaults below)::

    model:             {components, embedding_dim, mlp, dropout, activation, smelu_beta, prediction,
                        anchor, anchor_C, hash_buckets, share_embeddings}
    anti_distillation: {penalty, lambda, warmup_steps, data_order, penalty_batch_size, signed, eps}
    train:             {batch_size, epochs, lr, embedding_lr, embedding_optimizer, ...}
    data:              {loader, eval_batch_size, stream_buffer_rows, prefetch_batches}
    tracking:          {experiment, uri, run_name, log_artifacts, tags}   (optional: MLflow, ctr_ad.tracking)

The defaults are the reproducibility recipe confirmed under the experiment protocol (docs/experiments.md,
"Reproducibility v2"): independent data orders, a frozen logistic-regression anchor, weight averaging
over one epoch and no best-step selection at a fixed length of 2 epochs. Experiment configs state the
plain baseline's settings explicitly (``model.anchor: none`` etc.) rather than relying on defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from ctr_ad.errors import UserError
from ctr_ad.strict import StrictModel, describe_validation_error, load_yaml_mapping, validate_model
from ctr_ad.tracking import TrackingConfig

__all__ = ["Config", "describe_validation_error", "load_config", "set_dotted"]

DEFAULT_STRENGTH = 0.1  # λ when a penalty is named without one (gradient-ratio scale)

# Every section shares the one strict base (unknown keys are errors naming the key).
_Section = StrictModel


class ModelConfig(_Section):
    components: int = Field(4, ge=1, description="K, the number of ensemble components (1 = single model)")
    embedding_dim: int = Field(8, ge=1)
    mlp: list[int] = Field(default_factory=lambda: [64, 32], description="hidden widths; [] = linear head")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "smelu"] = "relu"
    smelu_beta: float = Field(1.0, gt=0.0, description="SmeLU half-width β")
    prediction: Literal["mean_prob", "mean_logit"] = "mean_prob"
    anchor: Literal["none", "logreg"] = Field(
        "logreg", description="logreg: z_k = z_linear + h_k, a converged logistic regression fitted first and frozen"
    )
    anchor_C: float | None = Field(None, gt=0.0, description="the anchor's inverse L2 (None: chosen on valid)")
    hash_buckets: int | dict[str, int] | None = Field(
        None,
        description="bound the embedding tables: a field with more vocabulary entries than N keeps its missing "
        "and out-of-vocabulary rows and hashes the others into N rows; one N for every field, or {field: N} "
        "for the fields named (None: every vocabulary entry has its own row)",
    )
    share_embeddings: bool = Field(
        False, description="one embedding table shared by the K components (K-fold less table memory); the "
        "MLP towers stay separate"
    )

    @field_validator("hash_buckets")
    @classmethod
    def _positive_buckets(cls, buckets: int | dict[str, int] | None) -> int | dict[str, int] | None:
        values = buckets.values() if isinstance(buckets, dict) else [] if buckets is None else [buckets]
        if any(n < 1 for n in values):
            raise ValueError("every hash bucket count must be >= 1")
        return buckets

    def hash_buckets_for(self, fields: list[str]) -> list[int | None]:
        """The bucket count of each categorical field, in model order (None: not hashed); UserError
        for a field name the data does not have."""
        if self.hash_buckets is None:
            return [None] * len(fields)
        if isinstance(self.hash_buckets, int):
            return [self.hash_buckets] * len(fields)
        unknown = sorted(set(self.hash_buckets) - set(fields))
        if unknown:
            raise UserError(f"model.hash_buckets: unknown categorical field(s) {unknown}; the data has {fields}")
        return [self.hash_buckets.get(f) for f in fields]

    @field_validator("mlp")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(w < 1 for w in widths):
            raise ValueError("every MLP width must be >= 1")
        return widths


class AntiDistillationConfig(_Section):
    penalty: str = Field("none", description="'none' or a name in ctr_ad.penalties.PENALTIES")
    lam: float = Field(0.0, ge=0.0, alias="lambda", description="penalty weight λ (0 = plain ensemble)")
    warmup_steps: int = Field(0, ge=0, description="λ grows linearly from 0 over this many steps")
    data_order: Literal["shared", "independent"] = "independent"
    # With independent orders each step also draws one shared batch that every component sees; the
    # penalty is computed there (correlations between components need common rows). None = batch_size.
    penalty_batch_size: int | None = Field(None, ge=2)
    signed: bool = Field(False, description="output/deviation decorrelation: mean corr instead of corr²")
    eps: float = Field(1e-6, gt=0.0, description="floor added to variances before normalising")
    lambda_scale: Literal["absolute", "gradient_ratio"] = Field(
        "absolute",
        description="gradient_ratio: λ is the target ratio ‖∂(λ·penalty)/∂z‖ / ‖∂BCE/∂z‖, so one grid serves "
        "every penalty",
    )
    forward_penalty_batch: bool = Field(
        False, description="forward the shared penalty batch even at λ = 0 (the control arm of a penalty)"
    )

    @field_validator("penalty")
    @classmethod
    def _known_penalty(cls, name: str) -> str:
        from ctr_ad.penalties import available_penalties

        known = available_penalties()
        if name != "none" and name not in known:
            raise ValueError(f"unknown penalty {name!r}; choose 'none' or one of {sorted(known)}")
        return name

    @model_validator(mode="before")
    @classmethod
    def _documented_strength(cls, data: Any) -> Any:
        """Naming a penalty alone switches it on at the documented strength (docs/experiments.md):
        λ = 0.1 on the gradient-ratio scale, i.e. the penalty's gradient is a tenth of the BCE's."""
        if isinstance(data, dict) and data.get("penalty", "none") != "none" and not {"lambda", "lam"} & data.keys():
            data = {**data, "lambda": DEFAULT_STRENGTH}
            data.setdefault("lambda_scale", "gradient_ratio")
        return data

    @property
    def active(self) -> bool:
        return self.penalty != "none" and self.lam > 0.0

    @property
    def uses_penalty_batch(self) -> bool:
        """Whether each step draws the shared batch (a penalty, or its λ = 0 control)."""
        return self.active or self.forward_penalty_batch


class TrainConfig(_Section):
    batch_size: int = Field(256, ge=1)
    epochs: int = Field(2, ge=1, description="with best_step_selection none this fixed length is the run")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (None = epochs only)")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the MLP weights")
    embedding_lr: float | None = Field(None, gt=0.0, description="embedding learning rate (None = lr)")
    embedding_optimizer: Literal["adam", "sparse_adam", "adagrad"] = "sparse_adam"
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled (AdamW) decay of the MLP weights")
    embedding_l2: float = Field(
        0.0, ge=0.0, description="L2 on the embeddings each batch gathers (keeps gradients sparse)"
    )
    grad_clip: float | None = Field(None, gt=0.0, description="clip the global gradient norm (None = off)")
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    early_stopping_patience: int | None = Field(
        None, ge=1, description="evaluations without a better valid logloss before stopping (None = off)"
    )
    eval_every_steps: int = Field(0, ge=0, description="0 = evaluate at the end of every epoch")
    checkpoint_every_steps: int = Field(0, ge=0, description="0 = checkpoint only at evaluations/SIGTERM")
    seed_init: int = 0
    seed_data: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    progress: bool = Field(True, description="tqdm bar (only shown on a tty)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: chosen from work and CPUs)")
    memory_limit_gib: float | None = Field(
        None, gt=0.0, description="memory one device may give the model (None: CUDA free memory, or available "
        "RAM on CPU); training refuses to start when parameters, gradients and optimizer state exceed 90 % of it"
    )
    weight_averaging_epochs: float = Field(
        1.0, ge=0.0, description="exponential moving average of the weights over this many epochs (0 = off); "
        "evaluation, best-step selection and the bundle use the averaged weights"
    )
    parallelism: Literal["data", "component"] = Field(
        "data", description="under torchrun: data (DDP, every rank holds all K components) or component "
        "(each rank owns whole components; see docs/multi-device.md)"
    )
    best_step_selection: Literal["ensemble", "per_component", "none"] = Field(
        "none", description="ensemble: keep the weights of the best validation logloss; per_component: each "
        "component keeps its own best evaluation (ctr_ad/selection.py); none: the final weights"
    )


class DataConfig(_Section):
    loader: Literal["memory", "stream"] = "memory"
    eval_batch_size: int = Field(8192, ge=1)
    stream_buffer_rows: int = Field(
        1_000_000, ge=1, description="stream loader: rows of consecutive row groups shuffled together"
    )
    prefetch_batches: int | None = Field(
        None, ge=0, description="batches a background thread prepares ahead of the training step (pinned host "
        "memory on CUDA); 0 = prepare each batch in the training loop; None = 2 on CUDA or with the stream "
        "loader, 0 for the memory loader on CPU (where the gather would compete with the step for the cores)"
    )

    def prefetch_depth(self, device_type: str) -> int:
        if self.prefetch_batches is not None:
            return self.prefetch_batches
        return 2 if device_type == "cuda" or self.loader == "stream" else 0


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    anti_distillation: AntiDistillationConfig = Field(default_factory=AntiDistillationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig | None = Field(None, description="log `ctr-ad train` runs to MLflow (ctr_ad.tracking)")

    @model_validator(mode="after")
    def _components_own_their_tables(self) -> Config:
        # Component parallelism splits every parameter by component; one table shared by all of
        # them belongs to none, and slicing it would silently train the wrong rows.
        if self.train.parallelism == "component" and self.model.share_embeddings:
            raise ValueError("train.parallelism: component needs a table per component; "
                             "model.share_embeddings: true shares one (use train.parallelism: data)")
        # Per-component selection copies each component's rows of its own table, and indexes the
        # components of the whole ensemble (a component-parallel rank holds only its own).
        if self.train.best_step_selection == "per_component":
            if self.model.share_embeddings:
                raise ValueError("train.best_step_selection: per_component needs a table per component; "
                                 "model.share_embeddings: true shares one")
            if self.train.parallelism == "component":
                raise ValueError("train.best_step_selection: per_component is not supported with "
                                 "train.parallelism: component (use ensemble or none)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-able dict using the file's key names (``lambda``, not ``lam``). Without a
        ``tracking`` section the key is left out, so configs, bundles and replica hashes stay as before."""
        data = self.model_dump(mode="json", by_alias=True)
        if data.get("tracking") is None:
            data.pop("tracking", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> Config:
        return validate_model(cls, data, origin)


def set_dotted(data: dict[str, Any], dotted: dict[str, Any], origin: str = "override") -> dict[str, Any]:
    """Apply {"section.key": value} overrides to a nested dict (in place; returns it)."""
    for key, value in dotted.items():
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"{origin} {key!r}: empty key")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"{origin} {key!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``1e-3``, ``[64,32]``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key.sub=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        set_dotted(data, {dotted: value}, origin="--set")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None = all defaults), apply ``--set`` overrides and validate."""
    data: dict[str, Any] = {}
    origin = "config"
    if path is not None:
        origin = str(path)
        data = load_yaml_mapping(path, "config file")
    data = apply_overrides(data, overrides or [])
    return Config.from_dict(data, origin=origin)
