"""The per-process service state shared by the routers (``app.state.service``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from service.engine import InferenceEngine, ShadowScorer
from service.model_store import ModelStore
from service.monitoring import FeedbackStore, Monitor, ServiceMetrics
from service.settings import ServiceSettings


@dataclass
class ServiceState:
    settings: ServiceSettings
    monitor: Monitor
    metrics: ServiceMetrics
    feedback: FeedbackStore
    engine: InferenceEngine
    store: ModelStore | None = None
    shadow: ShadowScorer | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def get_state(request: Request) -> ServiceState:
    return request.app.state.service
