"""``GET /v1/monitoring/reproducibility``: live PD against the shadow, component spread, feedback."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.http import JSONBytes
from service.schemas import ReproducibilityReport
from service.state import State

router = APIRouter(tags=["monitoring"])


@router.get(
    "/v1/monitoring/reproducibility", response_model=ReproducibilityReport,
    summary="Rolling-window reproducibility: spread, shadow pd_abs/pd_rel vs offline pd_rel, alert",
)
async def reproducibility(svc: State) -> Response:
    return JSONBytes(svc.monitor.report(svc))
