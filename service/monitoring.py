"""Live reproducibility monitoring and the Prometheus metrics of the service.

Three streams feed rolling windows of the last ``window`` instances:

* **component spread** — the std over the ensemble's K components of their probabilities, for every
  scored instance. It needs no second model: a wide spread means the components disagree, which is
  the within-model face of irreproducibility (an anti-distilled ensemble is built to average it out).
* **shadow PD** — with ``--shadow``, an independently trained replica scores the same instances off
  the response path; ``pd_abs`` / ``pd_rel`` between the two are computed exactly as offline
  (``ctr_ad.metrics``: pd_rel = mean 2|p1 − p2| / (p1 + p2), the relative prediction difference of
  two retrains) and compared with the offline pd_rel of the bundle's own experiment: ``alert`` is
  raised when live > ``alert_factor`` × offline, over at least ``alert_min_instances`` pairs.
* **feedback** — labelled outcomes for served request ids give online logloss and calibration.

Histograms are kept as numpy bucket counts and exposed through a custom collector: one vectorized
update per request instead of one locked ``observe`` call per instance.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ctr_ad import metrics as offline_metrics
from ctr_ad.files import utc_timestamp

if TYPE_CHECKING:
    from service.model_store import ModelSlot
    from service.settings import ServiceSettings
    from service.state import ServiceState

QUANTILES = (0.5, 0.9, 0.99)
# Component std of probabilities: CTRs are ~0.001..0.5, spreads ~1e-4..0.1.
SPREAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25)
# |p − p_shadow|: same scale as the spread.
DIFF_BUCKETS = SPREAD_BUCKETS
# 2|p − p_shadow| / (p + p_shadow) ∈ [0, 2].
REL_DIFF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
# Request latency: the targets are in milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def pd_rows(p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row |p1 − p2| and 2|p1 − p2| / (p1 + p2): the offline definitions, from ``ctr_ad.metrics``."""
    return offline_metrics.abs_diff(p1, p2), offline_metrics.rel_diff(p1, p2)


class RollingWindow:
    """The last ``capacity`` rows of ``width`` float64 values (a ring buffer, thread-safe)."""

    def __init__(self, capacity: int, width: int = 1) -> None:
        self.capacity = max(int(capacity), 1)
        self.width = width
        self._data = np.zeros((self.capacity, width), dtype=np.float64)
        self._times = np.zeros(self.capacity, dtype=np.float64)
        self._next = 0
        self._filled = 0
        self.total = 0
        self._lock = threading.Lock()

    def add(self, values: np.ndarray, now: float | None = None) -> None:
        rows = np.asarray(values, dtype=np.float64).reshape(-1, self.width)
        if rows.shape[0] > self.capacity:
            rows = rows[-self.capacity :]
        n = rows.shape[0]
        if n == 0:
            return
        stamp = time.time() if now is None else now
        with self._lock:
            end = self._next + n
            if end <= self.capacity:
                self._data[self._next : end] = rows
                self._times[self._next : end] = stamp
            else:
                first = self.capacity - self._next
                self._data[self._next :] = rows[:first]
                self._data[: n - first] = rows[first:]
                self._times[self._next :] = stamp
                self._times[: n - first] = stamp
            self._next = end % self.capacity
            self._filled = min(self._filled + n, self.capacity)
            self.total += n

    def snapshot(self) -> tuple[np.ndarray, float | None]:
        """(rows [n, width], time of the oldest row)."""
        with self._lock:
            if self._filled < self.capacity:
                return self._data[: self._filled].copy(), (
                    float(self._times[0]) if self._filled else None
                )
            return self._data.copy(), float(self._times[self._next])


