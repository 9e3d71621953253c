"""``/healthz``, ``/readyz``, ``/v1/model`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.http import JSONBytes
from service.schemas import Health, ModelInfo
from service.state import State

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
async def healthz() -> Response:
    return JSONBytes({"status": "ok"})


@router.get("/readyz", response_model=Health, tags=["health"],
            summary="A bundle is loaded and answered a warm-up request")
async def readyz(svc: State) -> Response:
    # The app is created only once its bundles are loaded and warmed up: answering is being ready.
    return JSONBytes({"status": "ready", "model_version": svc.primary.version})


@router.get("/v1/model", response_model=ModelInfo, tags=["model"],
            summary="Version, creation time, K, penalty and λ, data fingerprint, validation metrics")
async def model_info(svc: State) -> Response:
    info: dict[str, Any] = dict(svc.primary.info)
    shadow = svc.shadow
    info["shadow"] = (
        {k: shadow.info[k] for k in ("model_version", "created_at", "bundle_path", "components", "penalty",
                                     "lambda", "data_fingerprint", "valid_metrics")}
        if shadow is not None else None
    )
    return JSONBytes(info)


@router.get("/metrics", tags=["monitoring"], summary="Prometheus metrics (text exposition format)",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(svc: State) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
