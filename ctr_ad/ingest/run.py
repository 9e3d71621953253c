"""Streaming ingest: raw logs -> ``train/valid/test.parquet`` + ``features.json`` + manifest + quarantine.

Two passes over bounded blocks of lines, so memory does not grow with the input:
1. parse and validate every block (quarantining bad lines), decide each row's split from its
   position among the data lines (sequential: the latest lines are the test split; random: a seeded
   hash of the position; files: one file per split; days: every file but the last is train, the
   last one's halves are test and valid), count the categorical values and dense moments
   of its training rows (``FeatureProcessor.partial_fit``), and spill the typed block to a temporary
   Arrow file (with the compiled kernels of :mod:`ctr_ad.native`, its categorical fields
   dictionary-encoded by the same pass that counts them);
2. transform every spilled block with the fitted feature processor and append it to its split file.
A sequential split needs the number of data lines first: a quick pre-pass counts newlines.
Pass 1 goes file by file; with ``resume`` each finished file is checkpointed beside ``out`` so that a
rerun after a kill starts from the first unfinished file (:mod:`ctr_ad.ingest.resume`).
Blocks are independent, so both passes run on ``workers`` processes; the main process merges their
results in block order, so the output is byte-identical for any worker count.

Publishing is all or nothing: everything is written to a hidden staging directory beside ``out``
(``.<name>.ingest-tmp-<pid>``, spills included), ``manifest.json`` last, and the staging directory then
replaces ``out`` as a whole. A failed or killed run leaves an existing ``out`` untouched; its staging
directory is removed on exit, after ``kill -9`` by a janitor process, and by the next run on start.
Disk needed: the spills (LZ4-compressed Arrow) take about 0.6x the uncompressed input (0.59x measured
on the Criteo 1TB profile, 0.7x without the compiled kernels), plus the
new outputs, while the old dataset stays in place until the swap.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctr_ad import __version__, native
from ctr_ad.errors import UserError
from ctr_ad.features import DenseStats, FeatureProcessor
from ctr_ad.files import atomic_write_text, replace_dir, utc_timestamp
from ctr_ad.hashing import sha256_file
from ctr_ad.ingest.executor import check_engine, open_executor, ordered_map
from ctr_ad.ingest.lifecycle import Janitor, remove_stale_staging, staging_dir
from ctr_ad.ingest.options import IngestOptions
from ctr_ad.ingest.progress import FileProgress, progress_wanted
from ctr_ad.ingest.quarantine import quarantine_summary, reason_kind, too_many_bad
from ctr_ad.ingest.reader import (
    DEFAULT_BLOCK_BYTES,
    Layout,
    LongLine,
    iter_blocks,
    open_source,
    parse_block,
    read_chunks,
)
from ctr_ad.ingest.resume import STATISTICS, FileCheckpoints, FileResult, StatisticsLog, run_key
from ctr_ad.schema import SourceSpec, get_source
from ctr_ad.table_schema import TableSchema
from ctr_ad.vocabulary import encoded_counts, resolve_max_vocab

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_MODES = ("sequential", "random", "files", "time", "days")
#: Tests only: the ingest kills itself (SIGKILL) right after checkpointing this input file index.
KILL_AFTER_FILE_ENV = "CTR_AD_TEST_KILL_AFTER_FILE"
PARQUET_COMPRESSION = "zstd"
SPILL_COMPRESSION = "lz4"
QUARANTINE = "quarantine.jsonl"
MANIFEST = "manifest.json"
#: The files of a published dataset; anything else found in ``out`` is refused, not silently kept.
DATASET_FILES = (*(f"{s}.parquet" for s in SPLITS), "features.json", QUARANTINE, MANIFEST)
__all__ = ["IngestOptions", "reason_kind", "run_ingest"]


@dataclass(frozen=True)
class SplitPlan:
    """How rows are assigned to splits: a pure function of a row's data-line position."""

    mode: str
    seed: int
    train_lines: int  # sequential: data lines [0, train_lines) are train,
    valid_lines: int  # the next valid_lines are valid, the rest test
    valid_frac: float
    test_frac: float
    #: time: rows before the first cut are train, before the second valid, the rest test.
    time_cuts: tuple[float, float] = (0.0, 0.0)
    #: days: files before ``last_file`` are train; the last file's first ``test_lines`` data lines
    #: are test, the rest valid (positions are then data lines within the file).
    last_file: int = -1
    test_lines: int = 0

    def codes(self, positions: np.ndarray, file_index: int, times: np.ndarray | None = None) -> np.ndarray:
        """0 = train, 1 = valid, 2 = test for rows at global data-line ``positions`` (``times``: the
        rows' time values, for the time split)."""
        if self.mode == "time":
            assert times is not None
            valid_from, test_from = self.time_cuts
            return np.where(times < valid_from, 0, np.where(times < test_from, 1, 2)).astype(np.int8)
        if self.mode == "files":
            return np.full(len(positions), file_index, dtype=np.int8)
        if self.mode == "days":
            if file_index < self.last_file:
                return np.zeros(len(positions), dtype=np.int8)
            return np.where(positions < self.test_lines, 2, 1).astype(np.int8)
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
    block: Any  # bytes of whole lines, or a frame of string fields for Parquet
    long_lines: tuple[LongLine, ...]
    spill: str
    file_index: int
    line_offset: int  # global data-line position of the file's first data line


