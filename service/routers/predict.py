"""``POST /v1/predict``: score raw instances with the primary bundle (and queue them for the shadow)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from starlette.responses import Response

from service.encoding import ApiError, RequestParser
from service.http import JSONBytes
from service.schemas import ErrorResponse, PredictResponse
from service.state import ServiceState, get_state

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "malformed JSON"},
    413: {"model": ErrorResponse, "description": "too many instances or body too large"},
    422: {"model": ErrorResponse, "description": "wrong type, non-finite number or unknown field (with its path)"},
    503: {"model": ErrorResponse, "description": "no bundle loaded yet"},
}


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def flag(value: str | None, name: str) -> bool:
    """A boolean query parameter, spelled as FastAPI accepts them; anything else is a 422."""
    if value is None:
        return False
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ApiError(422, [{"loc": ["query", name], "path": name, "msg": f"expected a boolean, got {value!r}",
                          "type": "bool_parsing"}])


async def score_request(svc: ServiceState, body: bytes, components: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The whole predict operation on a request body: (response payload, response headers).

    Raises ApiError / HTTPException for client errors and before a bundle is ready.
    """
    store = svc.store
    if store is None or not store.ready:
        raise HTTPException(503, "no bundle loaded yet")
    slot = store.primary  # read once: a concurrent reload cannot change this request's model
    batch = slot.parser.parse(body)
    cat, dense = slot.encoder.encode(batch)
    scores = await svc.engine.score(slot, cat, dense)
    request_id = uuid.uuid4().hex
    ctr = scores.ctr.tolist()
    std = scores.component_std.tolist()
    if components:
        preds = [{"ctr": c, "component_std": s, "components": k}
                 for c, s, k in zip(ctr, std, scores.components.tolist())]
    else:
        preds = [{"ctr": c, "component_std": s} for c, s in zip(ctr, std)]
    svc.monitor.record_primary(scores.component_std)
    # A copy: the scores may be a view into a whole micro-batch, which must not stay alive with it.
    svc.feedback.put(request_id, scores.ctr.copy(), slot.version)
    if svc.shadow is not None and store.shadow is not None:
        svc.shadow.submit(slot, batch, cat, dense, scores.ctr)
    payload = {"request_id": request_id, "model_version": slot.version, "predictions": preds}
    return payload, {"x-request-id": request_id, "x-model-version": slot.version}


def build_router(parser: RequestParser) -> APIRouter:
    """The router, with the request schema of the bundle loaded at start-up in the OpenAPI document.

    The body is parsed by the bundle's own parser (one pydantic-core pass over the bytes) rather
    than by a FastAPI body parameter, so a reload can change the field set and the error paths are
    ours; ``openapi_extra`` documents it all the same.
    """
    router = APIRouter(tags=["predict"])
    body_doc = {
        # Documented here, parsed by hand: FastAPI's dependency solving for one boolean costs more
        # per request than the model's forward pass on one instance (benchmarks/README-serve.md).
        "parameters": [{
            "name": "components", "in": "query", "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": "also return each component's probability",
        }],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": parser.json_schema()}},
            "description": "raw fields as in the source log; a missing field is a missing value",
        }
    }

    @router.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra=body_doc,
        summary="Score instances: ensemble CTR, component spread, model version, request id",
    )
    async def predict(request: Request) -> Response:
        # Normally answered by service.http.ObservabilityMiddleware's fast path, which calls
        # score_request directly; this route documents the operation and serves as the fallback.
        components = flag(request.query_params.get("components"), "components")
        payload, headers = await score_request(get_state(request), await request.body(), components)
        return JSONBytes(payload, headers=headers)

    return router
