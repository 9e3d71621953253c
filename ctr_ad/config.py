"""Training configuration: pydantic models loaded from YAML, overridable with ``--set key.sub=value``.

Every section forbids unknown keys, so a typo (``embeding_dim``) is an error naming the key instead of
a silently ignored setting. Load with :func:`load_config`; the resolved config is stored in every run
and bundle (``config.to_dict()``), so a bundle always says exactly how it was trained.

YAML layout (all sections optional, defaults below)::

    model:             {components, embedding_dim, mlp, dropout, activation, smelu_beta, prediction}
    anti_distillation: {penalty, lambda, warmup_steps, data_order, penalty_batch_size, signed, eps}
    train:             {batch_size, epochs, lr, embedding_lr, embedding_optimizer, ...}
    data:              {loader, eval_batch_size, stream_buffer_rows}
    tracking:          {experiment, uri, run_name, log_artifacts, tags}   (optional: MLflow, ctr_ad.tracking)
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
        "none", description="logreg: z_k = z_linear + h_k, a converged logistic regression fitted first and frozen"
    )
    anchor_C: float | None = Field(None, gt=0.0, description="the anchor's inverse L2 (None: chosen on valid)")

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
    data_order: Literal["shared", "independent"] = "shared"
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
    epochs: int = Field(5, ge=1)
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
        2, ge=1, description="evaluations without a better valid logloss before stopping (None = off)"
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
    weight_averaging_epochs: float = Field(
        0.0, ge=0.0, description="exponential moving average of the weights over this many epochs (0 = off); "
        "evaluation, best-step selection and the bundle use the averaged weights"
    )
    best_step_selection: Literal["ensemble", "none"] = Field(
        "ensemble", description="ensemble: keep the weights of the best validation logloss; none: the final weights"
    )


class DataConfig(_Section):
    loader: Literal["memory", "stream"] = "memory"
    eval_batch_size: int = Field(8192, ge=1)
    stream_buffer_rows: int = Field(
        1_000_000, ge=1, description="stream loader: rows of consecutive row groups shuffled together"
    )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    anti_distillation: AntiDistillationConfig = Field(default_factory=AntiDistillationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig | None = Field(None, description="log `ctr-ad train` runs to MLflow (ctr_ad.tracking)")

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