# --------------------------------------------------------------------------------------- workers
def _parse_count_spill(task: BlockTask, plan: SplitPlan, categorical: list[str], dense: list[str],
                       transform: str) -> tuple[int, list[int], int, list, tuple]:
    """Pass 1 on one block: validate, assign splits, count the training rows, spill."""
    parsed = parse_block(task.layout, task.first_line, task.block, task.long_lines)
    frame = parsed.frame
    positions = frame.get_column("_line").to_numpy() - task.layout.first_data_line + task.line_offset
    times = frame.get_column("_time").to_numpy() if plan.mode == "time" else None
    codes = plan.codes(positions, task.file_index, times)
    frame = frame.with_columns(_split=pl.Series(codes, dtype=pl.Int8))
    # Pass 2 needs the split, the label and the features: not the line numbers nor the times.
    kept = frame.drop(["_line", "_time"], strict=False)
    if native.available():
        statistics = _encode_count_spill(kept, codes, categorical, dense, transform, task.spill)
    else:
        train = frame.filter(pl.col("_split") == 0) if (codes != 0).any() else frame
        statistics = FeatureProcessor.fit_statistics(train, categorical, dense, transform)
        _write_spill(kept, task.spill)
    per_split = np.bincount(codes, minlength=len(SPLITS)).tolist()
    return frame.height, per_split, parsed.lines_read, parsed.quarantine, statistics


def _encode_count_spill(frame: pl.DataFrame, splits: np.ndarray, categorical: list[str], dense: list[str],
                        transform: str, path: str) -> tuple:
    """Pass 1's statistics and spill with the compiled kernels: one pass per categorical field both
    counts its training values and dictionary-encodes it, and the spill keeps the dictionary codes
    (int32) and the block's distinct values instead of a 16-byte view per value. Per 2M Criteo rows
    the spill writes in about half the CPU and is a sixth smaller (0.59 against 0.70 x the input),
    and pass 2 looks up each block's distinct values instead of every value."""
    train = splits == 0
    counted = None if train.all() else train
    counts: dict[str, pl.DataFrame] = {}
    columns: dict[str, pa.Array] = {}
    for f in categorical:
        counts[f], distinct, codes = encoded_counts(frame.get_column(f), counted)
        indices = pa.array(codes, type=pa.int32(), mask=codes < 0)
        columns[f] = pa.DictionaryArray.from_arrays(indices, distinct.to_arrow(compat_level=pl.CompatLevel.newest()))
    rest = frame.drop(categorical)
    moments = DenseStats(dense, transform).block_stats(rest if counted is None else rest.filter(pl.Series(train)))
    table = rest.to_arrow(compat_level=pl.CompatLevel.newest())
    for f, column in columns.items():
        table = table.append_column(f, column)
    with pa.ipc.new_file(path, table.schema, options=_SPILL_OPTIONS) as writer:
        writer.write_table(table)
    return counts, moments


_SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression=SPILL_COMPRESSION)


def _write_spill(frame: pl.DataFrame, path: str) -> None:
    """One block's spill: Arrow IPC with LZ4, strings as views.

    Views are polars' own layout, so nothing is converted on write or read, and Criteo's 8-byte values
    sit inside their views: 146 bytes a row of the criteo1tb profile and 138 of the default one (the
    input has 244) against 226 and 218 with offset strings (CompatLevel.oldest), which also cost 40 %
    more CPU to write and read back.
    Named explicitly so that a change of polars' default cannot silently grow the spills. zstd would
    halve the size at 1.5 x the cost. pyarrow's writer would cost 0.8 x the CPU (2.3 -> 1.8 CPU-s per
    2M Criteo rows) but raised the peak memory of an ingest by 40-60 MiB, so polars writes. (The
    dictionary-encoded spills of :func:`_encode_count_spill`, whose columns are small, are written by
    pyarrow.)"""
    frame.write_ipc(path, compression=SPILL_COMPRESSION, compat_level=pl.CompatLevel.newest())


def _read_spill(path: str) -> tuple[pl.DataFrame, dict[str, tuple[np.ndarray, pl.Series]]]:
    """A spill back as a frame, read by pyarrow (C LZ4, buffers handed to polars without a copy):
    half the CPU of polars' ``read_ipc`` on the same file (1.1 against 2.2 CPU-s per 2M Criteo rows),
    the same frame. Dictionary-encoded columns (:func:`_encode_count_spill`) come back apart, as
    ``{field: (codes, distinct values)}`` (code -1 = null), for :meth:`FeatureProcessor.transform`."""
    with pa.ipc.open_file(path) as reader:
        table = reader.read_all()
    encoded: dict[str, tuple[np.ndarray, pl.Series]] = {}
    for name, kind in zip(table.column_names, table.schema.types, strict=True):
        if pa.types.is_dictionary(kind):
            column = table.column(name).combine_chunks()
            codes = pc.fill_null(column.indices, -1).to_numpy(zero_copy_only=False)
            encoded[name] = (codes, pl.Series(name, column.dictionary))
    if encoded:
        table = table.drop_columns(list(encoded))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame, encoded


@functools.lru_cache(maxsize=2)
def _load_features(path: str) -> FeatureProcessor:
    # Loaded once per process: its lookup tables are built on first use and reused for every block.
    return FeatureProcessor.load(path)


def _transform_block(spill: str, features_path: str) -> list[pl.DataFrame]:
    """Pass 2 on one block: model-ready columns, cut by split."""
    fp = _load_features(features_path)
    frame, encoded = _read_spill(spill)
    os.unlink(spill)  # read once: free its disk space as the pass goes
    codes = frame.get_column("_split")
    model = fp.transform(frame, encoded=encoded)
    if codes.n_unique() == 1:  # a whole block in one split (sequential/files): no filtering copies
        only = int(codes[0]) if len(codes) else 0
        return [model if i == only else model.clear() for i in range(len(SPLITS))]
    return [model.filter(codes == i) for i in range(len(SPLITS))]


def count_data_lines(path: Path, layout: Layout) -> int:
    """Data lines of a file (header excluded), counted from raw bytes without parsing."""
    if layout.parquet:
        from ctr_ad.ingest.table import parquet_rows

        return parquet_rows(path)
    lines = 0
    last = b"\n"
    for chunk in read_chunks(path, 1 << 24):
        lines += chunk.count(b"\n")
        last = chunk[-1:]
    if last != b"\n":
        lines += 1
    return max(lines - (layout.first_data_line - 1), 0)


# --------------------------------------------------------------------------------------- helpers
def _progress(iterable: Iterable, quiet: bool, desc: str) -> Iterable:
    """A tqdm bar on an interactive stderr (never in logs or tests)."""
    if quiet or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="block", leave=False)


