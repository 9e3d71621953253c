"""The FastAPI application: ``create_app(settings)`` (or ``app_from_env()`` for uvicorn workers).

Routes (one router per concern, ``service/routers/``)::

    POST /v1/predict                     score raw instances                     (routers/predict.py)
    GET  /v1/model                       the loaded bundle: version, K, λ, metrics (routers/info.py)
    GET  /healthz  /readyz  /metrics     liveness, readiness, Prometheus        (routers/info.py)
    GET  /v1/monitoring/reproducibility  live PD, spread, alert, online metrics  (routers/monitoring.py)
    POST /v1/feedback                    labelled outcomes of served requests    (routers/feedback.py)
    POST /v1/admin/reload                swap in a new bundle (bearer token)     (routers/admin.py)

The bundle is loaded, validated and warmed up before the app exists, so a server that accepts
connections is ready, and a bad bundle stops ``ctr-ad serve`` before it binds a port. The app's
one piece of state is ``app.state.service`` (a :class:`~service.state.ServiceState`).
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send
from threadpoolctl import threadpool_limits

import ctr_ad
from service.http import JSONBytes, ObservabilityMiddleware, install_error_handlers
from service.model_store import load_slot
from service.routers import admin, feedback, info, monitoring, predict
from service.settings import ServiceSettings
from service.state import ServiceState

log = logging.getLogger(__name__)
# The event loop and the inference thread take turns holding the GIL; a thread that wants it makes
# the holder drop it after this long. 0.5 ms suited a 0.6 ms torch forward; with small batches
# scored in numpy (~0.2 ms) forced switches cost more than they save: 5 ms (CPython's default) gave
# 7 % less CPU per request and a p99 of 4.2-4.9 ms against 5.3-5.6 ms (1 instance, c = 8, 2 workers,
# same run; benchmarks/README.md). Set by the server process only.
SWITCH_INTERVAL_S = 0.005
# Young-generation GC threshold of the server process (CPython's default is 700 allocations).
GC_GEN0_THRESHOLD = 50_000


def tune_process() -> None:
    """Process-wide settings of a server process (not of a library user's process)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def freeze_heap() -> None:
    """Keep the garbage collector off the start-up heap.

    After loading torch, polars, pydantic and the bundles the process holds ~10⁶ tracked objects;
    every full collection walked them all (tens of milliseconds in which no request is answered,
    the 1 % latency tail). ``gc.freeze()`` moves them to a generation the collector never scans, and
    a larger young generation makes collections rarer; the request path allocates few long-lived
    containers, so memory stays flat.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def load_state(settings: ServiceSettings) -> ServiceState:
    """Load the primary (and shadow) bundles; raises ``UserError`` naming the bad file."""
    runtime = {"backend": settings.backend, "threads": settings.threads}
    primary = load_slot(settings.bundle, settings.max_instances, settings.offline_pd_rel, **runtime)
    shadow = load_slot(settings.shadow, settings.max_instances, **runtime) if settings.shadow else None
    if shadow is not None and primary.bundle.config.model != shadow.bundle.config.model:
        log.warning("shadow %s has a different model config than %s: live PD then measures more "
                    "than retraining noise", shadow.path, primary.path)
    return ServiceState(settings, primary, shadow, admin_token=settings.admin_token())


class ServiceApp(FastAPI):
    """The FastAPI app, with ``POST /v1/predict`` answered before FastAPI's own middleware stack.

    FastAPI wraps every route in its error, body-limit and telemetry middlewares; for a one-instance
    prediction they cost a tenth of the request's CPU. The predict endpoint handles its own errors,
    so it is dispatched here, through the same observability wrapper (metrics, body limits) as every
    other route.
    """

    fast_predict: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.fast_predict is not None and scope["type"] == "http" and scope["path"] == predict.PREDICT_PATH
                and scope["method"] == "POST"):
            await self.fast_predict(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: ServiceSettings, state: ServiceState | None = None) -> FastAPI:
    """The app serving ``state`` (loaded from ``settings`` when not given)."""
    torch.set_num_threads(settings.threads)
    # numpy's BLAS scores small requests (ctr_ad.small_batch): same thread budget as torch. Its
    # default, one spinning thread per core, made a 100-row forward 20x slower on a busy host.
    threadpool_limits(settings.threads, user_api="blas")
    svc = state if state is not None else load_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        freeze_heap()
        try:
            yield
        finally:
            svc.stop()

    app = ServiceApp(
        title="ctr-ad prediction service",
        version=ctr_ad.__version__,
        description=(
            "Click-through-rate predictions of an (anti-distilled) ensemble, with live reproducibility "
            "monitoring against a shadow replica. Errors: 400 malformed JSON, 408 request body not received "
            "in time, 413 too many instances or body too large, 422 invalid values (with their path), "
            "401/404 admin auth (404 = admin disabled)."
        ),
        default_response_class=JSONBytes,
        lifespan=lifespan,
    )
    app.state.service = svc
    install_error_handlers(app)
    observed = {"metrics": svc.metrics, "max_body_bytes": settings.max_body_bytes,
                "body_timeout_s": settings.body_timeout_s}
    app.add_middleware(ObservabilityMiddleware, **observed)  # type: ignore[arg-type]
    app.fast_predict = ObservabilityMiddleware(
        app, **observed, fast_paths={("POST", predict.PREDICT_PATH): predict.FastPredict(svc)})  # type: ignore[arg-type]
    app.include_router(predict.build_router(svc.primary.parser))
    app.include_router(info.router)
    app.include_router(monitoring.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:app_from_env`` (multi-worker servers)."""
    tune_process()  # each worker is a fresh interpreter
    return create_app(ServiceSettings.from_env())
