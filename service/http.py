"""HTTP plumbing: fast JSON responses, uniform error bodies, request metrics and the body limit.

Every error the service answers has the body ``{"detail": [{"loc", "path", "msg", "type"}, ...]}``
(plus ``unknown_fields`` when field names were unknown), whatever raised it: our own validation,
FastAPI's (query parameters, feedback/admin bodies) or an HTTPException.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.encoding import ApiError, path_string
from service.monitoring import ServiceMetrics

try:  # orjson is 5-10x faster than json for float arrays; optional, the service works without it
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover - depends on the environment
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

log = logging.getLogger("ctr_ad.service")


class JSONBytes(Response):
    """A JSON response serialised by :func:`dumps` (skips FastAPI's jsonable_encoder walk)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else dumps(content)


def error_body(status: int, msg: str, kind: str, loc: list[str | int] | None = None) -> dict[str, Any]:
    loc = loc or []
    return {"detail": [{"loc": loc, "path": path_string(loc[1:] if loc[:1] == ["body"] else loc) if loc else "",
                        "msg": msg, "type": kind}]}


_HTTP_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
               422: "invalid", 503: "unavailable"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return JSONBytes(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if isinstance(exc.detail, list):
            body: dict[str, Any] = {"detail": exc.detail}
        else:
            body = error_body(exc.status_code, str(exc.detail), _HTTP_KINDS.get(exc.status_code, "error"))
        return JSONBytes(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        items = []
        for err in exc.errors()[:50]:
            loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
            where = loc[1:] if loc[:1] in (["body"], ["query"], ["header"], ["path"]) else loc
            msg = str(err.get("msg", "invalid"))
            if err.get("type") == "json_invalid":
                msg = f"malformed JSON: {err.get('ctx', {}).get('error', msg)}"
            items.append({"loc": loc, "path": path_string(where), "msg": msg, "type": str(err.get("type"))})
        status = 400 if any(i["type"] == "json_invalid" for i in items) else 422
        return JSONBytes({"detail": items}, status_code=status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONBytes(error_body(500, "internal error (logged on the server)", "internal"), status_code=500)


PREDICT_PATH = "/v1/predict"


class FastPredict:
    """``POST /v1/predict`` answered straight from the ASGI messages.

    The FastAPI route stack (exception middleware, router, dependency solving, request object)
    costs about as much CPU per request as everything this service does for a one-instance
    prediction (benchmarks/README-serve.md); this path runs the same :func:`score_request` the
    route does and answers errors with the same bodies. The FastAPI route stays registered: it
    documents the operation in the OpenAPI schema.
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from service.routers.predict import flag, score_request

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
            status = exc.status_code
            payload = error_body(status, str(exc.detail), _HTTP_KINDS.get(status, "error"))
        except Exception:
            log.exception("unhandled error on POST %s", PREDICT_PATH)
            status, payload = 500, error_body(500, "internal error (logged on the server)", "internal")
        body = dumps(payload)
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the limit of {limit} bytes")


class ObservabilityMiddleware:
    """Counts and times every request by route template and status; enforces the body size limit;
    hands ``POST /v1/predict`` to :class:`FastPredict`.

    Pure ASGI (no BaseHTTPMiddleware): it adds two dict lookups and a clock read per request.
    Paths that match no route are counted as ``<unmatched>`` so scanners cannot blow up the
    label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, max_body_bytes: int,
                 fast_predict: Any = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.fast_predict = fast_predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        limit = self.max_body
        label: str | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        fast = self.fast_predict is not None and scope["path"] == PREDICT_PATH and scope["method"] == "POST"
        if fast:
            label = PREDICT_PATH
        try:
            length = _content_length(scope)
            if length is not None and length > limit:
                # Refuse before reading a byte of it.
                body = dumps(error_body(413, f"request body of {length} bytes is larger than the limit of "
                                              f"{limit} bytes", "too_large"))
                await Response(body, status_code=413, media_type="application/json")(scope, receive, send_wrapper)
                return
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            if fast:
                await self.fast_predict(scope, receive_limited, send_wrapper)
            else:
                await self.app(scope, receive_limited, send_wrapper)
        finally:
            route = scope.get("route")
            label = label or getattr(route, "path", None) or "<unmatched>"
            code = str(status)
            method = scope.get("method", "")
            m = self.metrics
            m.requests.labels(label, method, code).inc()
            m.latency.labels(label, method, code).observe(time.perf_counter() - start)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
