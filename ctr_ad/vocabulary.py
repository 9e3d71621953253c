"""Exact categorical value counts in bounded memory, and the vocabularies chosen from them.

Counting. Every block of training rows contributes per-field ``(value, count)`` frames. They are
merged in memory while the merged counts fit a memory budget; past it, all merged counts are written
to disk as one *run*, hash-partitioned by value into :data:`PARTITIONS` Arrow files, and memory starts
empty again. When the vocabularies are asked for, each partition is merged on its own (a group-by sum
over its runs): a value always falls in the same partition, so those sums are the exact totals, and
merging needs memory for about two partitions' distinct values (2/64 of the total: two are merged at
a time, on threads), not all of them.

Selection, the same whichever way the counts were held: the values seen at least ``min_count`` times,
ordered by count (descending) then by value (ascending, byte order of the UTF-8 text). That order is
total (a value appears once per field), so a cap of N keeps exactly the N first: the most frequent
values, ties at the cut broken in favour of the smaller value. Everything else is out-of-vocabulary.
Only the kept values (at most N per capped field) are held while partitions are merged.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from ctr_ad import native
from ctr_ad.errors import UserError
from ctr_ad.ingest.executor import ordered_map

#: Hash partitions of a spilled run; merging holds two partitions at a time (≈ 2/64 of the distinct values).
PARTITIONS = 64
#: Per-field count frames are merged once this many are pending (bounds their number, not their size).
MERGE_EVERY = 4
#: Spilled partitions are merged once this many runs are pending.
MERGE_RUNS_EVERY = 8
#: Fixed seed of the partition hash: where a value is spilled never changes the result, but a fixed
#: seed keeps the spill files themselves reproducible for debugging.
PARTITION_SEED = 0x5EED
COUNT_SCHEMA = {"value": pl.String, "count": pl.Int64}
SPILL_SCHEMA = {"field": pl.UInt16, **COUNT_SCHEMA}


def check_caps(max_vocab: object) -> int | dict[str, int] | None:
    """The shape of a ``max_vocab`` option: None, a whole number >= 1, or a mapping of field name to
    one; ValueError naming the bad field otherwise (field names are checked by :func:`resolve_max_vocab`)."""
    if max_vocab is None:
        return None

    def whole(n: object) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if isinstance(max_vocab, Mapping):
        for f, n in max_vocab.items():
            if not isinstance(f, str):
                raise ValueError(f"field names must be text (got {f!r})")
            if not whole(n):
                raise ValueError(f"field {f!r}: the cap must be a whole number of at least 1 (got {n!r})")
        return dict(max_vocab)
    if not whole(max_vocab):
        raise ValueError(f"expected a whole number of at least 1 or a mapping of field: number (got {max_vocab!r})")
    return max_vocab  # type: ignore[return-value]


def resolve_max_vocab(max_vocab: int | Mapping[str, int] | None, categorical: list[str],
                      origin: str = "max_vocab") -> dict[str, int]:
    """Per-field caps from an option: None = no cap, an int caps every categorical field, a mapping
    caps the fields it names. A field the source lacks or a cap below 1 is a UserError naming it."""
    try:
        checked = check_caps(max_vocab)
    except ValueError as exc:
        raise UserError(f"{origin}: {exc}") from None
    if checked is None:
        return {}
    if isinstance(checked, int):
        return dict.fromkeys(categorical, checked)
    unknown = [f for f in checked if f not in categorical]
    if unknown:
        raise UserError(f"{origin}: unknown categorical field {unknown[0]!r} (the fields are "
                        f"{', '.join(categorical)})")
    return {f: checked[f] for f in categorical if f in checked}


def select_vocab(counts: pl.DataFrame, min_count: int, cap: int | None) -> pl.DataFrame:
    """``counts`` (value, count; one row per value) -> the vocabulary rows, in vocabulary order."""
    kept = counts.filter(pl.col("count") >= min_count).sort(["count", "value"], descending=[True, False])
    return kept.head(cap) if cap is not None else kept


def encoded_counts(values: pl.Series, counted: np.ndarray | None = None
                   ) -> tuple[pl.DataFrame, pl.Series, np.ndarray]:
    """With the compiled kernels: ``(value, count)`` of a column's values among the ``counted`` rows
    (None: all; values never counted left out), with the column dictionary-encoded as
    :func:`ctr_ad.native.encode_values` gives it (distinct values, each row's code)."""
    distinct, counts, codes = native.encode_values(values.cast(pl.Utf8), counted)
    seen = counts > 0
    frame = pl.DataFrame([distinct.filter(pl.Series(seen)).alias("value"),
                          pl.Series("count", counts[seen], dtype=pl.Int64)])
    return frame, distinct, codes


class CategoryCounter:
    """Exact streaming value counts of the categorical fields.

    ``spill_dir`` + ``memory_budget_bytes``: merged counts larger than the budget go to disk (see the
    module docstring); without them every count stays in memory. The vocabularies are identical
    either way. :meth:`close` removes the spill files.
    """

    def __init__(self, fields: list[str], spill_dir: Path | None = None,
                 memory_budget_bytes: int | None = None) -> None:
        if (spill_dir is None) != (memory_budget_bytes is None):
            raise ValueError("spill_dir and memory_budget_bytes go together")
        self.fields = list(fields)
        self._parts: dict[str, list[pl.DataFrame]] = {f: [] for f in self.fields}
        self._sizes: dict[str, int] = dict.fromkeys(self.fields, 0)
        self._spill_dir = spill_dir
        self._budget = memory_budget_bytes
        self._runs = 0

    @staticmethod
    def block_counts(frame: pl.DataFrame, fields: list[str]) -> dict[str, pl.DataFrame]:
        """Per field, ``(value, count)`` of the block's non-null values (rows in no set order).

        One group-by query per field, all collected together so polars runs them side by side
        (a third of the time of one ``value_counts`` after another). With the compiled kernels
        (:mod:`ctr_ad.native`), one hash-count pass per column instead: the values come out in
        order of first occurrence."""
        if native.available():
            return {f: encoded_counts(frame.get_column(f))[0] for f in fields}
        lazy = frame.lazy()
        queries = [lazy.select(pl.col(f).alias("value")).drop_nulls().group_by("value")
                   .agg(pl.len().cast(pl.Int64).alias("count")) for f in fields]
        return dict(zip(fields, pl.collect_all(queries), strict=True))

    @property
    def spilled_runs(self) -> int:
        """How many runs went to disk so far (0: everything is in memory)."""
        return self._runs

    def add_counts(self, counts: dict[str, pl.DataFrame]) -> None:
        due = []
        for f, part in counts.items():
            if part.schema != COUNT_SCHEMA:
                part = part.cast(COUNT_SCHEMA)
            self._parts[f].append(part)
            self._sizes[f] += part.estimated_size()
            if len(self._parts[f]) >= MERGE_EVERY:
                due.append(f)
        # The due fields merged in one polars call, side by side, not one group-by after another.
        for f, merged in zip(due, pl.collect_all([self._merge_query(f) for f in due]), strict=True):
            self._parts[f] = [merged]
            self._sizes[f] = merged.estimated_size()
        if self._budget is not None and sum(self._sizes.values()) > self._budget:
            self._spill()

    def add(self, frame: pl.DataFrame) -> None:
        self.add_counts(self.block_counts(frame, self.fields))

    def _merged(self, f: str) -> pl.DataFrame:
        parts = self._parts[f]
        if not parts:
            return pl.DataFrame(schema=COUNT_SCHEMA)
        if len(parts) == 1:
            return parts[0]
        return self._merge_query(f).collect()

    def _merge_query(self, f: str) -> pl.LazyFrame:
        return pl.concat([p.lazy() for p in self._parts[f]]).group_by("value").agg(pl.col("count").sum())

    # ----------------------------------------------------------------------------- spilling
    def _run_path(self, run: int) -> Path:
        assert self._spill_dir is not None
        return self._spill_dir / f"counts-{run:05d}.arrow"

    def _spill(self) -> None:
        """Write every count held in memory as one run, then forget it. A run is one Arrow IPC file
        with one record batch per hash partition (batch p = partition p, empty when it has none), so
        merging reads a partition of every run without reading the rest."""
        assert self._spill_dir is not None
        frames = []
        for i, f in enumerate(self.fields):
            merged = self._merged(f)
            if merged.height:
                frames.append(merged.select(pl.lit(i, dtype=pl.UInt16).alias("field"), "value", "count"))
            self._parts[f] = []
            self._sizes[f] = 0
        if not frames:
            return
        run = pl.concat(frames)
        del frames
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        partition = (pl.col("value").hash(seed=PARTITION_SEED) % PARTITIONS).alias("_partition")
        pieces = run.with_columns(partition).partition_by("_partition", as_dict=True, include_key=False)
        del run
        schema = pl.DataFrame(schema=SPILL_SCHEMA).to_arrow().schema
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        with (pa.OSFile(str(self._run_path(self._runs)), "wb") as sink,
              pa.ipc.new_file(sink, schema, options=options) as writer):
            for p in range(PARTITIONS):
                piece = pieces.pop((p,), None)
                if piece is None:
                    writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
                else:
                    writer.write_batch(piece.to_arrow().cast(schema).combine_chunks().to_batches()[0])
        self._runs += 1

    def _merged_partition(self, partition: int) -> pl.DataFrame:
        """Exact counts of one partition over every run: (field, value, count), a row per value.

        Each call opens the runs itself (an IPC file reader is not shared between threads), with
        plain reads, not memory maps: every mapped page a partition touched would stay in the
        process's RSS, so a merge over all partitions grew to the size of all the runs."""
        acc: list[pl.DataFrame] = []
        for run in range(self._runs):
            with pa.OSFile(str(self._run_path(run))) as file:
                batch = pa.ipc.open_file(file).get_batch(partition)
            if batch.num_rows:
                acc.append(pl.from_arrow(batch))
            if len(acc) >= MERGE_RUNS_EVERY:
                acc = [_sum_counts(acc)]
        return _sum_counts(acc) if acc else pl.DataFrame(schema=SPILL_SCHEMA)

    # ----------------------------------------------------------------------------- vocabularies
    def vocabularies(self, min_count: int, caps: Mapping[str, int] | None = None) -> dict[str, list[str]]:
        """Per field, the values seen at least ``min_count`` times, most frequent first, ties by
        value, at most ``caps[field]`` of them."""
        caps = dict(caps or {})
        fields = self.fields
        if self._runs == 0:
            return {f: select_vocab(self._merged(f), min_count, caps.get(f)).get_column("value").to_list()
                    for f in fields}
        self._spill()  # the rest too: every count now lives in exactly one partition of the runs
        wanted = dict(enumerate(fields))
        kept: dict[str, list[pl.DataFrame]] = {f: [] for f in fields}
        kept_rows: dict[str, int] = dict.fromkeys(fields, 0)
        # Two partitions merged at a time, on threads (polars and Arrow release the GIL): the merge
        # runs while the rest of the ingest waits, and holds 2/64 of the values, not 1/64. Results
        # are taken in partition order, so the vocabularies never depend on timing.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="count-merge") as pool:
            for merged in ordered_map(self._merged_partition, ((p,) for p in range(PARTITIONS)), pool, 2):
                self._select_partition(merged, min_count, caps, wanted, kept, kept_rows)
        out = {}
        for f in fields:
            counts = pl.concat(kept[f]) if kept[f] else pl.DataFrame(schema=COUNT_SCHEMA)
            out[f] = select_vocab(counts, min_count, caps.get(f)).get_column("value").to_list()
        return out

    @staticmethod
    def _select_partition(merged: pl.DataFrame, min_count: int, caps: dict[str, int], wanted: dict[int, str],
                          kept: dict[str, list[pl.DataFrame]], kept_rows: dict[str, int]) -> None:
        """Add one merged partition's candidates to ``kept``, trimming capped fields as they grow."""
        merged = merged.filter(pl.col("count") >= min_count)
        for (i,), piece in merged.partition_by("field", as_dict=True, include_key=False).items():
            f = wanted[int(i)]
            kept[f].append(piece)
            kept_rows[f] += piece.height
            cap = caps.get(f)
            if cap is not None and kept_rows[f] > 2 * cap:  # hold at most ~2 caps per field
                top = select_vocab(pl.concat(kept[f]), min_count, cap)
                kept[f], kept_rows[f] = [top], top.height

    def close(self) -> None:
        """Forget every count and remove the spill files (and their directory)."""
        self._parts = {f: [] for f in self.fields}
        self._sizes = dict.fromkeys(self.fields, 0)
        if self._spill_dir is not None and self._runs:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
        self._runs = 0


def _sum_counts(frames: list[pl.DataFrame]) -> pl.DataFrame:
    if len(frames) == 1:
        return frames[0]
    return pl.concat(frames).group_by(["field", "value"]).agg(pl.col("count").sum())