def check_output_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot be replaced by a dataset, before any work is done."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; --out names the dataset directory")
    if out.is_dir():
        unrelated = sorted(p.name for p in out.iterdir()
                           if p.name not in DATASET_FILES and p.name != ".ingest-tmp")
        if unrelated:
            shown = ", ".join(unrelated[:5]) + (" …" if len(unrelated) > 5 else "")
            raise UserError(f"{out}: holds files that are not part of a dataset ({shown}); an ingest "
                            f"replaces the whole directory: move them away or choose another --out")
        if not os.access(out, os.W_OK):
            raise UserError(f"{out}: output directory is read-only")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{parent}: cannot create the output's parent directory ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent}: read-only; the dataset is staged and swapped in there")


def _os_error(exc: OSError, where: Path) -> Exception:
    """One line naming the file for a write error (disk full, read-only file system, permissions).

    polars reports I/O errors as ``OSError`` without errno or file name (``… (os error 28)``)."""
    code = exc.errno
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    name = exc.filename or where
    if code == errno.ENOSPC:
        return OSError(code, "no space left on device while writing the dataset (the old one, if any, "
                             "is untouched; see README, Ingest, for the disk needed)", str(name))
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{name}: cannot write ({os.strerror(code)}); choose a writable --out")
    return exc


def _resolve_options(options: IngestOptions | None, overrides: dict[str, Any]) -> IngestOptions:
    base = options.model_dump() if options is not None else {}
    unknown = sorted(set(overrides) - set(IngestOptions.model_fields))
    if unknown:
        raise TypeError(f"run_ingest() got unexpected keyword argument(s) {unknown}")
    return IngestOptions.of({**base, **overrides})


# --------------------------------------------------------------------------------------- main
def run_ingest(
    inputs: list[Path],
    source: str,
    out: Path,
    options: IngestOptions | None = None,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    quiet: bool = False,
    schema: TableSchema | None = None,
    resume: bool = False,
    progress: bool | None = None,
    **overrides: Any,
) -> dict:
    """Ingest ``inputs`` into ``out``; returns the manifest (also written to ``out/manifest.json``).

    ``options`` (or keyword overrides of its fields, e.g. ``split="files"``) say how; ``quiet`` turns
    off progress bars unless ``progress`` forces them on or off (messages go to the ``ctr_ad.ingest.run``
    logger). ``resume`` keeps per-file checkpoints beside ``out`` so that a rerun after a kill starts
    from the last finished file (see :mod:`ctr_ad.ingest.resume`). ``out`` is replaced only
    when the whole run succeeds. ``source="table"`` reads a user's log by its declared ``schema``.
    """
    opts = _resolve_options(options, overrides)
    out = Path(out)
    if out.name in ("", ".", ".."):  # the staging directory is a sibling named after it
        out = out.resolve()
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise UserError("no input files")
    if opts.split == "files" and len(inputs) != 3:
        raise UserError("--split files takes exactly 3 inputs: train, valid, test (in that order)")
    if opts.split == "days" and len(inputs) < 2:
        raise UserError("--split days takes at least 2 inputs, one file per day in day order (the last "
                        "day is split into test and valid halves)")
    if opts.split == "days":
        _check_day_order(inputs)
    spec = _source_spec(source, schema)
    resolve_max_vocab(opts.max_vocab, list(spec.categorical))  # a bad cap fails before any work
    check_engine(opts.engine)  # and so does --engine ray without Ray installed
    layouts = [open_source(p, spec) for p in inputs]
    for lay in layouts:
        if lay.label is None:
            raise UserError(f"{lay.path}: no label column; ingest needs labeled logs "
                            f"(score unlabeled logs with `ctr-ad predict`)")
        if lay.dense != layouts[0].dense:
            raise UserError(f"{lay.path}: dense columns differ from {layouts[0].path}")
        if opts.split == "time" and lay.time is None:
            raise UserError(f"{lay.path}: --split time needs a time column; declare one in the schema "
                            f"('time: COLUMN') and check the file has it")
    check_output_dir(out)
    for stale in remove_stale_staging(out):
        log.info("removed %s left by an interrupted ingest", stale)
    stage = staging_dir(out)
    try:
        stage.mkdir()
    except OSError as exc:
        raise _os_error(exc, stage) from None
    janitor = Janitor(stage)
    checkpoints = None
    succeeded = False
    try:
        if resume:
            settings = {"source": source, "schema": spec.table.document() if spec.table is not None else None,
                        "options": opts.manifest_options(), "block_bytes": block_bytes}
            checkpoints = FileCheckpoints(out, inputs, run_key(inputs, settings))
        manifest = _ingest_into(stage, inputs, layouts, source, spec, out, opts, block_bytes, quiet,
                                checkpoints, progress)
        replace_dir(stage, out)
        succeeded = True
    except OSError as exc:
        raise _os_error(exc, stage) from None
    finally:
        janitor.close()
        if checkpoints is not None:
            checkpoints.close(succeeded)
    log.info("wrote %s: %s in %.1fs", out, ", ".join(f"{k}={v}" for k, v in manifest["splits"].items()),
             manifest["run"]["elapsed_s"])
    return manifest


