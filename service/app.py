"""The FastAPI application: ``create_app(settings)`` (or ``app_from_env()`` for uvicorn workers).

Routes (one router per concern, ``service/routers/``)::

    POST /v1/predict                     score raw instances                     (routers/predict.py)
    GET  /v1/model                       the loaded bundle: version, K, λ, metrics (routers/info.py)
    GET  /healthz  /readyz  /metrics     liveness, readiness, Prometheus        (routers/info.py)
    GET  /v1/monitoring/reproducibility  live PD, spread, alert, online metrics  (routers/monitoring.py)
    POST /v1/feedback                    labelled outcomes of served requests    (routers/feedback.py)
    POST /v1/admin/reload                swap in a new bundle (bearer token)     (routers/admin.py)

The bundle is loaded, validated and warmed up before the app exists, so a server that accepts
connections is ready, and a bad bundle stops ``ctr-ad serve`` before it binds a port.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

import ctr_ad
from service.engine import InferenceEngine, ShadowScorer
from service.http import FastPredict, JSONBytes, ObservabilityMiddleware, install_error_handlers
from service.model_store import ModelStore, load_slot
from service.monitoring import FeedbackStore, Monitor, ServiceMetrics
from service.routers import admin, feedback, info, monitoring, predict
from service.settings import ServiceSettings
from service.state import ServiceState

log = logging.getLogger("ctr_ad.service")
# The event loop and the inference thread take turns holding the GIL; by default a thread waiting
# for it may wait 5 ms, which lands straight in the latency tail. Set by the server process only.
SWITCH_INTERVAL_S = 0.0005


def load_store(settings: ServiceSettings) -> ModelStore:
    """Load the primary (and shadow) bundles; raises ``UserError`` naming the bad file."""
    primary = load_slot(settings.bundle, settings.max_instances, settings.offline_pd_rel)
    shadow = load_slot(settings.shadow, settings.max_instances) if settings.shadow else None
    if shadow is not None:
        mine, theirs = primary.bundle.config.model, shadow.bundle.config.model
        if mine != theirs:
            log.warning("shadow %s has a different model config than %s: live PD then measures more "
                        "than retraining noise", shadow.path, primary.path)
    return ModelStore(primary, shadow)


def create_app(settings: ServiceSettings, store: ModelStore | None = None) -> FastAPI:
    torch.set_num_threads(max(int(settings.threads), 1))
    if store is None:
        store = load_store(settings)
    monitor = Monitor(settings)
    metrics = ServiceMetrics(monitor, lambda: svc.store)
    svc = ServiceState(
        settings=settings,
        monitor=monitor,
        metrics=metrics,
        feedback=FeedbackStore(settings.feedback_capacity),
        engine=InferenceEngine(settings.inference, settings.max_batch_instances),
        store=store,
    )

    def make_shadow_scorer() -> ShadowScorer:
        scorer = ShadowScorer(svc.store, monitor, settings.shadow_queue_max, settings.shadow_linger_ms)  # type: ignore[arg-type]
        scorer.start()
        return scorer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.engine.start()
        if store.shadow is not None:
            svc.shadow = make_shadow_scorer()
        try:
            yield
        finally:
            svc.engine.stop()
            if svc.shadow is not None:
                svc.shadow.stop()

    app = FastAPI(
        title="ctr-ad prediction service",
        version=ctr_ad.__version__,
        description=(
            "Click-through-rate predictions of an (anti-distilled) ensemble, with live reproducibility "
            "monitoring against a shadow replica. Errors: 400 malformed JSON, 413 too many instances or "
            "body too large, 422 invalid values (with their path), 401/404 admin auth (404 = admin disabled)."
        ),
        default_response_class=JSONBytes,
        lifespan=lifespan,
    )
    app.state.service = svc
    app.state.admin_token = settings.admin_token()
    app.state.make_shadow_scorer = make_shadow_scorer
    install_error_handlers(app)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       fast_predict=FastPredict(svc))
    app.include_router(predict.build_router(store.primary.parser))
    app.include_router(info.router)
    app.include_router(monitoring.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:app_from_env`` (multi-worker servers)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # each worker is a fresh interpreter
    return create_app(ServiceSettings.from_env())
