"""Service settings: every option of ``ctr-ad serve``, its default and its bounds, in one model.

``ServiceSettings`` is a pydantic-settings model: a value comes from the ``ctr-ad serve`` flag when
one is given, else from the environment variable ``CTR_AD_<NAME>`` (``CTR_AD_MAX_INSTANCES=500``),
else from the default below. ``service.command`` builds its flags from these fields, so neither
defaults nor checks are written twice.

A multi-worker server (``--workers N``) starts every worker from an import string, so the resolved
settings also travel as JSON in the environment variable ``CTR_AD_SERVE_SETTINGS``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctr_ad.errors import UserError

ENV_PREFIX = "CTR_AD_"
SETTINGS_ENV = "CTR_AD_SERVE_SETTINGS"
DEFAULT_ADMIN_TOKEN_ENV = "CTR_AD_ADMIN_TOKEN"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    bundle: str = Field(description="RUN_DIR, RUN_DIR/bundle or a pipeline's published/ directory to serve")
    shadow: str | None = Field(None, description="an independently trained bundle of the same config (live PD)")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 = any free port)")
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own model and monitor")
    threads: int = Field(
        1, ge=1,
        description="torch intra-op threads; 1 is best on small hosts: the inference thread, the event loop "
                    "and the shadow thread already share the cores, and micro-batching gains more than "
                    "intra-op parallelism at serving batch sizes",
    )
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="what scores requests: torch (a bundle) or onnxruntime (a graph written by "
                             "`ctr-ad export --format onnx`; needs the [onnx] extra)",
    )
    inference: Literal["thread", "inline"] = Field(
        "thread", description="thread: one inference thread micro-batches concurrent requests; "
                              "inline: score in the event loop (no thread hop, no batching)",
    )
    max_batch_instances: int = Field(2048, ge=1, description="largest micro-batch of the inference thread")
    max_instances: int = Field(1000, ge=1, description="instances in one request (more: 413)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1,
                                description="request body limit in bytes, ~600 per Criteo instance (more: 413)")
    body_timeout_s: float = Field(
        10.0, gt=0, description="seconds a client may take to send the rest of a request body (then 408)",
    )
    window: int = Field(10_000, ge=1, description="rolling monitoring window, in instances")
    alert_factor: float = Field(2.0, gt=0, description="alert when live pd_rel > this × the offline pd_rel")
    alert_min_instances: int = Field(200, ge=1,
                                     description="shadow-scored instances needed before the alert may fire")
    offline_pd_rel: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="offline pd_rel to compare with (default: the pipeline's offline_metrics.json or the "
                    "bundle metadata)",
    )
    shadow_queue_max: int = Field(10_000, ge=1,
                                  description="instances waiting for the shadow beyond which new ones are dropped")
    shadow_linger_ms: float = Field(50.0, ge=0, description="how long the shadow waits to gather a bigger batch")
    feedback_capacity: int = Field(100_000, ge=1, description="served predictions kept for feedback")
    admin_token_env: str = Field(
        DEFAULT_ADMIN_TOKEN_ENV, min_length=1,
        description="environment variable holding the admin bearer token (unset or empty = admin routes off)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="uvicorn log level")
    access_log: bool = Field(False, description="log every request (slower)")

    @classmethod
    def build(cls, **values: object) -> ServiceSettings:
        """Validated settings from explicit values (flags), the environment and the defaults;
        a bad value is a ``UserError`` naming it."""
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValidationError as exc:
            parts = []
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else "<settings>"
                where = f"--{name.replace('_', '-')} (or {ENV_PREFIX}{name.upper()})"
                if err["type"] == "missing":
                    parts.append(f"{where} is required")
                else:
                    parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
            raise UserError("; ".join(parts)) from None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        return cls.model_validate_json(text)

    @classmethod
    def from_env(cls) -> ServiceSettings:
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise RuntimeError(f"{SETTINGS_ENV} is not set; start the service with `ctr-ad serve`")
        return cls.from_json(text)

    def admin_token(self) -> str | None:
        token = os.environ.get(self.admin_token_env, "").strip()
        return token or None