def _check_day_order(inputs: list[Path]) -> None:
    """Refuse day files named ``day_N…`` given out of order: a shell glob sorts day_10 before day_2,
    which would silently test on the wrong day."""
    numbers = [re.match(r"day_(\d+)(\D|$)", p.name) for p in inputs]
    if all(numbers):
        days = [int(m.group(1)) for m in numbers]  # type: ignore[union-attr]
        if days != sorted(days) or len(set(days)) != len(days):
            raise UserError(f"--split days: inputs are not in day order ({', '.join(p.name for p in inputs)}); "
                            f"list them as day_0.gz day_1.gz … day_23.gz (in bash: day_{{0..23}}.gz, not a "
                            f"glob, which puts day_10 before day_2)")


def _source_spec(source: str, schema: TableSchema | None) -> SourceSpec:
    if source == "table":
        if schema is None:
            raise UserError("--source table needs a declared schema (--schema FILE or the schema flags)")
        return schema.to_spec()
    if schema is not None:
        raise UserError(f"--schema is read with --source table only (not with --source {source})")
    try:
        return get_source(source)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@dataclass
class _ReadTally:
    """What pass 1 has read so far, file by file: rows per file and split, quarantine reasons and
    examples, and the spills pass 2 reads (with the file each came from, for resumable runs)."""

    file_stats: list[dict]
    split_rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    by_kind: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    spills: list[str] = field(default_factory=list)
    spill_files: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, inputs: list[Path]) -> _ReadTally:
        return cls([{"path": str(p), "rows_read": 0, "rows_written": 0, "rows_quarantined": 0} for p in inputs])

    def add(self, fi: int, result: FileResult) -> None:
        for name, n in zip(SPLITS, result.per_split, strict=True):
            self.split_rows[name] += n
        self.file_stats[fi].update(rows_read=result.rows_read, rows_written=result.rows_written,
                                   rows_quarantined=result.rows_quarantined)
        self.by_kind.update(result.by_kind)
        self.examples.extend(result.examples[: 5 - len(self.examples)])
        self.spills.extend(result.spills)
        self.spill_files.extend([fi] * len(result.spills))


