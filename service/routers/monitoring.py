"""``GET /v1/monitoring/reproducibility``: live PD against the shadow, component spread, feedback."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from starlette.responses import Response

from service.http import JSONBytes
from service.state import get_state

router = APIRouter(tags=["monitoring"])


@router.get(
    "/v1/monitoring/reproducibility",
    summary="Rolling-window reproducibility: spread, shadow pd_abs/pd_rel vs offline pd_rel, alert",
)
async def reproducibility(request: Request) -> Response:
    svc = get_state(request)
    if svc.store is None:
        raise HTTPException(503, "no bundle loaded yet")
    return JSONBytes(svc.monitor.report(svc.store))
