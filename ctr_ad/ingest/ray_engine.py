"""``ctr-ad ingest --engine ray``: the ingest's per-block work as Ray tasks.

The passes stay what they are (:mod:`ctr_ad.ingest.run`): this process reads the inputs block by
block, submits each block to an executor and merges the results in block order. Here the executor
runs the very worker functions of the local engine's ``--workers N`` pool as Ray tasks, so the
dataset is the local engine's, byte for byte: the blocks are cut by the same reader, each block's
result is a pure function of the block, and the merge (vocabulary counts, quarantine, row order,
Parquet writing) happens here, in block order, whichever node ran a block and whenever it finished.
Ray Data with Arrow blocks was not used: it sizes blocks itself and, unless told otherwise, streams
them in the order they finish, and it would need a second implementation of the parsing, validation
and quarantine that could drift from the local engine's; equality would then be a property to hope
for, not one by construction.

Where the Ray instance comes from: an already initialized one (``ray.init`` by the caller), else the
cluster ``RAY_ADDRESS`` names, else a new local instance with the available CPUs (``--workers N``
above 1 caps it at N). Only an instance started here is shut down at the end.

On a cluster of several nodes the workers write and read the block spills and ``features.json`` in
the staging directory beside ``--out``: it must be on storage every node mounts at the same path
(the docker-compose ``ray`` profile shares the ``runs`` volume). Errors raised in a task reach the
caller as the task's own exception (the one-line ``UserError`` or ``OSError`` the local engine
raises), not as Ray's wrapper with a remote traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from ctr_ad.errors import UserError

INSTALL_HINT = "pip install 'ctr-ad[ray]'"
MISSING_RAY = f"--engine ray needs Ray, which is not installed here; install it with: {INSTALL_HINT}"
#: Set in the local instance's workers: one polars thread per task, as in the local engine's pool
#: (each task holds one CPU; more threads would oversubscribe the cores).
WORKER_ENV = {"POLARS_MAX_THREADS": "1"}
#: How long to wait for a cluster without CPUs (a head started with --num-cpus=0) to get a worker node.
WAIT_FOR_CPUS_S = 120.0

# The ingest this worker process last ran a block of (see _run_block).
_current_run: str | None = None


def import_ray() -> Any:
    """The ``ray`` module, or a one-line UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(MISSING_RAY) from None
    return ray


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_cpus(workers: int) -> int:
    """CPUs of a local instance: ``--workers N`` when given above 1, else every available CPU."""
    return workers if workers > 1 else available_cpus()


def start_local(num_cpus: int) -> None:
    """Start a local Ray instance of ``num_cpus`` CPUs for this process (always a new one: never a
    cluster that another user started on this machine with ``ray start``)."""
    ray = import_ray()
    # The workers inherit the environment of the instance's processes, which inherit ours now.
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # an implicit local instance reports nothing
    # Ray >= 2.59 turns token authentication on for a local instance and says so in a warning on every
    # start; the instance is private to this run, so the warning is noise here. (Setting RAY_AUTH_MODE
    # instead would not do: Ray reads it once, at import.)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth_level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    except Exception as exc:  # whatever stops Ray from starting: one line, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--engine ray: could not start a local Ray instance ({type(exc).__name__}: {first})") from None
    finally:
        auth_log.setLevel(auth_level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _connect(workers: int) -> bool:
    """Initialize Ray unless the caller did; True when this call started or joined it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        start_local(local_cpus(workers))
        return True
    unreachable = _unreachable(address)
    if unreachable:  # Ray itself retries an unreachable address for minutes
        raise UserError(f"RAY_ADDRESS={address}: cannot reach the Ray cluster's head ({unreachable})")
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"RAY_ADDRESS={address}: cannot connect to the Ray cluster ({first}; a cluster with "
                        f"token authentication needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN here too)") from None
    return True


def _unreachable(address: str, timeout_s: float = 10.0) -> str | None:
    """Why nothing answers at ``HOST:PORT`` (or ``ray://HOST:PORT``), or None (also for ``auto``)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None  # auto, local, …: Ray resolves them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def _forget_previous_run(fn: Callable) -> None:
    """Drop what the worker functions' module caches per process (e.g. the fitted features, by path):
    Ray reuses worker processes across ingests, where the local engine starts a fresh pool, and a later
    ingest into the same ``--out`` has the same staging paths."""
    module = sys.modules.get(fn.__module__)
    for value in vars(module).values() if module is not None else ():
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()


def _run_block(run_id: str, fn: Callable, args: tuple) -> Any:
    """The body of every task: ``fn(*args)``, in a worker that holds no state from an earlier ingest."""
    global _current_run
    if run_id != _current_run:
        _forget_previous_run(fn)
        _current_run = run_id
    return fn(*args)


class _RayFuture:
    """The ``result()`` of one task, raising the task's own exception."""

    def __init__(self, owner: RayExecutor, ref: Any) -> None:
        self._owner = owner
        self._ref = ref

    def result(self, timeout: float | None = None) -> Any:
        ray = self._owner.ray
        try:
            return ray.get(self._ref, timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except ray.exceptions.GetTimeoutError:
            raise
        except ray.exceptions.RayError as exc:  # a lost worker or node, the object store, …: not the input
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"the Ray cluster lost an ingest task ({type(exc).__name__}: {first}); "
                            f"rerun, with --resume to keep the finished files") from None
        finally:
            self._owner._pending.discard(self._ref)


class RayExecutor(Executor):
    """Runs ``submit(fn, *args)`` as a Ray task of one CPU (``fn`` must be importable: it is sent by
    reference, so every node needs the same ctr-ad installed)."""

    def __init__(self, workers: int) -> None:
        self.ray = import_ray()
        self._pending: set[Any] = set()
        self._owns_ray = _connect(workers)
        cpus = self._cluster_cpus()
        parallel = min(workers, cpus) if workers > 1 else cpus
        #: Blocks in flight: enough to keep every CPU busy while results are merged in order.
        self.window = max(2 * parallel, 2)
        self.cpus = cpus
        self._task = self.ray.remote(num_cpus=1)(_run_block)
        self._run_id = uuid.uuid4().hex

    def _cluster_cpus(self) -> int:
        """The cluster's CPUs, waiting a while for worker nodes that are still joining."""
        deadline = time.monotonic() + WAIT_FOR_CPUS_S
        while (cpus := int(self.ray.cluster_resources().get("CPU", 0))) == 0 and time.monotonic() < deadline:
            time.sleep(1.0)
        if cpus == 0:
            self.shutdown()
            raise UserError(f"the Ray cluster has no CPUs to run the ingest's tasks on (waited "
                            f"{WAIT_FOR_CPUS_S:.0f} s for a worker node to join)")
        return cpus

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> _RayFuture:  # type: ignore[override]
        if kwargs:
            raise TypeError("RayExecutor.submit takes positional arguments only")
        ref = self._task.remote(self._run_id, fn, args)
        self._pending.add(ref)
        return _RayFuture(self, ref)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for ref in list(self._pending):
                with contextlib.suppress(Exception):  # already finished, or Ray already gone
                    self.ray.cancel(ref)
        self._pending.clear()
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False
