"""Streaming ingest: raw logs -> ``train/valid/test.parquet`` + ``features.json`` + manifest + quarantine.

Two passes over bounded blocks of lines, so memory does not grow with the input:
1. parse and validate every block (quarantining bad lines), decide each row's split from its
   position among the data lines (sequential: the latest lines are the test split; random: a seeded
   hash of the position; files: one file per split), count the categorical values and dense moments
   of its training rows, and spill the typed block to a temporary Arrow file;
2. fit the feature processor from the merged counts (training rows only), transform every spilled
   block and append it to its split file.
A sequential split needs the number of data lines first: a quick pre-pass counts newlines.
Blocks are independent, so both passes run on ``workers`` processes; the main process merges their
results in block order, so the output is byte-identical for any worker count.
Outputs are written under temporary names and renamed at the end: an interrupted run never leaves a
file that looks complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ctr_ad import __version__
from ctr_ad.errors import UserError
from ctr_ad.features import CategoryCounter, DenseStats, FeatureProcessor
from ctr_ad.hashing import sha256_file
from ctr_ad.ingest.reader import (
    DEFAULT_BLOCK_BYTES,
    Layout,
    iter_line_blocks,
    open_binary,
    open_source,
    parse_block,
)
from ctr_ad.schema import get_source

SPLITS = ("train", "valid", "test")
SPLIT_MODES = ("sequential", "random", "files")
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class SplitPlan:
    """How rows are assigned to splits: a pure function of a row's data-line position."""

    mode: str
    seed: int
    train_lines: int  # sequential: data lines [0, train_lines) are train,
    valid_lines: int  # the next valid_lines are valid, the rest test
    valid_frac: float
    test_frac: float

    def codes(self, positions: np.ndarray, file_index: int) -> np.ndarray:
        """0 = train, 1 = valid, 2 = test for rows at global data-line ``positions``."""
        if self.mode == "files":
            return np.full(len(positions), file_index, dtype=np.int8)
        idx = positions.astype(np.uint64)
        if self.mode == "sequential":
            return np.where(idx < self.train_lines, 0,
                            np.where(idx < self.train_lines + self.valid_lines, 1, 2)).astype(np.int8)
        # splitmix64 of (seed, position): a fixed-seed uniform per row that no block size can change.
        with np.errstate(over="ignore"):
            z = idx + np.uint64(0x9E3779B97F4A7C15) * np.uint64(self.seed + 1)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return np.where(u < self.test_frac, 2, np.where(u < self.test_frac + self.valid_frac, 1, 0)).astype(np.int8)


@dataclass(frozen=True)
class BlockTask:
    layout: Layout
    first_line: int
    block: bytes
    spill: str
    file_index: int
    line_offset: int  # global data-line position of the file's first data line


# --------------------------------------------------------------------------------------- workers
def _worker_init() -> None:
    # Worker processes split the cores between them: one polars thread each avoids oversubscription.
    os.environ["POLARS_MAX_THREADS"] = "1"


def _parse_count_spill(task: BlockTask, plan: SplitPlan, categorical: list[str], dense: list[str],
                       transform: str) -> tuple[int, list[int], int, list, dict, tuple]:
    """Pass 1 on one block: validate, assign splits, count the training rows, spill."""
    parsed = parse_block(task.layout, task.first_line, task.block)
    frame = parsed.frame
    positions = frame.get_column("_line").to_numpy() - task.layout.first_data_line + task.line_offset
    codes = plan.codes(positions, task.file_index)
    frame = frame.with_columns(_split=pl.Series(codes, dtype=pl.Int8))
    train = frame.filter(pl.col("_split") == 0) if (codes != 0).any() else frame
    counts = CategoryCounter.block_counts(train, categorical)
    stats = DenseStats(dense, transform).block_stats(train)
    # Arrow IPC, uncompressed: the cheapest format to read back once.
    frame.write_ipc(task.spill, compression="uncompressed")
    per_split = np.bincount(codes, minlength=len(SPLITS)).tolist()
    return frame.height, per_split, parsed.lines_read, parsed.quarantine, counts, stats


@functools.lru_cache(maxsize=2)
def _load_features(path: str) -> FeatureProcessor:
    # Loaded once per process: its lookup tables are built on first use and reused for every block.
    return FeatureProcessor.load(path)


def _transform_block(spill: str, features_path: str) -> list[pl.DataFrame]:
    """Pass 2 on one block: model-ready columns, cut by split."""
    fp = _load_features(features_path)
    frame = pl.read_ipc(spill)
    codes = frame.get_column("_split")
    model = fp.transform(frame)
    if codes.n_unique() == 1:  # a whole block in one split (sequential/files): no filtering copies
        only = int(codes[0]) if len(codes) else 0
        return [model if i == only else model.clear() for i in range(len(SPLITS))]
    return [model.filter(codes == i) for i in range(len(SPLITS))]


