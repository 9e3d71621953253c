"""``/healthz``, ``/readyz``, ``/v1/model`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.http import JSONBytes
from service.schemas import Health, ModelInfo
from service.state import get_state

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
async def healthz() -> Response:
    return JSONBytes({"status": "ok"})


@router.get(
    "/readyz", response_model=Health, tags=["health"],
    responses={503: {"description": "no bundle loaded and warmed up yet"}},
    summary="A bundle is loaded and answered a warm-up request",
)
async def readyz(request: Request) -> Response:
    store = get_state(request).store
    if store is None or not store.ready:
        return JSONBytes({"status": "starting", "model_version": None}, status_code=503)
    return JSONBytes({"status": "ready", "model_version": store.primary.version})


@router.get("/v1/model", response_model=ModelInfo, tags=["model"],
            summary="Version, creation time, K, penalty and λ, data fingerprint, validation metrics")
async def model_info(request: Request) -> Response:
    store = get_state(request).store
    if store is None:
        raise HTTPException(503, "no bundle loaded yet")
    info: dict[str, Any] = dict(store.primary.info)
    shadow = store.shadow
    info["shadow"] = (
        {k: shadow.info[k] for k in ("model_version", "created_at", "bundle_path", "components", "penalty",
                                     "lambda", "data_fingerprint", "valid_metrics")}
        if shadow is not None else None
    )
    return JSONBytes(info)


@router.get("/metrics", tags=["monitoring"], summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    registry = get_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
