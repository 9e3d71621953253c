"""Request and response models of the REST API (pydantic), as documented in the OpenAPI schema.

The predict request body is generated per bundle from its raw field names (see
``service.encoding.RequestParser``); the models here are the fixed parts of the API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from ctr_ad.strict import StrictModel

#: A label: the JSON integer 0 or 1 (``true``/``false`` and ``1.0`` are refused, not converted).
Label = Annotated[StrictInt, Field(ge=0, le=1)]


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


class Outcome(StrictModel):
    request_id: str = Field(min_length=1, max_length=200)
    labels: list[Label | None] = Field(
        min_length=1, max_length=100_000,
        description="one label per instance of that request, in order (null = outcome unknown)",
    )


class FeedbackRequest(StrictModel):
    outcomes: list[Outcome] = Field(min_length=1, max_length=10_000)


class FeedbackResponse(BaseModel):
    accepted_labels: int
    unknown_request_ids: list[str] = Field(description="never served, expired or already labelled")


class ReloadRequest(StrictModel):
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
    status: Literal["ok", "ready"]
    model_version: str | None = None


# ------------------------------------------------------------------------------ monitoring report
class SpreadSummary(BaseModel):
    components: int = Field(description="K")
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


class WindowInfo(BaseModel):
    capacity: int = Field(description="rolling window size, in instances")
    instances: int
    since: str | None = Field(description="time of the oldest instance in the window (UTC)")


class Quantiles(BaseModel):
    p50: float
    p90: float
    p99: float


class ShadowReport(BaseModel):
    enabled: bool
    model_version: str | None
    instances_seen: int = Field(description="shadow-scored instances since start")
    dropped: int = Field(description="instances not shadow-scored because its queue was full")
    instances: int = Field(description="shadow-scored pairs in the window")
    pd_abs: float | None
    pd_rel: float | None = Field(description="mean 2|p − p_shadow| / (p + p_shadow) over the window")
    pd_rms: float | None
    abs_diff_quantiles: Quantiles | None = None
    since: str | None


class AlertDetail(BaseModel):
    alert: bool
    reason: str
    factor: float
    min_instances: int
    live_pd_rel: float | None
    offline_pd_rel: float | None


class ReliabilityBin(BaseModel):
    mean_prediction: float
    observed_ctr: float
    instances: int


class OnlineMetrics(BaseModel):
    labels_total: int
    instances: int
    since: str | None
    logloss: float | None
    auc: float | None
    mean_prediction: float | None
    observed_ctr: float | None
    calibration: float | None = Field(description="mean prediction / observed CTR (1 = calibrated)")
    reliability: list[ReliabilityBin]


class ReproducibilityReport(BaseModel):
    model_version: str
    window: WindowInfo
    instances_seen: int
    component_spread: SpreadSummary
    shadow: ShadowReport
    offline: dict[str, Any] | None = Field(description="the offline pd_rel compared with, and where it came from")
    alert: bool
    alert_detail: AlertDetail
    online: OnlineMetrics