def count_data_lines(path: Path, layout: Layout) -> int:
    """Data lines of a file (header excluded), counted from raw bytes without parsing."""
    lines = 0
    last = b"\n"
    with open_binary(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1
    return max(lines - (layout.first_data_line - 1), 0)


# --------------------------------------------------------------------------------------- helpers
def _ordered_map(fn: Callable, args: Iterable[tuple], pool: ProcessPoolExecutor | None,
                 window: int) -> Iterator[Any]:
    """``map(fn, args)`` in order, on ``pool`` if given, with at most ``window`` tasks in flight."""
    if pool is None:
        for a in args:
            yield fn(*a)
        return
    pending: list[Future] = []
    for a in args:
        pending.append(pool.submit(fn, *a))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


def reason_kind(reason: str) -> str:
    """Group quarantine reasons for a summary: drop the offending values."""
    kind = re.sub(r"found \d+", "found other", reason)
    return re.sub(r"^((?:field|label) \S+): .* (is not .*)$", r"\1 \2", kind)


def _quarantine_summary(by_kind: Counter, examples: list[dict], read: int, bad: int, limit: float) -> str:
    lines = [f"{bad} of {read} rows ({bad / max(read, 1):.2%}) are malformed, above --max-bad-fraction "
             f"{limit:.2%}. Most common reasons:"]
    lines += [f"  {n:>8}  {k}" for k, n in by_kind.most_common(5)]
    lines += ["First bad lines:"]
    lines += [f"  {e['file']}:{e['line']}: {e['reason']}" for e in examples[:5]]
    lines += ["All bad lines are listed in quarantine.jsonl; raise --max-bad-fraction to accept them."]
    return "\n".join(lines)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[ingest] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- main
def run_ingest(
    inputs: list[Path],
    source: str,
    out: Path,
    split: str = "sequential",
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    min_count: int = 2,
    seed: int = 0,
    max_bad_fraction: float = 0.01,
    workers: int = 1,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    quiet: bool = False,
) -> dict:
    """Ingest ``inputs`` into ``out``; returns the manifest (also written to ``out/manifest.json``)."""
    started = time.time()
    spec = get_source(source)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("no input files")
    if split not in SPLIT_MODES:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLIT_MODES)}")
    if split == "files" and len(inputs) != 3:
        raise UserError("--split files takes exactly 3 inputs: train, valid, test (in that order)")
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise UserError("--valid-frac and --test-frac must be in [0, 1) and sum to less than 1")
    if min_count < 1:
        raise UserError("--min-count must be at least 1")
    layouts = [open_source(p, spec) for p in inputs]
    for lay in layouts:
        if lay.label is None:
            raise UserError(f"{lay.path}: no label column; ingest needs labeled logs "
                            f"(score unlabeled logs with `ctr-ad predict`)")
        if lay.dense != layouts[0].dense:
            raise UserError(f"{lay.path}: dense columns differ from {layouts[0].path}")
    dense = list(layouts[0].dense)

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".ingest-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init)
            if workers > 1 else None)
    window = max(2 * workers, 2)
    try:
        # ---- pass 1: parse, validate, split, count the training rows, spill
        _log(f"reading {len(inputs)} file(s) as {source} with {workers} worker(s)", quiet)
        line_offsets = [0] * len(inputs)
        plan = SplitPlan(split, seed, 0, 0, valid_frac, test_frac)
        if split == "sequential":
            data_lines = [count_data_lines(p, lay) for p, lay in zip(inputs, layouts, strict=True)]
            line_offsets = [sum(data_lines[:i]) for i in range(len(inputs))]
            total = sum(data_lines)
            n_test, n_valid = round(total * test_frac), round(total * valid_frac)
            plan = SplitPlan(split, seed, total - n_valid - n_test, n_valid, valid_frac, test_frac)
        file_stats = [{"path": str(p), "rows_read": 0, "rows_written": 0, "rows_quarantined": 0}
                      for p in inputs]
        spills: list[str] = []
        split_rows = dict.fromkeys(SPLITS, 0)
        by_kind: Counter = Counter()
        examples: list[dict] = []
        counter = CategoryCounter(list(spec.categorical))
        stats = DenseStats(dense, spec.dense_transform)
        quarantine_tmp = tmp / "quarantine.jsonl"

        task_files: list[int] = []

        def tasks() -> Iterator[tuple]:
            for fi, (path, lay) in enumerate(zip(inputs, layouts, strict=True)):
                offset = line_offsets[fi]
                if split != "sequential":  # positions only need to be distinct and stable
                    offset = fi << 40
                for first_line, block in iter_line_blocks(path, block_bytes):
                    spill = str(tmp / f"spill-{len(spills):06d}.arrow")
                    spills.append(spill)
                    task_files.append(fi)
                    task = BlockTask(lay, first_line, block, spill, fi, offset)
                    yield task, plan, list(spec.categorical), dense, spec.dense_transform

        with open(quarantine_tmp, "w", encoding="utf-8") as qf:
            for i, result in enumerate(_ordered_map(_parse_count_spill, tasks(), pool, window)):
                good, per_split, read, bad, counts, block_stats = result
                fi = task_files[i]
                counter.add_counts(counts)
                stats.add_stats(block_stats)
                for name, n in zip(SPLITS, per_split, strict=True):
                    split_rows[name] += n
                fs = file_stats[fi]
                fs["rows_read"] += read
                fs["rows_written"] += good
                fs["rows_quarantined"] += len(bad)
                for rec in bad:
                    qf.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    by_kind[reason_kind(rec["reason"])] += 1
                    if len(examples) < 5:
                        examples.append(rec)
        shutil.move(str(quarantine_tmp), str(out / "quarantine.jsonl"))
        rows_read = sum(f["rows_read"] for f in file_stats)
        rows_bad = sum(f["rows_quarantined"] for f in file_stats)
        n_rows = sum(f["rows_written"] for f in file_stats)
        for fs in file_stats:
            assert fs["rows_read"] == fs["rows_written"] + fs["rows_quarantined"], fs
        _log(f"read {rows_read} rows: {n_rows} valid, {rows_bad} quarantined", quiet)
        if rows_bad > max_bad_fraction * rows_read:
            raise UserError(_quarantine_summary(by_kind, examples, rows_read, rows_bad, max_bad_fraction))
        if n_rows == 0:
            raise UserError(f"{', '.join(map(str, inputs))}: no valid rows")
        fp = FeatureProcessor.fit_from(source, spec, dense, counter, stats, min_count)
        _log("fitted features: vocab sizes " + ", ".join(
            f"{c}={n}" for c, n in zip(fp.categorical_columns, fp.cardinalities, strict=True)), quiet)

        # ---- pass 2: transform and write the splits
        writers: dict[str, pq.ParquetWriter] = {}
        schema: pa.Schema | None = None
        features_path = str(tmp / "features.json")
        fp.save(Path(features_path))
        for parts in _ordered_map(_transform_block, ((sp, features_path) for sp in spills), pool, window):
            for name, part in zip(SPLITS, parts, strict=True):
                table = part.to_arrow()
                schema = schema or table.schema
                if part.height == 0:
                    continue
                if name not in writers:
                    writers[name] = pq.ParquetWriter(tmp / f"{name}.parquet", table.schema,
                                                     compression=PARQUET_COMPRESSION)
                writers[name].write_table(table)
        for name in SPLITS:
            if name in writers:
                writers[name].close()
            else:  # an empty split still gets a file with the right columns
                assert schema is not None
                pq.write_table(schema.empty_table(), tmp / f"{name}.parquet", compression=PARQUET_COMPRESSION)
        _load_features.cache_clear()

        # ---- publish atomically (each file by rename), manifest last
        (out / "manifest.json").unlink(missing_ok=True)  # no stale manifest beside new splits
        outputs = {}
        for name in [*(f"{s}.parquet" for s in SPLITS), "features.json"]:
            os.replace(tmp / name, out / name)
            outputs[name] = sha256_file(out / name)
        fingerprint = hashlib.sha256(
            "".join(f"{k}:{v}\n" for k, v in sorted(outputs.items())).encode()
        ).hexdigest()
        manifest = {
            "format_version": 1,
            "source": source,
            "fingerprint": fingerprint,
            "inputs": [{**fs, "sha256": sha256_file(p)} for fs, p in zip(file_stats, inputs, strict=True)],
            "options": {"split": split, "valid_frac": valid_frac, "test_frac": test_frac,
                        "min_count": min_count, "seed": seed, "max_bad_fraction": max_bad_fraction},
            "rows": {"read": rows_read, "written": n_rows, "quarantined": rows_bad},
            "quarantine_reasons": dict(sorted(by_kind.items())),
            "splits": split_rows,
            "features": {"categorical": fp.categorical_columns, "cardinalities": fp.cardinalities,
                         "dense": fp.dense_columns},
            "outputs": outputs,
            # Everything above is a pure function of inputs + options; "run" describes this execution.
            "run": {
                "elapsed_s": round(time.time() - started, 3),
                "workers": workers,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": {"ctr_ad": __version__, "python": platform.python_version(),
                             "polars": pl.__version__, "pyarrow": pa.__version__},
            },
        }
        tmp_manifest = tmp / "manifest.json"
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp_manifest, out / "manifest.json")
        _log(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in split_rows.items())
             + f" in {manifest['run']['elapsed_s']:.1f}s", quiet)
        return manifest
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
