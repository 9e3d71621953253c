"""Model-ready Parquet → contiguous tensors, and seeded mini-batch plans over them.

Two loaders, chosen by ``data.loader`` in the config:

* ``memory`` — the split is read once into cat int64 [N, F], dense float32 [N, D], label float32 [N];
  a batch is an ``index_select`` with a slice of a seeded permutation (no per-row ``__getitem__``);
* ``stream`` — for splits larger than memory: consecutive Parquet row groups are grouped into
  buffers of about ``stream_buffer_rows`` rows; each epoch visits the buffers in a seeded order and
  shuffles rows inside a buffer exactly as the memory loader shuffles the whole split.

Orders are pure functions of (seed_data, epoch, buffer, stream), so a resumed run regenerates them
and skips to its step — no sampler state needs saving. With ``data_order: independent`` every
component gets its own permutation (stream 1 + k) and the batch is [K, B, ...]; when the
anti-distillation penalty is active each step also carries a *shared* batch (stream ``PENALTY``)
that all components see, on which the penalty is computed.

Under DDP each rank takes its contiguous shard of every global batch (``torch.tensor_split``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch
from torch import Tensor

from ctr_ad.errors import UserError

SHARED_STREAM = 0
PENALTY_STREAM = 1_000_000  # far from the per-component streams 1..K


@dataclass
class TensorData:
    """One split in memory: cat int64 [N, F], dense float32 [N, D], label float32 [N]."""

    cat: Tensor
    dense: Tensor
    label: Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(self.cat.to(device), self.dense.to(device), self.label.to(device))

    def take(self, index: Tensor) -> TensorData:
        """Rows ``index`` ([B] or [K, B]) → tensors [B, ...] or [K, B, ...]."""
        flat = index.reshape(-1)
        shape = tuple(index.shape)
        return TensorData(
            self.cat.index_select(0, flat).reshape(*shape, self.cat.shape[1]),
            self.dense.index_select(0, flat).reshape(*shape, self.dense.shape[1]),
            self.label.index_select(0, flat).reshape(shape),
        )


def _check_columns(names: Sequence[str], wanted: Sequence[str], origin: str) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise UserError(f"{origin}: missing model columns {missing[:5]}{' …' if len(missing) > 5 else ''}")


def frame_to_tensors(
    frame: pl.DataFrame, cat_cols: Sequence[str], dense_cols: Sequence[str], origin: str = "frame"
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(cat int64 [N, F], dense float32 [N, D], label float32 [N] or None) from a model-ready frame."""
    from ctr_ad.features import model_arrays  # the frame -> arrays step of FeatureProcessor.encode

    _check_columns(frame.columns, [*cat_cols, *dense_cols], origin)
    cat, dense = model_arrays(frame, cat_cols, dense_cols)
    label = None
    if "label" in frame.columns:
        label = torch.from_numpy(frame["label"].cast(pl.Float32).to_numpy().copy())
    return torch.from_numpy(cat), torch.from_numpy(dense), label


def load_split(path: Path, cat_cols: Sequence[str], dense_cols: Sequence[str]) -> TensorData:
    """Read a model-ready Parquet split into memory."""
    if not path.is_file():
        raise UserError(f"{path}: split not found (run `ctr-ad ingest` first)")
    frame = pl.read_parquet(path, columns=["label", *cat_cols, *dense_cols])
    cat, dense, label = frame_to_tensors(frame, cat_cols, dense_cols, origin=str(path))
    assert label is not None
    return TensorData(cat, dense, label)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, buffer, stream)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)
    return int(state[0]) >> 1


def permutation(n: int, *seed_parts: int) -> Tensor:
    g = torch.Generator().manual_seed(derive_seed(*seed_parts))
    return torch.randperm(n, generator=g)


@dataclass
class Batch:
    """One training step's rows (this rank's shard).

    ``cat``/``dense``/``label`` are [B, ...] with a shared order or [K, B, ...] with independent
    orders; ``penalty`` (optional) holds rows every component sees, for the anti-distillation penalty.
    ``global_rows`` is the size of the global batch (all ranks) per component.
    """

    cat: Tensor
    dense: Tensor
    label: Tensor
    penalty: TensorData | None
    global_rows: int
    step_in_epoch: int


@dataclass(frozen=True)
class PlanSpec:
    batch_size: int
    components: int
    independent: bool
    penalty_batch_size: int | None  # None: no shared penalty batch needed
    seed: int
    rank: int = 0
    world: int = 1
    #: Component parallelism: this rank's components are ``first_component .. first_component +
    #: components - 1`` of the ensemble, so it draws exactly their orders (streams 1 + k).
    first_component: int = 0


