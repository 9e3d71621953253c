"""Batches prepared ahead of the training step by a background thread.

The loaders (``ctr_ad.data``) gather a batch with ``index_select`` (memory) or read and decode Parquet
(stream); done in the training loop, the device waits for that work every step. :class:`PrefetchedBatches`
runs a loader's generator in one thread that keeps up to ``depth`` finished batches in a bounded queue
(memory stays bounded; a slow consumer stalls the thread, not the other way round). On CUDA the thread
also copies each batch into pinned (page-locked) host memory, so the training loop's
``.to(device, non_blocking=True)`` is a DMA that overlaps with the GPU's work.

One thread consumes one generator in order, so the batches — and therefore the training run — are
exactly those of the loader without prefetch. An exception in the thread is raised in the training
loop; leaving the loop early (end of epoch, ``max_steps``, an error) stops the thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from ctr_ad.data import Batch, TensorData


class BatchPlan(Protocol):
    rows: int
    steps_per_epoch: int

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


@dataclass
class _Failed:
    error: BaseException


_END = object()


def pinned(batch: Batch) -> Batch:
    """The batch in page-locked host memory (a non-blocking copy to CUDA can then overlap compute)."""
    penalty = batch.penalty
    if penalty is not None:
        penalty = TensorData(penalty.cat.pin_memory(), penalty.dense.pin_memory(), penalty.label.pin_memory())
    return replace(batch, cat=batch.cat.pin_memory(), dense=batch.dense.pin_memory(),
                   label=batch.label.pin_memory(), penalty=penalty)


class PrefetchedBatches:
    """``plan``'s batches, prepared ``depth`` ahead by a background thread (pinned when ``pin_memory``)."""

    def __init__(self, plan: BatchPlan, depth: int, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError("prefetch depth must be >= 1")
        self.plan = plan
        self.depth = depth
        self.pin_memory = pin_memory
        self.rows = plan.rows
        self.steps_per_epoch = plan.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        ready: queue.Queue[object] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            source = self.plan.batches(epoch, start_step)
            try:
                for batch in source:
                    ready.put(pinned(batch) if self.pin_memory else batch)
                    if stop.is_set():
                        return
                ready.put(_END)
            except BaseException as exc:  # handed to the training loop, which raises it
                ready.put(_Failed(exc))
            finally:
                source.close()

        thread = threading.Thread(target=produce, name=f"ctr-ad-prefetch-epoch{epoch}", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                assert isinstance(item, Batch)
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a put() waiting on a full queue, then let the thread end
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.05)
            thread.join()
