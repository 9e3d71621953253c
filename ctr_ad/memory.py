"""What a model costs in memory per device, said before training starts.

A K-component ensemble holds K copies of every embedding table (``model.share_embeddings``: one), and
Adam keeps two more numbers per weight: with Criteo-1TB cardinalities the tables alone exceed a GPU.
:func:`estimate_memory` computes the bytes from the cardinalities and the config without allocating
anything, :func:`available_memory` says what the device has (CUDA: free memory; CPU: available RAM,
capped by a cgroup memory limit; ``train.memory_limit_gib`` or ``CTR_AD_MEMORY_LIMIT_GIB`` override
both), and :func:`check_fits` refuses a run that cannot fit in one line naming the numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ctr_ad.capacity import embedding_parameters, tower_parameters
from ctr_ad.config import Config
from ctr_ad.errors import UserError

GIB = float(1 << 30)
FLOAT_BYTES = 4
INDEX_BYTES = 8
LIMIT_ENV = "CTR_AD_MEMORY_LIMIT_GIB"
#: Fraction of the available memory the estimate may take: activations, the data and allocator
#: fragmentation need the rest.
HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device holds for the model during training."""

    embedding_parameters: int
    dense_parameters: int  # MLP weights and biases, plus the frozen anchor's buffers
    optimizer_state: int
    gradients: int
    averaged_weights: int  # the EMA copy of ``train.weight_averaging_epochs`` (0 when off)
    tables: int  # embedding tables: K, or 1 with ``model.share_embeddings``

    @property
    def parameters(self) -> int:
        return self.embedding_parameters + self.dense_parameters

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.gradients + self.averaged_weights

    def describe(self) -> str:
        parts = [f"parameters {_gib(self.parameters)} (embedding tables {_gib(self.embedding_parameters)}"
                 f" in {self.tables} table(s))", f"optimizer state {_gib(self.optimizer_state)}",
                 f"gradients {_gib(self.gradients)}"]
        if self.averaged_weights:
            parts.append(f"averaged weights {_gib(self.averaged_weights)}")
        return f"{_gib(self.total)} per device = " + " + ".join(parts)


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def estimate_memory(
    cfg: Config, cardinalities: Sequence[int], fields: Sequence[str], n_dense: int, sparse: bool
) -> MemoryEstimate:
    """The training-time bytes of the ensemble ``cfg.model`` describes on one device.

    ``sparse``: the embeddings take sparse gradients (SparseAdam / Adagrad on one process); otherwise
    one AdamW holds two moments of every weight and the embedding gradient is dense.
    """
    m, t = cfg.model, cfg.train
    k = m.components
    tables = 1 if m.share_embeddings else k
    embedding = embedding_parameters(m, cardinalities, fields)
    mlp = k * tower_parameters(len(cardinalities), n_dense, m.embedding_dim, m.mlp)
    anchor = sum(cardinalities) + n_dense + 1 if m.anchor != "none" else 0
    if sparse:
        per_weight = 1 if t.embedding_optimizer == "adagrad" else 2  # Adagrad: one sum; SparseAdam: 2 moments
        optimizer = per_weight * embedding + 2 * mlp
        # A sparse gradient holds the rows the batch gathered: values and their row indices.
        touched = k * t.batch_size * len(cardinalities)
        gradients = mlp * FLOAT_BYTES + touched * (m.embedding_dim * FLOAT_BYTES + INDEX_BYTES)
    else:
        optimizer = 2 * (embedding + mlp)
        gradients = (embedding + mlp) * FLOAT_BYTES
    averaged = (embedding + mlp) if t.weight_averaging_epochs > 0 else 0
    return MemoryEstimate(
        embedding_parameters=embedding * FLOAT_BYTES,
        dense_parameters=(mlp + anchor) * FLOAT_BYTES,
        optimizer_state=optimizer * FLOAT_BYTES,
        gradients=gradients,
        averaged_weights=averaged * FLOAT_BYTES,
        tables=tables,
    )


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None  # missing, or "max" (no limit)


def cgroup_memory_left(root: str | Path = "/") -> int | None:
    """Bytes left under this container's cgroup memory limit (v2, then v1), or None when unlimited."""
    base = Path(root) / "sys" / "fs" / "cgroup"
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(base / limit_file), _read_int(base / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes ~2⁶³ for "none"
            return max(limit - usage, 0)
    return None


def host_memory_available(root: str | Path = "/") -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, capped by the cgroup limit (None when unknown)."""
    available = None
    try:
        for line in (Path(root) / "proc" / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    left = cgroup_memory_left(root)
    if left is not None:
        available = left if available is None else min(available, left)
    return available


def available_memory(device: torch.device, limit_gib: float | None, processes: int = 1) -> tuple[int | None, str]:
    """(bytes this process may use on ``device``, where the figure comes from); None when unknown.

    ``limit_gib`` (``train.memory_limit_gib``) or the ``CTR_AD_MEMORY_LIMIT_GIB`` environment variable
    replace the measurement; host RAM is shared by the ``processes`` ranks of one machine.
    """
    if limit_gib is not None:
        return int(limit_gib * GIB), "train.memory_limit_gib"
    env = os.environ.get(LIMIT_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise UserError(f"{LIMIT_ENV}={env!r}: expected a number of GiB") from None
        if value <= 0:
            raise UserError(f"{LIMIT_ENV}={env!r}: must be > 0")
        return int(value * GIB), LIMIT_ENV
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    host = host_memory_available()
    if host is None:
        return None, "unknown"
    return host // max(processes, 1), "available RAM" + (f" / {processes} local ranks" if processes > 1 else "")


def check_fits(estimate: MemoryEstimate, available: int | None, source: str, device: torch.device) -> str:
    """The one-line summary to print; UserError when the estimate exceeds ``HEADROOM`` of ``available``."""
    if available is None:
        return f"model memory: {estimate.describe()}; the memory available on {device} is unknown"
    summary = f"model memory: {estimate.describe()}; {_gib(available)} available on {device} ({source})"
    if estimate.total > HEADROOM * available:
        raise UserError(
            f"the model does not fit: it needs {estimate.describe()}, but {device} has {_gib(available)} "
            f"available ({source}; at most {HEADROOM:.0%} of it may hold the model). Bound the tables with "
            "model.hash_buckets or model.share_embeddings, or lower model.embedding_dim / model.components"
        )
    return summary
