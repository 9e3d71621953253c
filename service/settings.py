"""Service settings: one frozen dataclass built by ``ctr-ad serve`` (or from the environment).

A multi-worker server (``--workers N``) starts every worker from an import string, so the settings
also travel as JSON in the environment variable ``CTR_AD_SERVE_SETTINGS``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

SETTINGS_ENV = "CTR_AD_SERVE_SETTINGS"
DEFAULT_ADMIN_TOKEN_ENV = "CTR_AD_ADMIN_TOKEN"


@dataclass(frozen=True)
class ServiceSettings:
    bundle: str
    shadow: str | None = None
    #: More instances in one request -> 413 (the body limit below is the other guard).
    max_instances: int = 1000
    #: Larger request bodies -> 413 before they are parsed. ~600 bytes per Criteo instance.
    max_body_bytes: int = 4 * 1024 * 1024
    #: Rolling window of the reproducibility monitor, in instances (spread, shadow PD, feedback).
    window: int = 10_000
    #: Alert when live shadow pd_rel > alert_factor × the bundle's offline pd_rel ...
    alert_factor: float = 2.0
    #: ... measured on at least this many shadow-scored instances (few pairs are noisy).
    alert_min_instances: int = 200
    #: Offline pd_rel given by hand; None = read it from the bundle directory (see monitoring).
    offline_pd_rel: float | None = None
    #: Name of the environment variable holding the admin bearer token (unset/empty = admin off).
    admin_token_env: str = DEFAULT_ADMIN_TOKEN_ENV
    #: torch intra-op threads. 1 by default: the inference thread, the event loop and the shadow
    #: thread already share the cores, and micro-batching buys more than intra-op parallelism
    #: at serving batch sizes (benchmarks/README-serve.md).
    threads: int = 1
    #: "thread": one inference thread that micro-batches concurrent requests; "inline": score in
    #: the event loop (lowest overhead for a single client, no batching).
    inference: str = "thread"
    #: Largest micro-batch of the inference thread, in instances.
    max_batch_instances: int = 2048
    #: Shadow scoring: jobs waiting beyond this are dropped (and counted) rather than slow the
    #: primary path; the shadow waits up to ``shadow_linger_ms`` to score bigger batches.
    shadow_queue_max: int = 10_000
    shadow_linger_ms: float = 50.0
    #: Served predictions kept for feedback (by request id), oldest evicted first.
    feedback_capacity: int = 100_000

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)

    @classmethod
    def from_env(cls) -> ServiceSettings:
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise RuntimeError(f"{SETTINGS_ENV} is not set; start the service with `ctr-ad serve`")
        return cls.from_json(text)

    def admin_token(self) -> str | None:
        token = os.environ.get(self.admin_token_env, "").strip()
        return token or None
