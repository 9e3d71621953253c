"""Where the per-block work of an ingest runs: the seam between the passes and the engine.

The passes (:mod:`ctr_ad.ingest.run`, :mod:`ctr_ad.ingest.time_split`) hand each block to an
``Executor`` (``submit(fn, *args)``, then ``result()`` in block order) and merge the results in the
main process, so what runs a block never changes what is written. Two engines:

* ``local``: in this process (``--workers 1``) or on a pool of spawned worker processes;
* ``ray``: Ray tasks running the same worker functions, on a local Ray instance or on the cluster
  that ``RAY_ADDRESS`` names (:mod:`ctr_ad.ingest.ray_engine`, needs ``pip install 'ctr-ad[ray]'``).
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Literal

from ctr_ad.ingest.lifecycle import worker_init

Engine = Literal["local", "ray"]
ENGINES: tuple[str, ...] = ("local", "ray")


def check_engine(engine: str) -> None:
    """Fail before any work when ``engine`` cannot run here (``ray`` without Ray installed)."""
    if engine == "ray":
        from ctr_ad.ingest.ray_engine import import_ray

        import_ray()


def open_executor(engine: str, workers: int) -> tuple[Executor | None, int]:
    """The executor of one ingest (None: run every block in this process) and how many blocks may be
    in flight at once (bounds memory: each holds one block). Shut it down when the ingest ends."""
    if engine == "ray":
        from ctr_ad.ingest.ray_engine import RayExecutor

        ray_executor = RayExecutor(workers)
        return ray_executor, ray_executor.window
    if engine != "local":
        raise ValueError(f"unknown ingest engine {engine!r}; choose one of {', '.join(ENGINES)}")
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=worker_init,
                                initargs=(os.getpid(),))
            if workers > 1 else None)
    return pool, max(2 * workers, 2)
