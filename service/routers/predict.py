"""``POST /v1/predict``: score raw instances with the primary bundle (and queue them for the shadow).

The operation is :func:`score_request`. Two entry points call it: :class:`FastPredict`, a bare ASGI
endpoint that ``service.http.ObservabilityMiddleware`` hands the path to (the FastAPI route stack
— exception middleware, router, dependency solving, request object — costs about as much CPU per
request as the whole one-instance prediction), and the FastAPI route below, which documents the
operation in the OpenAPI schema and answers when the app is mounted without the middleware.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.encoding import ApiError, RequestParser
from service.http import JSONBytes, dumps, error_body, http_error_response
from service.schemas import ErrorResponse, PredictResponse
from service.state import ServiceState, State

log = logging.getLogger(__name__)
PREDICT_PATH = "/v1/predict"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "malformed JSON"},
    408: {"model": ErrorResponse, "description": "the request body was not received in time"},
    413: {"model": ErrorResponse, "description": "too many instances or body too large"},
    422: {"model": ErrorResponse, "description": "wrong type, non-finite number or unknown field (with its path)"},
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


class RequestIds:
    """Random 128-bit request ids in hex, as unguessable as ``uuid4().hex``, drawn from the OS
    1,024 at a time: one ``getrandom`` system call per id was 3 % of a one-instance request."""

    def __init__(self, batch: int = 1024) -> None:
        self.batch = batch
        self._pool: list[str] = []
        self._pid = os.getpid()

    def next(self) -> str:
        if not self._pool or self._pid != os.getpid():  # a forked worker must not reuse its parent's ids
            self._pid = os.getpid()
            raw = os.urandom(16 * self.batch).hex()
            self._pool = [raw[i:i + 32] for i in range(0, len(raw), 32)]
        return self._pool.pop()


REQUEST_IDS = RequestIds()


async def score_request(svc: ServiceState, body: bytes, components: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The whole predict operation on a request body: (response payload, response headers).

    Raises ApiError for client errors.
    """
    slot = svc.primary  # read once: a concurrent reload cannot change this request's model
    batch = slot.parser.parse(body)
    cat, dense = slot.encoder.encode(batch)
    scores = await svc.engine.score(slot, cat, dense)
    request_id = REQUEST_IDS.next()
    ctr = scores.ctr.tolist()
    std = scores.component_std.tolist()
    if components:
        preds = [{"ctr": c, "component_std": s, "components": k}
                 for c, s, k in zip(ctr, std, scores.components.tolist())]
    else:
        preds = [{"ctr": c, "component_std": s} for c, s in zip(ctr, std)]
    # A copy: the scores may be a view into a whole micro-batch, which must not stay alive with it.
    svc.feedback.put(request_id, scores.ctr.copy(), slot.version)
    if svc.shadow_scorer is not None and svc.shadow is not None:
        svc.shadow_scorer.submit(slot, batch, cat, dense, scores.ctr)
    payload = {"request_id": request_id, "model_version": slot.version, "predictions": preds}
    return payload, {"x-request-id": request_id, "x-model-version": slot.version}


class FastPredict:
    """``POST /v1/predict`` answered straight from the ASGI messages, with the route's error bodies."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[str, str] = {}
        try:
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away: nobody to answer
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            components = False
            query = scope.get("query_string", b"")
            if query:
                values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("components")
                components = flag(values[-1] if values else None, "components")
            payload, headers = await score_request(self.state, b"".join(chunks), components)
            status = 200
        except ApiError as exc:
            status, payload = exc.status, exc.body()
        except HTTPException as exc:
            status, payload, headers = http_error_response(exc)
        except Exception:
            log.exception("unhandled error on POST %s", PREDICT_PATH)
            status, payload = 500, error_body(500, "internal error (logged on the server)", "internal")
        body = dumps(payload)
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})


def build_router(parser: RequestParser) -> APIRouter:
    """The router, with the request schema of the bundle loaded at start-up in the OpenAPI document.

    The body is parsed by the bundle's own parser (one pydantic-core pass over the bytes) rather
    than by a FastAPI body parameter, so a reload can change the field set and the error paths are
    ours; ``openapi_extra`` documents it all the same.
    """
    router = APIRouter(tags=["predict"])
    body_doc = {
        # Documented here, parsed by hand: FastAPI's dependency solving for one boolean costs more
        # per request than the model's forward pass on one instance.
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
        PREDICT_PATH,
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra=body_doc,
        summary="Score instances: ensemble CTR, component spread, model version, request id",
    )
    async def predict(request: Request, svc: State) -> Response:
        components = flag(request.query_params.get("components"), "components")
        payload, headers = await score_request(svc, await request.body(), components)
        return JSONBytes(payload, headers=headers)

    return router