class BucketHistogram:
    """Prometheus-style histogram counts updated with one vectorized call per batch."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            return
        # side="left": a value equal to a bound belongs to that bound's bucket (le = "≤").
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=self._counts.size)
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def family(self, name: str, doc: str, labels: dict[str, str] | None = None) -> HistogramMetricFamily:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total_sum = self._sum
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative[:-1])]
        buckets.append(("+Inf", int(cumulative[-1])))
        fam = HistogramMetricFamily(name, doc, labels=list(labels or {}))
        fam.add_metric(list((labels or {}).values()), buckets, total_sum)
        return fam


class Served(NamedTuple):
    ctr: np.ndarray
    version: str
    at: float


class FeedbackStore:
    """Predictions served recently, by request id, for labelled feedback (each accepted once).

    Entries are plain tuples of a str, a float and a numpy array: the garbage collector stops
    tracking such a tuple after its first pass, so ``capacity`` (100,000) long-lived entries add
    nothing to the full collections that would otherwise walk them all, a stall of tens of
    milliseconds on the request path every few thousand requests.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(int(capacity), 1)
        self._items: OrderedDict[str, tuple[np.ndarray, str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, ctr: np.ndarray, version: str) -> None:
        with self._lock:
            self._items[request_id] = (ctr, version, time.time())
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def take(self, request_id: str) -> Served | None:
        with self._lock:
            item = self._items.pop(request_id, None)
        return None if item is None else Served(*item)

    def __len__(self) -> int:
        return len(self._items)


def _summary(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"mean": None, **{f"p{int(q * 100)}": None for q in QUANTILES}, "max": None}
    qs = np.quantile(values, QUANTILES)
    return {
        "mean": float(values.mean()),
        **{f"p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, qs)},
        "max": float(values.max()),
    }


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_timestamp(ts)


class Monitor:
    """Rolling reproducibility figures of one service process."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        w = settings.window
        self.spread = RollingWindow(w)
        self.shadow_pairs = RollingWindow(w, width=2)  # (p_primary, p_shadow)
        self.feedback = RollingWindow(w, width=2)  # (p, y)
        self.spread_hist = BucketHistogram(SPREAD_BUCKETS)
        self.diff_hist = BucketHistogram(DIFF_BUCKETS)
        self.rel_diff_hist = BucketHistogram(REL_DIFF_BUCKETS)
        self.instances = {"primary": 0, "shadow": 0}
        self.shadow_dropped = 0
        self.shadow_skipped_version = 0
        self.feedback_labels = 0
        #: Bumped by reset_windows: shadow results computed for an earlier pair of models are dropped.
        self.generation = 0
        self._lock = threading.Lock()

    def reset_windows(self) -> None:
        """A new primary starts new rolling figures (the Prometheus counters stay monotonic)."""
        w = self.settings.window
        with self._lock:
            self.generation += 1
            self.spread = RollingWindow(w)
            self.shadow_pairs = RollingWindow(w, width=2)

    # ------------------------------------------------------------------ recording
    def record_primary(self, component_std: np.ndarray) -> None:
        self.spread.add(component_std)
        self.spread_hist.observe(component_std)
        with self._lock:
            self.instances["primary"] += int(component_std.size)

    def record_shadow(self, p_primary: np.ndarray, p_shadow: np.ndarray, generation: int | None = None) -> None:
        diff, rel = pd_rows(p_primary, p_shadow)
        with self._lock:
            if generation is not None and generation != self.generation:
                return  # scored against models swapped out meanwhile
            self.shadow_pairs.add(np.stack([p_primary, p_shadow], axis=1))
            self.instances["shadow"] += int(p_primary.size)
        self.diff_hist.observe(diff)
        self.rel_diff_hist.observe(rel)

    def record_shadow_dropped(self, n: int) -> None:
        with self._lock:
            self.shadow_dropped += n

    def record_feedback(self, p: np.ndarray, y: np.ndarray) -> None:
        self.feedback.add(np.stack([p, y], axis=1))
        with self._lock:
            self.feedback_labels += int(p.size)

    # ------------------------------------------------------------------ reading
    def live_pd(self) -> dict[str, Any]:
        pairs, since = self.shadow_pairs.snapshot()
        if pairs.shape[0] == 0:
            return {"instances": 0, "pd_abs": None, "pd_rel": None, "pd_rms": None, "since": None}
        diff, rel = pd_rows(pairs[:, 0], pairs[:, 1])
        return {
            "instances": int(pairs.shape[0]),
            "pd_abs": float(diff.mean()),
            "pd_rel": float(rel.mean()),
            "pd_rms": float(np.sqrt(np.mean(diff * diff))),
            "abs_diff_quantiles": {
                f"p{int(q * 100)}": float(v) for q, v in zip(QUANTILES, np.quantile(diff, QUANTILES))
            },
            "since": _iso(since),
        }

    def online(self) -> dict[str, Any]:
        rows, since = self.feedback.snapshot()
        out: dict[str, Any] = {"labels_total": self.feedback_labels, "instances": int(rows.shape[0]),
                               "since": _iso(since)}
        if rows.shape[0] == 0:
            return {**out, "logloss": None, "auc": None, "mean_prediction": None, "observed_ctr": None,
                    "calibration": None, "reliability": []}
        p, y = rows[:, 0], rows[:, 1]
        mean_p, mean_y, counts = offline_metrics.calibration_curve(y, p, bins=min(10, rows.shape[0]))
        return {
            **out,
            "logloss": _finite_or_none(offline_metrics.logloss(y, p)),
            "auc": _finite_or_none(offline_metrics.auc(y, p)),
            "mean_prediction": float(p.mean()),
            "observed_ctr": float(y.mean()),
            # mean(p) / mean(y): 1 = calibrated on average, > 1 over-predicts.
            "calibration": _finite_or_none(offline_metrics.calibration(y, p)),
            "reliability": [
                {"mean_prediction": float(a), "observed_ctr": float(b), "instances": int(c)}
                for a, b, c in zip(mean_p, mean_y, counts)
            ],
        }

    def alert_state(self, state: ServiceState, live: dict[str, Any] | None = None) -> dict[str, Any]:
        live = live if live is not None else self.live_pd()
        offline = state.primary.offline
        offline_pd = offline["pd_rel"] if offline else None
        live_pd = live["pd_rel"]
        s = self.settings
        if state.shadow is None:
            reason, alert = "no shadow replica: live PD is not measured", False
        elif offline_pd is None:
            reason, alert = "the bundle has no offline pd_rel to compare with", False
        elif live["instances"] < s.alert_min_instances:
            reason, alert = f"fewer than {s.alert_min_instances} shadow-scored instances in the window", False
        else:
            threshold = s.alert_factor * offline_pd
            alert = bool(live_pd > threshold)
            relation = ">" if alert else "≤"
            reason = (f"live pd_rel {live_pd:.4g} {relation} {s.alert_factor:g} × offline pd_rel "
                      f"{offline_pd:.4g} = {threshold:.4g}")
        return {"alert": alert, "reason": reason, "factor": s.alert_factor,
                "min_instances": s.alert_min_instances, "live_pd_rel": live_pd, "offline_pd_rel": offline_pd}

    def report(self, state: ServiceState) -> dict[str, Any]:
        spread, since = self.spread.snapshot()
        live = self.live_pd()
        alert = self.alert_state(state, live)
        shadow = state.shadow
        primary = state.primary
        return {
            "model_version": primary.version,
            "window": {"capacity": self.settings.window, "instances": int(spread.shape[0]),
                       "since": _iso(since)},
            "instances_seen": self.instances["primary"],
            "component_spread": {"components": primary.components, **_summary(spread[:, 0])},
            "shadow": {
                "enabled": shadow is not None,
                "model_version": shadow.version if shadow else None,
                "instances_seen": self.instances["shadow"],
                "dropped": self.shadow_dropped,
                **live,
            },
            "offline": primary.offline,
            "alert": alert["alert"],
            "alert_detail": alert,
            "online": self.online(),
        }


class ServiceMetrics:
    """The Prometheus registry of one app: request metrics plus the monitor's figures."""

    def __init__(self, monitor: Monitor, state: ServiceState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ctr_ad_http_requests_total", "HTTP requests by route template, method and status code",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "ctr_ad_http_request_duration_seconds", "HTTP request latency (server side) by route and status",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.reloads = Counter(
            "ctr_ad_reloads_total", "Bundle reloads by result", ["result"], registry=self.registry
        )
        self.registry.register(_MonitorCollector(monitor, state))


class _MonitorCollector(Collector):
    def __init__(self, monitor: Monitor, state: ServiceState) -> None:
        self.monitor = monitor
        self.state = state

    def describe(self) -> list:
        return []  # collected lazily: the families depend on what is loaded

    def collect(self) -> Iterator[Any]:
        m = self.monitor
        scored = CounterMetricFamily("ctr_ad_instances_scored", "Instances scored, by model role", labels=["role"])
        for role, n in m.instances.items():
            scored.add_metric([role], n)
        yield scored
        yield m.spread_hist.family(
            "ctr_ad_component_spread", "Std over ensemble components of their probabilities, per instance"
        )
        yield m.diff_hist.family("ctr_ad_shadow_abs_diff", "|p − p_shadow| per shadow-scored instance")
        yield m.rel_diff_hist.family(
            "ctr_ad_shadow_rel_diff", "2|p − p_shadow| / (p + p_shadow) per shadow-scored instance"
        )
        dropped = CounterMetricFamily("ctr_ad_shadow_dropped", "Instances not shadow-scored (queue full)")
        dropped.add_metric([], m.shadow_dropped)
        yield dropped
        labels = CounterMetricFamily("ctr_ad_feedback_labels", "Labelled outcomes received")
        labels.add_metric([], m.feedback_labels)
        yield labels
        state = self.state
        # Requests per forward pass = the micro-batching at work (thread mode; 1 when inline).
        engine = state.engine
        for name, doc, value in (
            ("ctr_ad_inference_forward_passes", "Forward passes of the primary model", engine.batches),
            ("ctr_ad_inference_batched_requests", "Requests scored by those forward passes", engine.batched_jobs),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        info = GaugeMetricFamily(
            "ctr_ad_model_info", "Loaded model bundles (value 1), by role",
            labels=["role", "version", "created_at", "components", "penalty", "lambda"],
        )
        for role, slot in (("primary", state.primary), ("shadow", state.shadow)):
            if slot is not None:
                info.add_metric([role, *_info_labels(slot)], 1)
        yield info
        ready = GaugeMetricFamily("ctr_ad_ready", "1 when a warmed-up bundle serves requests")
        ready.add_metric([], 1 if state.primary.warmed_up else 0)
        yield ready
        live = m.live_pd()
        alert = m.alert_state(state, live)
        for name, doc, value in (
            ("ctr_ad_live_pd_rel", "Mean pd_rel against the shadow over the window", live["pd_rel"]),
            ("ctr_ad_offline_pd_rel", "Offline pd_rel of the primary bundle's experiment", alert["offline_pd_rel"]),
        ):
            if value is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
        g = GaugeMetricFamily("ctr_ad_reproducibility_alert", "1 when live pd_rel > factor × offline pd_rel")
        g.add_metric([], 1 if alert["alert"] else 0)
        yield g


def _info_labels(slot: ModelSlot) -> list[str]:
    i = slot.info
    return [slot.version, str(i.get("created_at")), str(slot.components), str(i.get("penalty")), str(i.get("lambda"))]
