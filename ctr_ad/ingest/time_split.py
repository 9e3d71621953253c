"""The chronological split (``--split time``): train on the earliest rows, test on the latest.

A pre-pass parses every block and counts the valid rows per distinct time value (memory grows with
the number of distinct times, not of rows). The cuts are the times of the rows at ranks
``n_train`` and ``n_train + n_valid`` in time order; a row goes to train when its time is before the
first cut, to valid before the second, to test otherwise. Rows sharing a time always land in the
same split, so with ties the split sizes differ slightly from the fractions (the manifest records
the real sizes). Rows keep their file order within each split.
"""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

import polars as pl

from ctr_ad.errors import UserError
from ctr_ad.ingest.executor import ordered_map
from ctr_ad.ingest.options import IngestOptions
from ctr_ad.ingest.reader import Layout, iter_blocks, parse_block

#: Merge partial counts once this many are pending (bounds memory by the distinct times).
MERGE_EVERY = 16


def _block_time_counts(layout: Layout, first_line: int, block, long_lines) -> pl.DataFrame:
    frame = parse_block(layout, first_line, block, long_lines).frame
    return frame.group_by("_time").agg(pl.len().cast(pl.Int64).alias("n"))


def _merge(parts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(parts).group_by("_time").agg(pl.col("n").sum())


def time_cuts(inputs: list[Path], layouts: list[Layout], opts: IngestOptions, block_bytes: int,
              pool: Executor, window: int) -> tuple[float, float]:
    """The (valid_from, test_from) times of a chronological split of the valid rows of ``inputs``."""
    def tasks():
        for path, lay in zip(inputs, layouts, strict=True):
            for first_line, block, long_lines in iter_blocks(path, lay, block_bytes):
                yield lay, first_line, block, long_lines

    parts: list[pl.DataFrame] = []
    for counts in ordered_map(_block_time_counts, tasks(), pool, window):
        parts.append(counts)
        if len(parts) >= MERGE_EVERY:
            parts = [_merge(parts)]
    if not parts:
        raise UserError(f"{', '.join(map(str, inputs))}: no rows")
    table = _merge(parts).sort("_time").with_columns(upto=pl.col("n").cum_sum())
    total = int(table.get_column("n").sum())
    n_test, n_valid = round(total * opts.test_frac), round(total * opts.valid_frac)
    n_train = total - n_valid - n_test
    if total == 0:
        raise UserError(f"{', '.join(map(str, inputs))}: no valid rows")

    def time_at_rank(rank: int) -> float:
        """Time of the row at 0-based ``rank`` in time order (+inf past the last row)."""
        if rank >= total:
            return float("inf")
        return float(table.filter(pl.col("upto") > rank).get_column("_time")[0])

    valid_from = time_at_rank(n_train)
    test_from = time_at_rank(n_train + n_valid)
    if valid_from <= float(table.get_column("_time")[0]):
        raise UserError(f"{', '.join(map(str, inputs))}: --split time leaves no training rows (the "
                        f"earliest {n_train} rows share one time); lower --valid-frac/--test-frac")
    return valid_from, test_from
