"""Request and response models of the REST API (pydantic), as documented in the OpenAPI schema.

The predict request body is generated per bundle from its raw field names (see
``service.encoding.RequestParser``); the models here are the fixed parts of the API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where the error is: ['body', 'instances', 3, 'I7']")
    path: str = Field(description="the same location, readable: 'instances[3].I7'")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem]
    unknown_fields: list[str] | None = Field(None, description="field names the model does not know")
    errors_total: int | None = None


class Prediction(BaseModel):
    ctr: float = Field(description="ensemble probability of a click (mean over components)")
    component_std: float = Field(description="std over the K components of their probabilities")
    components: list[float] | None = Field(None, description="each component's probability (?components=true)")


class PredictResponse(BaseModel):
    request_id: str = Field(description="quote it in POST /v1/feedback")
    model_version: str
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_version: str
    created_at: str | None
    loaded_at: str
    bundle_path: str
    components: int = Field(description="K")
    penalty: str | None
    lambda_: float | None = Field(None, alias="lambda")
    data_fingerprint: str | None
    valid_metrics: dict[str, Any] | None
    test_metrics: dict[str, Any] | None
    offline_pd_rel: float | None
    fields: dict[str, list[str]]
    shadow: dict[str, Any] | None = None


class Outcome(_Strict):
    request_id: str = Field(min_length=1, max_length=200)
    labels: list[Literal[0, 1] | None] = Field(
        min_length=1, max_length=100_000,
        description="one label per instance of that request, in order (null = outcome unknown)",
    )


class FeedbackRequest(_Strict):
    outcomes: list[Outcome] = Field(min_length=1, max_length=10_000)


class FeedbackResponse(BaseModel):
    accepted_labels: int
    unknown_request_ids: list[str] = Field(description="never served, expired or already labelled")


class ReloadRequest(_Strict):
    bundle: str | None = Field(
        None, description="RUN_DIR, bundle dir or a pipeline's published/ dir; omitted = re-read the path served now"
    )
    shadow: str | None = Field(
        None, description="new shadow bundle; omit to keep the current shadow, null to remove it"
    )


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str
    shadow_version: str | None
    load_seconds: float


class Health(BaseModel):
    status: Literal["ok", "ready", "starting"]
    model_version: str | None = None