def _ingest_into(stage: Path, inputs: list[Path], layouts: list[Layout], source: str, spec: SourceSpec,
                 out: Path, opts: IngestOptions, block_bytes: int, quiet: bool,
                 checkpoints: FileCheckpoints | None = None, progress: bool | None = None) -> dict:
    """Both passes, writing every output into ``stage`` (manifest last); returns the manifest."""
    started = time.time()
    dense = list(layouts[0].dense)
    workers = opts.workers
    # The manifest names every input by its SHA-256: hashed on a thread while pass 1 runs (hashlib
    # releases the GIL), not after it, where it was a tenth of a run's time.
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-sha256")
    input_hashes = [hasher.submit(sha256_file, p) for p in inputs]
    spill_dir = stage / ".spills"
    spill_dir.mkdir()
    pool, window = open_executor(opts.engine, workers)
    try:
        # ---- pass 1: parse, validate, split, count the training rows, spill
        log.info("reading %d file(s) as %s with %s", len(inputs), source,
                 f"{workers} worker(s)" if opts.engine == "local" else f"Ray ({window // 2} tasks at a time)")
        plan, line_offsets = _split_plan(inputs, layouts, opts)
        if opts.split == "time":
            from ctr_ad.ingest.time_split import time_cuts

            plan = dataclasses.replace(plan, time_cuts=time_cuts(inputs, layouts, opts, block_bytes, pool, window))
        tally = _ReadTally.of(inputs)
        fp = FeatureProcessor.unfitted(source, spec, dense, opts.min_count, max_vocab=opts.max_vocab,
                                       count_spill_dir=spill_dir / "counts",
                                       count_memory_bytes=opts.count_memory_mib << 20)
        quarantine_path = stage / QUARANTINE
        bar = FileProgress(inputs, progress_wanted(progress, quiet))
        try:
            with open(quarantine_path, "w", encoding="utf-8") as qf:
                for fi in range(len(inputs)):
                    result = checkpoints.load(fi) if checkpoints is not None else None
                    resumed = result is not None
                    bar.start_file(fi)
                    if result is None:  # the counts are fitted block by block, as they arrive
                        result = _read_file(fi, inputs, layouts, line_offsets, plan, spec, dense, opts,
                                            block_bytes, pool, window, spill_dir, checkpoints, qf, bar,
                                            fit=lambda statistics: fp.partial_fit(statistics=statistics))
                    else:
                        log.info("%s: finished by an earlier run, reused", inputs[fi])
                        bar.rows_done(result.rows_read)
                        for statistics in FileCheckpoints.statistics(result):
                            fp.partial_fit(statistics=statistics)
                    bar.file_done(fi, resumed)
                    tally.add(fi, result)
                    if checkpoints is not None:  # the file's quarantined lines, kept in its folder
                        with open(result.quarantine, encoding="utf-8") as part:
                            shutil.copyfileobj(part, qf)
        finally:
            bar.close()
        _check_rows(tally.file_stats, tally.by_kind, tally.examples, quarantine_path, inputs, out, opts)
        fp.finish_fit()  # the vocabularies from the (possibly spilled) counts; frees them
        log.info("fitted features: vocab sizes %s", ", ".join(
            f"{c}={n}" for c, n in zip(fp.categorical_columns, fp.cardinalities, strict=True)))

        # ---- pass 2: transform and write the splits
        features_path = stage / "features.json"
        fp.save(features_path)
        # From here on the processor is the one pass 2 loads (cached per process): one copy of the
        # vocabularies in memory, not two (they are most of what grows with the data).
        fp = _load_features(str(features_path))
        _write_splits(stage, _consume(tally.spills, tally.spill_files, checkpoints), str(features_path), pool, window,
                      quiet or progress is False)
        spill_dir.rmdir()
    finally:
        pool.shutdown(cancel_futures=True)
        hasher.shutdown(wait=False, cancel_futures=True)  # a failed run does not hash the rest
        _load_features.cache_clear()

    manifest = _manifest(stage, inputs, [h.result() for h in input_hashes], source, opts, tally.file_stats,
                         tally.by_kind, tally.split_rows, fp, started)
    if spec.table is not None:  # as in features.json; built-in manifests keep their exact keys
        manifest = {**manifest, "schema": spec.table.document()}
    atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _read_file(fi: int, inputs: list[Path], layouts: list[Layout], line_offsets: list[int], plan: SplitPlan,
               spec: SourceSpec, dense: list[str], opts: IngestOptions, block_bytes: int,
               pool: Executor, window: int, spill_dir: Path,
               checkpoints: FileCheckpoints | None, qf: Any, bar: FileProgress,
               fit: Callable[[Any], object]) -> FileResult:
    """Pass 1 over input ``fi``: its blocks in order, checkpointed when ``checkpoints`` is given;
    ``fit`` receives each block's statistics of its training rows, in block order."""
    path, lay = inputs[fi], layouts[fi]
    offset = line_offsets[fi]
    if opts.split not in ("sequential", "days"):  # positions only need to be distinct and stable
        offset = fi << 40
    folder = checkpoints.fresh_folder(fi) if checkpoints is not None else spill_dir
    result = FileResult()
    part = None
    kept: StatisticsLog | None = None
    if checkpoints is not None:
        result.quarantine = str(folder / QUARANTINE)
        part = open(result.quarantine, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        result.statistics = str(folder / STATISTICS)
        kept = StatisticsLog(folder / STATISTICS)
    sink = part if part is not None else qf
    by_kind: Counter = Counter()

    def tasks() -> Iterator[tuple]:
        for first_line, block, long_lines in iter_blocks(path, lay, block_bytes):
            name = f"spill-{fi:05d}-{len(result.spills):06d}.arrow"
            result.spills.append(str(folder / name))
            task = BlockTask(lay, first_line, block, long_lines, result.spills[-1], fi, offset)
            yield task, plan, list(spec.categorical), dense, spec.dense_transform

    try:
        for good, per_split, read, bad, statistics in ordered_map(_parse_count_spill, tasks(), pool, window):
            fit(statistics)
            if kept is not None:
                kept.append(statistics)
            result.per_split = [a + b for a, b in zip(result.per_split, per_split, strict=True)]
            result.rows_read += read
            result.rows_written += good
            result.rows_quarantined += len(bad)
            for rec in bad:
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                by_kind[reason_kind(rec["reason"])] += 1
                if len(result.examples) < 5:
                    result.examples.append(rec)
            bar.rows_done(read)
    finally:
        if part is not None:
            part.close()
        if kept is not None:
            kept.close()
    result.by_kind = dict(by_kind)
    if checkpoints is not None:
        checkpoints.save(fi, result)
        if os.environ.get(KILL_AFTER_FILE_ENV) == str(fi):  # tests: die right after this checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
    log.info("%s: %d rows (%d/%d files)", path, result.rows_read, fi + 1, len(inputs))
    return result


def _consume(spills: list[str], spill_files: list[int], checkpoints: FileCheckpoints | None) -> Iterator[str]:
    """The spills in order for pass 2, which deletes them: a file stops counting as finished
    (for ``--resume``) before its first spill goes."""
    last = -1
    for spill, fi in zip(spills, spill_files, strict=True):
        if checkpoints is not None and fi != last:
            checkpoints.invalidate(fi)
        last = fi
        yield spill


def _check_rows(file_stats: list[dict], by_kind: Counter, examples: list[dict], quarantine_path: Path,
                inputs: list[Path], out: Path, opts: IngestOptions) -> None:
    """Rows read = written + quarantined per file; too many bad rows or none valid fail the run (the
    failed run's quarantine is kept beside ``out``, which stays as it was)."""
    rows_read = sum(f["rows_read"] for f in file_stats)
    rows_bad = sum(f["rows_quarantined"] for f in file_stats)
    n_rows = sum(f["rows_written"] for f in file_stats)
    for fs in file_stats:
        if fs["rows_read"] != fs["rows_written"] + fs["rows_quarantined"]:
            raise RuntimeError(f"ingest accounting error: {fs}")
    log.info("read %d rows: %d valid, %d quarantined", rows_read, n_rows, rows_bad)
    if too_many_bad(rows_read, rows_bad, opts.max_bad_fraction):
        kept = out.with_name(f"{out.name}.failed-{QUARANTINE}")
        os.replace(quarantine_path, kept)
        raise UserError(quarantine_summary(by_kind, examples, rows_read, rows_bad, opts.max_bad_fraction,
                                           where=f"{kept} ({out} is left as it was)"))
    if n_rows == 0:
        raise UserError(f"{', '.join(map(str, inputs))}: no valid rows")


def _split_plan(inputs: list[Path], layouts: list[Layout], opts: IngestOptions) -> tuple[SplitPlan, list[int]]:
    """The split rule and each file's first data-line position (a sequential split counts lines first)."""
    if opts.split == "days":
        # The published Criteo 1TB protocol (DLRM, MLPerf): the last day's first half (rounded up) is
        # test, its second half validation. Only the last file needs counting.
        last = len(inputs) - 1
        test_lines = (count_data_lines(inputs[last], layouts[last]) + 1) // 2
        return (SplitPlan("days", opts.seed, 0, 0, opts.valid_frac, opts.test_frac, last_file=last,
                          test_lines=test_lines),
                [0] * len(inputs))
    if opts.split != "sequential":
        return SplitPlan(opts.split, opts.seed, 0, 0, opts.valid_frac, opts.test_frac), [0] * len(inputs)
    data_lines = [count_data_lines(p, lay) for p, lay in zip(inputs, layouts, strict=True)]
    line_offsets = [sum(data_lines[:i]) for i in range(len(inputs))]
    total = sum(data_lines)
    n_test, n_valid = round(total * opts.test_frac), round(total * opts.valid_frac)
    plan = SplitPlan(opts.split, opts.seed, total - n_valid - n_test, n_valid, opts.valid_frac, opts.test_frac)
    return plan, line_offsets


def _manifest(stage: Path, inputs: list[Path], input_sha256: list[str], source: str, opts: IngestOptions,
              file_stats: list[dict],
              by_kind: Counter, split_rows: dict[str, int], fp: FeatureProcessor, started: float) -> dict:
    """The manifest of a finished ingest: it names every output file by hash."""
    rows_read = sum(f["rows_read"] for f in file_stats)
    rows_bad = sum(f["rows_quarantined"] for f in file_stats)
    n_rows = sum(f["rows_written"] for f in file_stats)
    quarantine_path = stage / QUARANTINE
    workers = opts.workers
    outputs = {name: sha256_file(stage / name) for name in [*(f"{s}.parquet" for s in SPLITS), "features.json"]}
    fingerprint = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(outputs.items())).encode()).hexdigest()
    manifest = {
        "format_version": 1,
        "source": source,
        "fingerprint": fingerprint,
        "inputs": [{**fs, "sha256": h} for fs, h in zip(file_stats, input_sha256, strict=True)],
        "options": opts.manifest_options(),
        "rows": {"read": rows_read, "written": n_rows, "quarantined": rows_bad},
        "quarantine_reasons": dict(sorted(by_kind.items())),
        "splits": split_rows,
        "features": {"categorical": fp.categorical_columns, "cardinalities": fp.cardinalities,
                     "dense": fp.dense_columns},
        "outputs": outputs,
        # Not part of the fingerprint (which predates it): checked by ctr_ad.dataset.verify_data_dir.
        "quarantine_sha256": sha256_file(quarantine_path),
        # Everything above is a pure function of inputs + options; "run" describes this execution.
        "run": {
            "elapsed_s": round(time.time() - started, 3),
            "workers": workers,
            "engine": opts.engine,
            "finished_at": utc_timestamp(),
            "versions": {"ctr_ad": __version__, "python": platform.python_version(),
                         "polars": pl.__version__, "pyarrow": pa.__version__},
        },
    }
    return manifest


def _write_splits(stage: Path, spills: Iterable[str], features_path: str, pool: Executor,
                  window: int, quiet: bool) -> None:
    writers: dict[str, pq.ParquetWriter] = {}
    schema: pa.Schema | None = None
    try:
        parts_iter = ordered_map(_transform_block, ((sp, features_path) for sp in spills), pool, window)
        for parts in _progress(parts_iter, quiet, "ingest: write"):
            for name, part in zip(SPLITS, parts, strict=True):
                table = part.to_arrow()
                schema = schema or table.schema
                if part.height == 0:
                    continue
                if name not in writers:
                    writers[name] = pq.ParquetWriter(stage / f"{name}.parquet", table.schema,
                                                     compression=PARQUET_COMPRESSION)
                writers[name].write_table(table)
    finally:
        for w in writers.values():
            w.close()
    for name in SPLITS:
        if name not in writers:  # an empty split still gets a file with the right columns
            assert schema is not None
            pq.write_table(schema.empty_table(), stage / f"{name}.parquet", compression=PARQUET_COMPRESSION)
