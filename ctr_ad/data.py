"""Model-ready Parquet → contiguous tensors, and seeded mini-batch plans over them.

Two loaders, chosen by ``data.loader`` in the config:

* ``memory`` — the split is read once into cat int64 [N, F], dense float32 [N, D], label float32 [N];
  a batch is an ``index_select`` with a slice of a seeded permutation (no per-row ``__getitem__``);
* ``stream`` — for splits larger than memory: consecutive Parquet row groups are grouped into
  buffers of about ``stream_buffer_rows`` rows; each epoch visits the buffers in a seeded order and
  shuffles rows inside a buffer exactly as the memory loader shuffles the whole split. With a shared
  data order every component reads the same buffer at the same step (batches do not cross buffers).
  With ``data_order: independent`` each component — and the shared penalty batch — has its **own**
  buffer order and its own row order inside each buffer; its epoch is the concatenation of its
  shuffled buffers, cut into batches of exactly ``batch_size`` rows (a batch may span two buffers), so
  every component has the same number of steps and the orders are as independent as the memory
  loader's. The price: each buffer is read once per stream and epoch (K + 1 reads with a penalty
  batch, K without), and up to about 2 (K + 1) buffers are resident at once.

Orders are pure functions of (seed_data, epoch, buffer, stream) — a buffer order uses buffer −1 —
so a resumed run regenerates them and skips to its step, unread: no sampler state needs saving.
With ``data_order: independent`` every component gets its own permutation (stream 1 + k) and the
batch is [K, B, ...]; when the anti-distillation penalty is active each step also carries a *shared*
batch (stream ``PENALTY``) that all components see, on which the penalty is computed.

:class:`ctr_ad.prefetch.PrefetchedBatches` runs either loader in a background thread.

Under DDP each rank takes its contiguous shard of every global batch (``torch.tensor_split``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
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
    # Arrays read zero-copy from Arrow are read-only; a tensor over them must not be written in place.
    cat, dense = np.require(cat, requirements="W"), np.require(dense, requirements="W")
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
        if spec.independent:  # each component's epoch is one stream of rows across buffers
            self.steps_per_epoch = math.ceil(self.rows / spec.batch_size)
        else:
            self.steps_per_epoch = sum(math.ceil(r / spec.batch_size) for _, r in self.buffers)

    def _read(self, groups: list[int]) -> TensorData:
        table = pq.ParquetFile(self.path).read_row_groups(groups, columns=["label", *self.cat_cols, *self.dense_cols])
        cat, dense, label = frame_to_tensors(pl.from_arrow(table), self.cat_cols, self.dense_cols)
        assert label is not None
        return TensorData(cat, dense, label)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self.spec.independent:
            yield from self._independent_batches(epoch, start_step)
            return
        order = permutation(len(self.buffers), self.spec.seed, epoch, -1, SHARED_STREAM).tolist()
        first = 0
        for buffer in order:
            groups, rows = self.buffers[buffer]
            steps = math.ceil(rows / self.spec.batch_size)
            if first + steps > start_step:  # skip buffers a resumed run has already consumed, unread
                yield from _buffer_batches(self._read(groups), self.spec, epoch, buffer, first, start_step)
            first += steps

    def _independent_batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """Per-component buffer orders: component k reads stream 1 + k, the penalty batch its own stream."""
        spec, n, b = self.spec, self.rows, self.spec.batch_size
        ks = range(spec.first_component, spec.first_component + spec.components)  # this rank's components
        streams = [_RowStream(self.buffers, spec.seed, epoch, 1 + k) for k in ks]
        penalty = None
        pb = 0
        if spec.penalty_batch_size is not None:
            penalty = _RowStream(self.buffers, spec.seed, epoch, PENALTY_STREAM)
            pb = min(spec.penalty_batch_size, n)
        cache = _BufferCache(lambda buffer: self._read(self.buffers[buffer][0]))
        for s in range(start_step, self.steps_per_epoch):
            start = s * b
            global_rows = min(b, n - start)
            lo, hi = _shard(global_rows, spec.rank, spec.world)
            parts = [cache.gather(stream.segments(start + lo, hi - lo)) for stream in streams]
            pen_data = None
            if penalty is not None:
                p_start = (s * pb) % n  # cycle through the penalty stream, wrapping at its end
                p_lo, p_hi = _shard(pb, spec.rank, spec.world)
                first = p_start + p_lo
                segments = [*penalty.segments(first, min(p_hi - p_lo, max(n - first, 0)))]
                segments += penalty.segments(max(first - n, 0), p_hi - p_lo - sum(len(x) for _, x in segments))
                pen_data = cache.gather(segments)
            # Keep only the buffers some stream reads next: at most one per stream stays resident.
            nxt = min(start + b + lo, n - 1)
            keep = {stream.buffer_at(nxt) for stream in streams}
            if penalty is not None:
                keep.add(penalty.buffer_at(((s + 1) * pb) % n))
            cache.retain(keep)
            yield Batch(
                torch.stack([p.cat for p in parts]),
                torch.stack([p.dense for p in parts]),
                torch.stack([p.label for p in parts]),
                pen_data,
                global_rows,
                s,
            )


def _shard(count: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of ``rank``'s part of ``count`` rows, as ``torch.tensor_split`` divides them."""
    q, r = divmod(count, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class _RowStream:
    """One stream's epoch over the buffers: its own buffer order, its own row order inside each."""

    def __init__(self, buffers: list[tuple[list[int], int]], seed: int, epoch: int, stream: int) -> None:
        self.seed, self.epoch, self.stream = seed, epoch, stream
        self.rows = [r for _, r in buffers]
        self.order = permutation(len(buffers), seed, epoch, -1, stream).tolist()
        self.starts = [0, *itertools.accumulate(self.rows[buffer] for buffer in self.order)]
        self._perms: dict[int, Tensor] = {}

    def buffer_at(self, position: int) -> int:
        return self.order[bisect.bisect_right(self.starts, position) - 1]

    def segments(self, position: int, count: int) -> list[tuple[int, Tensor]]:
        """(buffer, rows inside it) covering ``count`` rows of the stream from ``position`` on."""
        out: list[tuple[int, Tensor]] = []
        i = bisect.bisect_right(self.starts, position) - 1
        while count > 0:
            buffer = self.order[i]
            local = position - self.starts[i]
            take = min(count, self.rows[buffer] - local)
            perm = self._perms.get(buffer)
            if perm is None:
                self._perms = {buffer: permutation(self.rows[buffer], self.seed, self.epoch, buffer, self.stream)}
                perm = self._perms[buffer]
            out.append((buffer, perm[local : local + take]))
            position, count, i = position + take, count - take, i + 1
        return out


class _BufferCache:
    """Decoded buffers shared by the streams of one epoch: read once while any stream is inside them."""

    def __init__(self, read: Callable[[int], TensorData]) -> None:
        self.read = read
        self.held: dict[int, TensorData] = {}

    def gather(self, segments: list[tuple[int, Tensor]]) -> TensorData:
        parts = []
        for buffer, rows in segments:
            if buffer not in self.held:
                self.held[buffer] = self.read(buffer)
            parts.append(self.held[buffer].take(rows))
        if len(parts) == 1:
            return parts[0]
        return TensorData(*(torch.cat(t) for t in zip(*((p.cat, p.dense, p.label) for p in parts))))

    def retain(self, buffers: set[int]) -> None:
        self.held = {b: d for b, d in self.held.items() if b in buffers}


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
