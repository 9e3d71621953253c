"""The one per-process state of the service, and the FastAPI dependencies that hand it to routes.

:class:`ServiceState` holds everything a request may touch: the settings, the loaded bundles
("slots": primary and shadow), the monitor and its Prometheus metrics, the feedback store, the
inference engine and the shadow scorer. ``create_app`` stores it as ``app.state.service`` and
nothing else; routes receive it (or the primary slot) through the ``Annotated`` aliases below.

Reloads swap slots with single reference assignments; a request reads ``state.primary`` once and
uses that slot to the end, so no response mixes two models.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.engine import InferenceEngine, ShadowScorer
from service.model_store import ModelSlot
from service.monitoring import FeedbackStore, Monitor, ServiceMetrics
from service.settings import ServiceSettings


@dataclass(eq=False)
class ServiceState:
    settings: ServiceSettings
    primary: ModelSlot
    shadow: ModelSlot | None = None
    admin_token: str | None = None
    monitor: Monitor = field(init=False)
    metrics: ServiceMetrics = field(init=False)
    feedback: FeedbackStore = field(init=False)
    engine: InferenceEngine = field(init=False)
    #: The shadow's background thread: started with the app when a shadow is loaded, or by the
    #: first reload that adds one.
    shadow_scorer: ShadowScorer | None = None
    reloads: int = 0
    started: float = field(default_factory=time.time)
    #: Serialises reloads (two admins reloading at once); never taken on the request path.
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        s = self.settings
        self.monitor = Monitor(s)
        self.metrics = ServiceMetrics(self.monitor, self)
        self.feedback = FeedbackStore(s.feedback_capacity)
        self.engine = InferenceEngine(s.inference, s.max_batch_instances, on_scored=self.monitor.record_primary)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.engine.start()
        if self.shadow is not None:
            self._ensure_shadow_scorer()

    def stop(self) -> None:
        self.engine.stop()
        if self.shadow_scorer is not None:
            self.shadow_scorer.stop()
            self.shadow_scorer = None

    def _ensure_shadow_scorer(self) -> None:
        if self.shadow_scorer is None:
            s = self.settings
            self.shadow_scorer = ShadowScorer(self, self.monitor, s.shadow_queue_max, s.shadow_linger_ms)
            self.shadow_scorer.start()

    def swap(self, primary: ModelSlot, shadow: ModelSlot | bool | None = False) -> ModelSlot:
        """Install ``primary`` (and ``shadow`` unless False), restart the monitoring windows;
        returns the old primary."""
        old = self.primary
        if shadow is not False:
            self.shadow = shadow  # type: ignore[assignment]
        self.primary = primary
        self.reloads += 1
        self.monitor.reset_windows()
        if self.shadow is not None:
            self._ensure_shadow_scorer()
        return old


# ---------------------------------------------------------------------------------------- dependencies
def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]
