"""Where the model runs: the primary inference thread and the shadow replica's thread.

Primary: handlers hand encoded arrays to :class:`InferenceEngine`, whose single thread takes every
job waiting for the same slot (up to ``max_batch_instances``) and scores them in one forward pass,
so concurrent one-instance requests share a batch instead of queueing for the model one by one.
The event loop meanwhile parses the next requests (torch releases the GIL inside its kernels).
``inference="inline"`` scores in the event loop instead: no thread hop, no batching.

Shadow: :class:`ShadowScorer` receives a copy of every scored batch after the response is computed
and scores it on its own thread, lingering a few milliseconds to gather a bigger batch; results go
to the monitor only, so the shadow never delays a response. When it falls behind, jobs beyond
``shadow_queue_max`` instances are dropped and counted rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.encoding import ParsedBatch
from service.model_store import ModelSlot, Scores
from service.monitoring import Monitor

if TYPE_CHECKING:
    from service.state import ServiceState

log = logging.getLogger(__name__)


@dataclass
class _Job:
    slot: ModelSlot
    cat: np.ndarray
    dense: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def rows(self) -> int:
        return int(self.cat.shape[0])


def _resolve(jobs: list[_Job], results: list[Scores] | BaseException) -> None:
    for i, job in enumerate(jobs):
        if job.future.done():  # the client went away and the handler was cancelled
            continue
        if isinstance(results, BaseException):
            job.future.set_exception(results)
        else:
            job.future.set_result(results[i])


def _split(scores: Scores, sizes: list[int]) -> list[Scores]:
    out, start = [], 0
    for n in sizes:
        end = start + n
        out.append(Scores(scores.ctr[start:end], scores.component_std[start:end], scores.components[start:end]))
        start = end
    return out


class _BackgroundThread:
    """One daemon thread that consumes a queue guarded by ``_cv``; stop() wakes and joins it."""

    thread_name = "ctr-ad-worker"

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def _start_thread(self) -> None:
        self._stopping = False  # an app may be started again after a shutdown (tests do)
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class InferenceEngine(_BackgroundThread):
    thread_name = "ctr-ad-inference"

    def __init__(self, mode: str = "thread", max_batch_instances: int = 2048,
                 on_scored: Callable[[np.ndarray], None] | None = None) -> None:
        """``on_scored(component_std)`` sees every scored batch (the monitor's spread): once per
        micro-batch rather than once per request, so concurrent requests share its numpy calls too."""
        super().__init__()
        self.on_scored = on_scored
        if mode not in ("thread", "inline"):
            raise ValueError(f"inference mode {mode!r}: choose 'thread' or 'inline'")
        self.mode = mode
        self.max_batch = max(int(max_batch_instances), 1)
        self._queue: deque[_Job] = deque()
        self.batches = 0
        self.batched_jobs = 0

    def start(self) -> None:
        if self.mode == "thread" and self._thread is None:
            self._start_thread()

    async def score(self, slot: ModelSlot, cat: np.ndarray, dense: np.ndarray) -> Scores:
        if self.mode == "inline" or self._thread is None:
            self.batches += 1
            self.batched_jobs += 1
            scores = slot.score_arrays(cat, dense)
            if self.on_scored is not None:
                self.on_scored(scores.component_std)
            return scores
        loop = asyncio.get_running_loop()
        job = _Job(slot, cat, dense, loop.create_future(), loop)
        with self._cv:
            self._queue.append(job)
            self._cv.notify()
        return await job.future

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            jobs, rows = [first], first.rows
            # Merge only jobs for the same slot: a reload must never mix models in one forward pass.
            while self._queue and self._queue[0].slot is first.slot and rows + self._queue[0].rows <= self.max_batch:
                job = self._queue.popleft()
                jobs.append(job)
                rows += job.rows
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                if len(jobs) == 1:
                    scores = jobs[0].slot.score_arrays(jobs[0].cat, jobs[0].dense)
                    results = [scores]
                else:
                    cat = np.concatenate([j.cat for j in jobs])
                    dense = np.concatenate([j.dense for j in jobs])
                    scores = jobs[0].slot.score_arrays(cat, dense)
                    results = _split(scores, [j.rows for j in jobs])
                if self.on_scored is not None:
                    self.on_scored(scores.component_std)
                outcome: list[Scores] | BaseException = results
            except Exception as exc:  # surfaced to each handler, which answers 500 and logs it
                outcome = exc
            self.batches += 1
            self.batched_jobs += len(jobs)
            # One hand-off per event loop (there is one per process; tests may run others).
            by_loop: dict[int, list[int]] = {}
            for i, job in enumerate(jobs):
                by_loop.setdefault(id(job.loop), []).append(i)
            for idx in by_loop.values():
                group = [jobs[i] for i in idx]
                answer = outcome if isinstance(outcome, BaseException) else [outcome[i] for i in idx]
                # A closed loop (shutdown) has no requests left to answer.
                with contextlib.suppress(RuntimeError):
                    group[0].loop.call_soon_threadsafe(_resolve, group, answer)


@dataclass
class _ShadowJob:
    slot: ModelSlot  # the primary slot that scored the batch
    batch: ParsedBatch
    cat: np.ndarray
    dense: np.ndarray
    p_primary: np.ndarray


class ShadowScorer(_BackgroundThread):
    thread_name = "ctr-ad-shadow"

    def __init__(self, state: ServiceState, monitor: Monitor, queue_max: int, linger_ms: float,
                 max_batch_instances: int = 4096) -> None:
        super().__init__()
        self.state = state
        self.monitor = monitor
        self.queue_max = max(int(queue_max), 1)
        self.linger_s = max(float(linger_ms), 0.0) / 1000.0
        self.max_batch = max_batch_instances
        self._queue: deque[_ShadowJob] = deque()
        self._queued_rows = 0
        self.errors = 0

    def start(self) -> None:
        if self._thread is None:
            self._start_thread()

    def submit(self, slot: ModelSlot, batch: ParsedBatch, cat: np.ndarray, dense: np.ndarray,
               p_primary: np.ndarray) -> None:
        """Queue a scored batch for the shadow; never blocks (drops and counts when full)."""
        n = int(cat.shape[0])
        with self._cv:
            if self._queued_rows + n > self.queue_max:
                dropped = True
            else:
                dropped = False
                self._queue.append(_ShadowJob(slot, batch, cat, dense, p_primary))
                self._queued_rows += n
                # Wake the thread only to start a batch or when one is full: waking it for every
                # request while it lingers costs a GIL hand-off per request on the serving path.
                if len(self._queue) == 1 or self._queued_rows >= self.max_batch:
                    self._cv.notify()
        if dropped:
            self.monitor.record_shadow_dropped(n)

    def idle(self) -> bool:
        with self._cv:
            return not self._queue

    def _take(self) -> list[_ShadowJob] | None:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if not self._queue:
                return None
            # Linger: one forward for many small requests costs far less than one each.
            deadline = time.monotonic() + self.linger_s
            while self._queued_rows < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            jobs: list[_ShadowJob] = []
            rows = 0
            while self._queue and (not jobs or rows + self._queue[0].cat.shape[0] <= self.max_batch):
                job = self._queue.popleft()
                jobs.append(job)
                rows += int(job.cat.shape[0])
            self._queued_rows -= rows
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._score(jobs)
            except Exception:  # the shadow is advisory: log, count, keep serving
                self.errors += 1
                log.exception("shadow scoring failed")

    def _score(self, jobs: list[_ShadowJob]) -> None:
        generation = self.monitor.generation
        shadow = self.state.shadow
        primary = self.state.primary
        if shadow is None:
            return
        # Pairs only make sense against the primary that is serving now (a reload starts a new series).
        jobs = [j for j in jobs if j.slot is primary]
        if not jobs:
            return
        if shadow.same_features(primary):
            cat = np.concatenate([j.cat for j in jobs])
            dense = np.concatenate([j.dense for j in jobs])
        else:
            # A shadow with its own vocabularies: encode the raw instances with its own encoder.
            encoded = [shadow.encoder.encode(j.batch) for j in jobs]
            cat = np.concatenate([c for c, _ in encoded])
            dense = np.concatenate([d for _, d in encoded])
        p_shadow = shadow.score_arrays(cat, dense).ctr
        p_primary = np.concatenate([j.p_primary for j in jobs])
        self.monitor.record_shadow(p_primary, p_shadow, generation)
