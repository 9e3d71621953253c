"""HTTP plumbing: fast JSON responses, uniform error bodies, request metrics, the body limits.

Every error the service answers has the body ``{"detail": [{"loc", "path", "msg", "type"}, ...]}``
(plus ``unknown_fields`` when field names were unknown), whatever raised it: our own validation,
FastAPI's (query parameters, feedback/admin bodies) or an HTTPException.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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

log = logging.getLogger(__name__)


class JSONBytes(JSONResponse):
    """A JSON response serialised by :func:`dumps` (skips FastAPI's jsonable_encoder walk).

    A ``JSONResponse`` subclass, so FastAPI documents the routes' ``response_model`` as the JSON body
    of their 200 responses in ``/openapi.json``.
    """

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else dumps(content)


def error_body(status: int, msg: str, kind: str, loc: list[str | int] | None = None) -> dict[str, Any]:
    loc = loc or []
    return {"detail": [{"loc": loc, "path": path_string(loc[1:] if loc[:1] == ["body"] else loc) if loc else "",
                        "msg": msg, "type": kind}]}


_HTTP_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "timeout", 413: "too_large", 415: "unsupported_media_type",
               422: "invalid", 503: "unavailable"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return JSONBytes(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if isinstance(exc.detail, list):
            return JSONBytes({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        status, body, headers = http_error_response(exc)
        return JSONBytes(body, status_code=status, headers=headers)

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


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the limit of {limit} bytes")


class BodyTimeout(HTTPException):
    """The client stopped sending its request body: answer 408 and close the connection."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"request body not received within {seconds:g} s",
                         headers={"connection": "close"})


def http_error_response(exc: HTTPException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, error body, headers) of an HTTPException, in the service's error format."""
    status = exc.status_code
    body = error_body(status, str(exc.detail), _HTTP_KINDS.get(status, "error"))
    return status, body, dict(exc.headers or {})


#: An ASGI endpoint answering one path itself, ahead of the FastAPI stack (see ``routers/predict.py``).
FastPath = Callable[[Scope, Receive, Send], Awaitable[None]]


class ObservabilityMiddleware:
    """Counts and times every request by route template and status; enforces the body size limit
    and the body-read timeout; hands the paths in ``fast_paths`` (``POST /v1/predict``) to their
    own ASGI endpoint.

    Pure ASGI (no BaseHTTPMiddleware): it adds two dict lookups and a clock read per request.
    Paths that match no route are counted as ``<unmatched>`` so scanners cannot blow up the
    label cardinality.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, max_body_bytes: int, body_timeout_s: float,
                 fast_paths: dict[tuple[str, str], FastPath] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s
        self.fast_paths = fast_paths or {}
        # (route, method, status) -> its counter and histogram children: prometheus_client's
        # labels() validates and locks on every call, twice per request on the serving path.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        fast = self.fast_paths.get((scope["method"], scope["path"]))
        try:
            length = _content_length(scope)
            if length is not None and length > self.max_body:
                # Refuse before reading a byte of it.
                body = dumps(error_body(413, f"request body of {length} bytes is larger than the limit of "
                                              f"{self.max_body} bytes", "too_large"))
                await Response(body, status_code=413, media_type="application/json")(scope, receive, send_wrapper)
                return
            guarded = self._guard_body(receive)
            await (fast or self.app)(scope, guarded, send_wrapper)
        finally:
            label = scope["path"] if fast else getattr(scope.get("route"), "path", None) or "<unmatched>"
            key = (label, scope.get("method", ""), str(status))
            children = self._children.get(key)
            if children is None:
                m = self.metrics
                children = self._children[key] = (m.requests.labels(*key), m.latency.labels(*key))
            children[0].inc()
            children[1].observe(time.perf_counter() - start)

    def _guard_body(self, receive: Receive) -> Receive:
        """``receive`` with the size limit (for bodies without Content-Length) and the read timeout:
        a client that stops sending half-way gets 408 instead of holding the connection forever."""
        limit, timeout = self.max_body, self.body_timeout
        received = 0
        deadline: float | None = None
        complete = False

        async def receive_guarded() -> Message:
            nonlocal received, deadline, complete
            if complete:  # after the body only http.disconnect can come: no deadline on waiting for it
                return await receive()
            if deadline is None:  # the whole body gets one budget, however it is cut into chunks
                deadline = asyncio.get_running_loop().time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                complete = not message.get("more_body", False)
            return message

        return receive_guarded


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
