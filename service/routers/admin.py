"""``POST /v1/admin/reload``: load a bundle and swap it in atomically. Bearer-token protected.

The token is read from the environment variable named by ``settings.admin_token_env``
(``CTR_AD_ADMIN_TOKEN`` by default) when the app starts. Without it the admin routes answer 404,
as if they did not exist: an unconfigured server offers no admin surface at all. With it, a missing
or wrong ``Authorization: Bearer <token>`` answers 401.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.responses import Response

from ctr_ad.errors import UserError
from service.encoding import ApiError, error_item
from service.http import JSONBytes
from service.model_store import ModelSlot, load_slot
from service.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from service.state import ServiceState, State


def require_admin(request: Request, svc: State) -> None:
    token = svc.admin_token
    if token is None:
        raise HTTPException(404, f"admin routes are disabled (set {svc.settings.admin_token_env} to enable them)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


AdminAuth = Annotated[None, Depends(require_admin)]
router = APIRouter(tags=["admin"])


@router.post(
    "/v1/admin/reload", response_model=ReloadResponse,
    responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Load a new bundle (and optionally a new shadow) and swap it in atomically",
)
async def reload(svc: State, _: AdminAuth, body: ReloadRequest | None = None) -> Response:
    body = body or ReloadRequest()
    async with svc.reload_lock:
        start = time.perf_counter()
        # Load and warm up off the event loop: requests keep flowing to the old bundle meanwhile.
        path = body.bundle or str(svc.primary.source or svc.primary.path)
        new = await _load(svc, "bundle", path, svc.settings.offline_pd_rel)
        shadow: ModelSlot | bool | None = False
        if "shadow" in body.model_fields_set:
            shadow = None if body.shadow is None else await _load(svc, "shadow", body.shadow, None)
        old = svc.swap(new, shadow)
        svc.metrics.reloads.labels("ok").inc()
        return JSONBytes({
            "model_version": new.version,
            "previous_version": old.version,
            "shadow_version": svc.shadow.version if svc.shadow else None,
            "load_seconds": round(time.perf_counter() - start, 4),
        })


async def _load(svc: ServiceState, field: str, path: str, offline_pd_rel: float | None) -> ModelSlot:
    try:
        s = svc.settings
        return await asyncio.to_thread(load_slot, path, s.max_instances, offline_pd_rel, s.backend, s.threads)
    except UserError as exc:
        svc.metrics.reloads.labels("error").inc()
        raise ApiError(422, [error_item([field], f"cannot load bundle: {exc}", "bundle_error")]) from None