def _buffer_batches(
    data: TensorData, spec: PlanSpec, epoch: int, buffer: int, first_step: int, start_step: int
) -> Iterator[Batch]:
    """Batches of one in-memory buffer; ``first_step`` is the epoch step of its first batch."""
    n = len(data)
    b = spec.batch_size
    steps = math.ceil(n / b)
    if spec.independent:
        ks = range(spec.first_component, spec.first_component + spec.components)
        perm = torch.stack([permutation(n, spec.seed, epoch, buffer, 1 + k) for k in ks])
    else:
        perm = permutation(n, spec.seed, epoch, buffer, SHARED_STREAM)
    pen_perm = None
    if spec.penalty_batch_size is not None:
        pen_perm = permutation(n, spec.seed, epoch, buffer, PENALTY_STREAM)
    for s in range(max(0, start_step - first_step), steps):
        rows = perm[..., s * b : (s + 1) * b]
        global_rows = rows.shape[-1]
        rows = torch.tensor_split(rows, spec.world, dim=-1)[spec.rank]
        part = data.take(rows)
        penalty = None
        if pen_perm is not None:
            pb = min(spec.penalty_batch_size or b, n)
            start = (s * pb) % n
            # Cycle through the penalty permutation; wrap around at its end.
            pen_rows = torch.cat([pen_perm[start : start + pb], pen_perm[: max(0, start + pb - n)]])
            penalty = data.take(torch.tensor_split(pen_rows, spec.world)[spec.rank])
        yield Batch(part.cat, part.dense, part.label, penalty, global_rows, first_step + s)


class MemoryBatches:
    """Seeded mini-batches over a split held in memory."""

    def __init__(self, data: TensorData, spec: PlanSpec) -> None:
        if len(data) == 0:
            raise UserError("training split is empty")
        self.data = data
        self.spec = spec
        self.steps_per_epoch = math.ceil(len(data) / spec.batch_size)
        self.rows = len(data)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        yield from _buffer_batches(self.data, self.spec, epoch, 0, 0, start_step)


class StreamBatches:
    """Seeded mini-batches read buffer by buffer (groups of Parquet row groups) from disk."""

    def __init__(
        self,
        path: Path,
        cat_cols: Sequence[str],
        dense_cols: Sequence[str],
        spec: PlanSpec,
        buffer_rows: int,
    ) -> None:
        if not path.is_file():
            raise UserError(f"{path}: split not found (run `ctr-ad ingest` first)")
        self.path = path
        self.cat_cols = list(cat_cols)
        self.dense_cols = list(dense_cols)
        self.spec = spec
        meta = pq.ParquetFile(path).metadata
        _check_columns(meta.schema.names, ["label", *self.cat_cols, *self.dense_cols], str(path))
        self.buffers: list[tuple[list[int], int]] = []
        groups: list[int] = []
        rows = 0
        for i in range(meta.num_row_groups):
            groups.append(i)
            rows += meta.row_group(i).num_rows
            if rows >= buffer_rows:
                self.buffers.append((groups, rows))
                groups, rows = [], 0
        if groups:
            self.buffers.append((groups, rows))
        self.rows = sum(r for _, r in self.buffers)
        if self.rows == 0:
            raise UserError(f"{path}: training split is empty")
        self.steps_per_epoch = sum(math.ceil(r / spec.batch_size) for _, r in self.buffers)

    def _read(self, groups: list[int]) -> TensorData:
        table = pq.ParquetFile(self.path).read_row_groups(groups, columns=["label", *self.cat_cols, *self.dense_cols])
        cat, dense, label = frame_to_tensors(pl.from_arrow(table), self.cat_cols, self.dense_cols)
        assert label is not None
        return TensorData(cat, dense, label)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = permutation(len(self.buffers), self.spec.seed, epoch, -1, SHARED_STREAM).tolist()
        first = 0
        for buffer in order:
            groups, rows = self.buffers[buffer]
            steps = math.ceil(rows / self.spec.batch_size)
            if first + steps > start_step:  # skip buffers a resumed run has already consumed, unread
                yield from _buffer_batches(self._read(groups), self.spec, epoch, buffer, first, start_step)
            first += steps


def iter_eval_chunks(
    source: TensorData | Path, cat_cols: Sequence[str], dense_cols: Sequence[str], chunk_rows: int
) -> Iterator[TensorData]:
    """Sequential chunks of an evaluation split, from memory or streamed from Parquet."""
    if isinstance(source, TensorData):
        for start in range(0, len(source), chunk_rows):
            end = start + chunk_rows
            yield TensorData(source.cat[start:end], source.dense[start:end], source.label[start:end])
        return
    pf = pq.ParquetFile(source)
    for record_batch in pf.iter_batches(batch_size=chunk_rows, columns=["label", *cat_cols, *dense_cols]):
        cat, dense, label = frame_to_tensors(pl.from_arrow(record_batch), cat_cols, dense_cols)
        assert label is not None
        yield TensorData(cat, dense, label)
