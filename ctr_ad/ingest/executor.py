"""Where the per-block work of an ingest runs: the seam between the passes and the engine.

The passes (:mod:`ctr_ad.ingest.run`, :mod:`ctr_ad.ingest.time_split`) hand each block to an
``Executor`` (``submit(fn, *args)``, then ``result()`` in block order) and merge the results in the
main process, so what runs a block never changes what is written. Two engines:

* ``local``: in this process (``--workers 1``: two threads) or on a pool of spawned worker processes;
* ``ray``: Ray tasks running the same worker functions, on a local Ray instance or on the cluster
  that ``RAY_ADDRESS`` names (:mod:`ctr_ad.ingest.ray_engine`, needs ``pip install 'ctr-ad[ray]'``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any, Literal

from ctr_ad.ingest.lifecycle import worker_init

Engine = Literal["local", "ray"]
ENGINES: tuple[str, ...] = ("local", "ray")

#: Threads that run blocks in a one-worker ingest. A block's work is nearly all native code that
#: releases the GIL (polars' parse and group-bys, Arrow IPC and Parquet compression, numpy), so a
#: second thread overlaps one block's parse with the previous block's counting and writing, and the
#: main thread's merging with both, without a second process's imports and memory.
BLOCK_THREADS = 2


def check_engine(engine: str) -> None:
    """Fail before any work when ``engine`` cannot run here (``ray`` without Ray installed)."""
    if engine == "ray":
        from ctr_ad.ingest.ray_engine import import_ray

        import_ray()


def open_executor(engine: str, workers: int) -> tuple[Executor, int]:
    """The executor of one ingest and how many blocks may be in flight at once (bounds memory: each
    holds one block). Shut it down when the ingest ends."""
    if engine == "ray":
        from ctr_ad.ingest.ray_engine import RayExecutor

        ray_executor = RayExecutor(workers)
        return ray_executor, ray_executor.window
    if engine != "local":
        raise ValueError(f"unknown ingest engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if workers == 1:
        return ThreadPoolExecutor(max_workers=BLOCK_THREADS, thread_name_prefix="ingest-block"), BLOCK_THREADS
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=worker_init,
                               initargs=(os.getpid(),))
    return pool, 2 * workers


def ordered_map(fn: Callable, args: Iterable[tuple], pool: Executor, window: int) -> Iterator[Any]:
    """``map(fn, args)`` in order, on ``pool``, with at most ``window`` tasks in flight."""
    pending: list[Future] = []
    for a in args:
        pending.append(pool.submit(fn, *a))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()
