"""Torch intra-op threads chosen from the work and the CPUs this process may actually use.

torch starts with one intra-op thread per core it sees, whatever the work. Two things make that a
bad default for this product:

* **small steps gain nothing from a second thread**: the demo ensemble (K = 4, embedding 8, MLP
  64-32, batch 256) does ~1e8 FLOPs per training step spread over ~100 small kernels; OpenMP's
  fork/join and spin-waiting cost more than the split saves, and measured 2.5x slower with 2 threads
  than with 1 on an idle 2-core machine (3.9x beside two busy jobs, issue 12);
* **the cores torch sees are not the cores it gets**: a container limited by a CPU quota (cgroup v2
  ``cpu.max``, v1 ``cpu.cfs_quota_us``) still shows every host core, and a process pinned with
  ``taskset``/cpuset sees only its affinity mask through ``os.sched_getaffinity``.

:func:`choose_threads` combines both: ``min(available CPUs, work / MIN_WORK_PER_THREAD)``, at least 1.
:func:`apply_threads` is what an entry point calls: an explicit count (config ``train.threads``,
``--threads``, or the ``CTR_AD_THREADS`` environment variable) wins, otherwise the chosen count is set.

Work is measured in FLOPs per step (a training step or one inference batch); :func:`step_flops`
estimates it for an :class:`~ctr_ad.model.EnsembleCTR` from its sizes. Only the MLP matmuls are
counted: they are what a second thread can split.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_THREADS",
    "MIN_WORK_PER_THREAD",
    "ThreadChoice",
    "apply_threads",
    "available_cpus",
    "cgroup_cpu_limit",
    "choose_threads",
    "model_step_flops",
    "step_flops",
    "thread_choice",
]

#: FLOPs per step each intra-op thread must get before it is worth starting (≈ 10 ms of fp32 matmul on
#: one core of the 2-core reference VM, ~90 GFLOP/s per core). Below that, fork/join and spin-waiting
#: between the ~100 kernels of a step cost more than the split saves. Measured on the reference
#: machine (benchmarks/results/threads.json): the demo step (1e8) is fastest with 1 thread; the K = 4,
#: batch 4096, MLP 400³ step (4.8e10) uses both cores.
MIN_WORK_PER_THREAD = 1e9

#: Environment variable that fixes the thread count for every ctr-ad entry point (a positive integer).
ENV_THREADS = "CTR_AD_THREADS"

# Where cgroup hierarchies are mounted, relative to the root: pure v2, hybrid v2, v1 per controller.
_V2_MOUNTS = ("sys/fs/cgroup", "sys/fs/cgroup/unified")
_V1_MOUNTS = ("sys/fs/cgroup/cpu", "sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpuacct,cpu")


@dataclass(frozen=True)
class ThreadChoice:
    """The chosen count and why (for logs and run manifests)."""

    threads: int
    #: CPUs this process may use: min(affinity, cgroup quota), at least 1.
    available: int
    affinity: int
    #: cgroup CPU quota in CPUs (quota / period) or None when unlimited / not found.
    cgroup_limit: float | None
    work_per_step: float | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "threads": self.threads,
            "available_cpus": self.available,
            "affinity_cpus": self.affinity,
            "cgroup_cpu_limit": self.cgroup_limit,
            "work_per_step_flops": self.work_per_step,
            "reason": self.reason,
        }


# --------------------------------------------------------------------------------------- work size
def step_flops(
    *,
    n_fields: int,
    n_dense: int,
    embedding_dim: int,
    mlp: Sequence[int],
    components: int,
    batch: int,
    training: bool = True,
) -> float:
    """FLOPs of the MLP matmuls of one step: 2 per multiply-add, x3 for forward + backward."""
    widths = [n_fields * embedding_dim + n_dense, *mlp, 1]
    macs = sum(a * b for a, b in itertools.pairwise(widths))
    return float(2 * macs * components * batch * (3 if training else 1))


def model_step_flops(model_cfg: object, n_fields: int, n_dense: int, batch: int, training: bool = True) -> float:
    """:func:`step_flops` from a :class:`ctr_ad.config.ModelConfig` (``components``, ``embedding_dim``, ``mlp``)."""
    return step_flops(
        n_fields=n_fields,
        n_dense=n_dense,
        embedding_dim=model_cfg.embedding_dim,  # type: ignore[attr-defined]
        mlp=model_cfg.mlp,  # type: ignore[attr-defined]
        components=model_cfg.components,  # type: ignore[attr-defined]
        batch=batch,
        training=training,
    )


# --------------------------------------------------------------------------------------- CPUs
def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _candidates(mount: Path, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory and every ancestor up to the mount, deepest first.

    A quota set on any ancestor applies too, so the caller takes the smallest. Without a cgroup
    namespace the path in /proc/self/cgroup (e.g. ``/docker/<id>``) may not exist under the mount,
    which is then the container's own cgroup: the mount itself is always a candidate.
    """
    parts = [p for p in cgroup_path.strip().split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_limit(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max":
        return None
    try:
        quota = float(fields[0])
        period = float(fields[1]) if len(fields) > 1 else 100_000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(directory: Path) -> float | None:
    quota_text, period_text = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if not quota_text or not period_text:
        return None
    try:
        quota, period = float(quota_text), float(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: str | Path = "/") -> float | None:
    """The tightest cgroup CPU quota over this process's cgroup and its ancestors, in CPUs.

    Reads ``<root>/proc/self/cgroup`` and, for cgroup v2 (``0::<path>``), ``cpu.max`` under
    ``<root>/sys/fs/cgroup`` (or ``.../unified`` on hybrid hosts); for v1 (a line whose controllers
    include ``cpu``), ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under ``<root>/sys/fs/cgroup/cpu``
    (or ``cpu,cpuacct``). None when no quota is set or nothing can be read (not Linux). ``root`` lets
    tests point at a fake tree.
    """
    root = Path(root)
    text = _read(root / "proc" / "self" / "cgroup")
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            readers = [(root / m, _v2_limit) for m in _V2_MOUNTS]
        elif "cpu" in controllers.split(","):
            readers = [(root / m, _v1_limit) for m in _V1_MOUNTS]
        else:
            continue
        for mount, read_limit in readers:
            if not mount.is_dir():
                continue
            for directory in _candidates(mount, path):
                value = read_limit(directory)
                if value is not None:
                    limits.append(value)
    return min(limits) if limits else None


def _affinity() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        return max(os.cpu_count() or 1, 1)


def available_cpus(root: str | Path = "/", affinity: int | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded down), >= 1.

    A quota of 1.5 CPUs gives 1: a second busy thread would be throttled for part of every period,
    and a throttled OpenMP worker stalls every other worker at the next barrier.
    """
    return _cap(affinity if affinity is not None else _affinity(), cgroup_cpu_limit(root))


def _cap(affinity: int, limit: float | None) -> int:
    cpus = affinity if limit is None else min(affinity, math.floor(limit + 1e-9))
    return max(int(cpus), 1)


# --------------------------------------------------------------------------------------- choosing
def _env_threads(environ: dict[str, str] | os._Environ[str] | None = None) -> int | None:
    env = os.environ if environ is None else environ
    raw = env.get(ENV_THREADS, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_THREADS}={raw!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"{ENV_THREADS}={raw!r}: expected a positive integer")
    return value


def thread_choice(
    work_per_step: float | None = None,
    *,
    cpus: int | None = None,
    root: str | Path = "/",
    affinity: int | None = None,
    min_work_per_thread: float = MIN_WORK_PER_THREAD,
    processes: int = 1,
) -> ThreadChoice:
    """The intra-op thread count for ``work_per_step`` FLOPs per step, with the reasons.

    ``cpus`` overrides the detected CPU count (tests, or a caller that knows better); otherwise it is
    :func:`available_cpus` (``root``, ``affinity`` as there). ``processes``: how many processes of this
    job share those CPUs (``LOCAL_WORLD_SIZE`` under torchrun, ``--workers`` of the service); each gets
    an equal share, at least 1. ``work_per_step`` None means unknown: every CPU of the share.
    """
    aff = affinity if affinity is not None else _affinity()
    limit = cgroup_cpu_limit(root) if cpus is None else None
    available = max(int(cpus), 1) if cpus is not None else _cap(aff, limit)
    available = max(available // max(int(processes), 1), 1)
    if work_per_step is None:
        threads, reason = available, "work unknown: every available CPU"
    else:
        by_work = max(int(work_per_step // min_work_per_thread), 1)
        threads = min(available, by_work)
        if threads < available:
            reason = f"{work_per_step:.2g} FLOPs/step: {min_work_per_thread:.2g} per thread at least"
        else:
            reason = "work fills every available CPU"
    return ThreadChoice(threads, available, aff, limit, work_per_step, reason)


def choose_threads(work_per_step: float | None = None, **options: Any) -> int:
    """``min(available CPUs / processes, work_per_step // min_work_per_thread)``, at least 1.

    ``options`` are those of :func:`thread_choice` (``cpus``, ``root``, ``affinity``,
    ``min_work_per_thread``, ``processes``).
    """
    return thread_choice(work_per_step, **options).threads


def apply_threads(
    config_threads: int | None = None,
    work_per_step: float | None = None,
    *,
    cpus: int | None = None,
    root: str | Path = "/",
    processes: int = 1,
    environ: dict[str, str] | None = None,
) -> int:
    """Set torch's intra-op threads and return the count set.

    Precedence: ``config_threads`` (an explicit ``train.threads`` / ``--threads``), then the
    ``CTR_AD_THREADS`` environment variable, then :func:`choose_threads` for ``work_per_step``.
    Changing the count is process-wide: a caller that must restore it (``train()`` called from
    experiments or tests) saves ``torch.get_num_threads()`` first.
    """
    import torch

    if config_threads is not None and config_threads < 1:
        raise ValueError(f"threads={config_threads}: expected a positive integer")
    n = (
        config_threads
        or _env_threads(environ)
        or choose_threads(work_per_step, cpus=cpus, root=root, processes=processes)
    )
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
