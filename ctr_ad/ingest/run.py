"""Streaming ingest: raw logs -> ``train/valid/test.parquet`` + ``features.json`` + manifest + quarantine.

Two passes over bounded blocks of lines, so memory does not grow with the input:
1. parse and validate every block (quarantining bad lines), decide each row's split from its
   position among the data lines (sequential: the latest lines are the test split; random: a seeded
   hash of the position; files: one file per split), count the categorical values and dense moments
   of its training rows (``FeatureProcessor.partial_fit``), and spill the typed block to a temporary
   Arrow file;
2. transform every spilled block with the fitted feature processor and append it to its split file.
A sequential split needs the number of data lines first: a quick pre-pass counts newlines.
Blocks are independent, so both passes run on ``workers`` processes; the main process merges their
results in block order, so the output is byte-identical for any worker count.

Publishing is all or nothing: everything is written to a hidden staging directory beside ``out``
(``.<name>.ingest-tmp-<pid>``, spills included), ``manifest.json`` last, and the staging directory then
replaces ``out`` as a whole. A failed or killed run leaves an existing ``out`` untouched; its staging
directory is removed on exit, after ``kill -9`` by a janitor process, and by the next run on start.
Disk needed: the spills take about 2.5x the uncompressed input, plus the new outputs, while the old
dataset stays in place until the swap.
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
from ctr_ad.features import FeatureProcessor
from ctr_ad.files import atomic_write_text, replace_dir, utc_timestamp
from ctr_ad.hashing import sha256_file
from ctr_ad.ingest.lifecycle import Janitor, remove_stale_staging, staging_dir, worker_init
from ctr_ad.ingest.options import IngestOptions
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
from ctr_ad.schema import SourceSpec, get_source
from ctr_ad.table_schema import TableSchema
from ctr_ad.vocabulary import resolve_max_vocab

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_MODES = ("sequential", "random", "files", "time")
PARQUET_COMPRESSION = "zstd"
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

    def codes(self, positions: np.ndarray, file_index: int, times: np.ndarray | None = None) -> np.ndarray:
        """0 = train, 1 = valid, 2 = test for rows at global data-line ``positions`` (``times``: the
        rows' time values, for the time split)."""
        if self.mode == "time":
            assert times is not None
            valid_from, test_from = self.time_cuts
            return np.where(times < valid_from, 0, np.where(times < test_from, 1, 2)).astype(np.int8)
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
    train = frame.filter(pl.col("_split") == 0) if (codes != 0).any() else frame
    statistics = FeatureProcessor.fit_statistics(train, categorical, dense, transform)
    # Arrow IPC, uncompressed: the cheapest format to read back once.
    frame.write_ipc(task.spill, compression="uncompressed")
    per_split = np.bincount(codes, minlength=len(SPLITS)).tolist()
    return frame.height, per_split, parsed.lines_read, parsed.quarantine, statistics


@functools.lru_cache(maxsize=2)
def _load_features(path: str) -> FeatureProcessor:
    # Loaded once per process: its lookup tables are built on first use and reused for every block.
    return FeatureProcessor.load(path)


def _transform_block(spill: str, features_path: str) -> list[pl.DataFrame]:
    """Pass 2 on one block: model-ready columns, cut by split."""
    fp = _load_features(features_path)
    frame = pl.read_ipc(spill)
    os.unlink(spill)  # read once: free its disk space as the pass goes
    codes = frame.get_column("_split")
    model = fp.transform(frame)
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
    **overrides: Any,
) -> dict:
    """Ingest ``inputs`` into ``out``; returns the manifest (also written to ``out/manifest.json``).

    ``options`` (or keyword overrides of its fields, e.g. ``split="files"``) say how; ``quiet`` turns
    off progress bars (messages go to the ``ctr_ad.ingest.run`` logger). ``out`` is replaced only
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
    spec = _source_spec(source, schema)
    resolve_max_vocab(opts.max_vocab, list(spec.categorical))  # a bad cap fails before any work
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
    try:
        manifest = _ingest_into(stage, inputs, layouts, source, spec, out, opts, block_bytes, quiet)
        replace_dir(stage, out)
    except OSError as exc:
        raise _os_error(exc, stage) from None
    finally:
        janitor.close()
    log.info("wrote %s: %s in %.1fs", out, ", ".join(f"{k}={v}" for k, v in manifest["splits"].items()),
             manifest["run"]["elapsed_s"])
    return manifest


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


def _ingest_into(stage: Path, inputs: list[Path], layouts: list[Layout], source: str, spec: SourceSpec,
                 out: Path, opts: IngestOptions, block_bytes: int, quiet: bool) -> dict:
    """Both passes, writing every output into ``stage`` (manifest last); returns the manifest."""
    started = time.time()
    dense = list(layouts[0].dense)
    workers = opts.workers
    spill_dir = stage / ".spills"
    spill_dir.mkdir()
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=worker_init,
                                initargs=(os.getpid(),))
            if workers > 1 else None)
    window = max(2 * workers, 2)
    try:
        # ---- pass 1: parse, validate, split, count the training rows, spill
        log.info("reading %d file(s) as %s with %d worker(s)", len(inputs), source, workers)
        plan, line_offsets = _split_plan(inputs, layouts, opts)
        if opts.split == "time":
            from ctr_ad.ingest.time_split import time_cuts

            plan = dataclasses.replace(plan, time_cuts=time_cuts(inputs, layouts, opts, block_bytes, pool, window))
        file_stats = [{"path": str(p), "rows_read": 0, "rows_written": 0, "rows_quarantined": 0}
                      for p in inputs]
        spills: list[str] = []
        split_rows = dict.fromkeys(SPLITS, 0)
        by_kind: Counter = Counter()
        examples: list[dict] = []
        fp = FeatureProcessor.unfitted(source, spec, dense, opts.min_count, max_vocab=opts.max_vocab,
                                       count_spill_dir=spill_dir / "counts",
                                       count_memory_bytes=opts.count_memory_mib << 20)
        task_files: list[int] = []

        def tasks() -> Iterator[tuple]:
            for fi, (path, lay) in enumerate(zip(inputs, layouts, strict=True)):
                offset = line_offsets[fi]
                if opts.split != "sequential":  # positions only need to be distinct and stable
                    offset = fi << 40
                for first_line, block, long_lines in iter_blocks(path, lay, block_bytes):
                    spill = str(spill_dir / f"spill-{len(spills):06d}.arrow")
                    spills.append(spill)
                    task_files.append(fi)
                    task = BlockTask(lay, first_line, block, long_lines, spill, fi, offset)
                    yield task, plan, list(spec.categorical), dense, spec.dense_transform

        quarantine_path = stage / QUARANTINE
        with open(quarantine_path, "w", encoding="utf-8") as qf:
            results = _ordered_map(_parse_count_spill, tasks(), pool, window)
            for i, result in enumerate(_progress(results, quiet, "ingest: read")):
                good, per_split, read, bad, statistics = result
                fi = task_files[i]
                fp.partial_fit(statistics=statistics)
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
        _check_rows(file_stats, by_kind, examples, quarantine_path, inputs, out, opts)
        fp.finish_fit()  # the vocabularies from the (possibly spilled) counts; frees them
        log.info("fitted features: vocab sizes %s", ", ".join(
            f"{c}={n}" for c, n in zip(fp.categorical_columns, fp.cardinalities, strict=True)))

        # ---- pass 2: transform and write the splits
        features_path = stage / "features.json"
        fp.save(features_path)
        # From here on the processor is the one pass 2 loads (cached per process): one copy of the
        # vocabularies in memory, not two (they are most of what grows with the data).
        fp = _load_features(str(features_path))
        _write_splits(stage, spills, str(features_path), pool, window, quiet)
        spill_dir.rmdir()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _load_features.cache_clear()

    manifest = _manifest(stage, inputs, source, opts, file_stats, by_kind, split_rows, fp, started)
    if spec.table is not None:  # as in features.json; built-in manifests keep their exact keys
        manifest = {**manifest, "schema": spec.table.document()}
    atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


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
    if opts.split != "sequential":
        return SplitPlan(opts.split, opts.seed, 0, 0, opts.valid_frac, opts.test_frac), [0] * len(inputs)
    data_lines = [count_data_lines(p, lay) for p, lay in zip(inputs, layouts, strict=True)]
    line_offsets = [sum(data_lines[:i]) for i in range(len(inputs))]
    total = sum(data_lines)
    n_test, n_valid = round(total * opts.test_frac), round(total * opts.valid_frac)
    plan = SplitPlan(opts.split, opts.seed, total - n_valid - n_test, n_valid, opts.valid_frac, opts.test_frac)
    return plan, line_offsets


def _manifest(stage: Path, inputs: list[Path], source: str, opts: IngestOptions, file_stats: list[dict],
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
        "inputs": [{**fs, "sha256": sha256_file(p)} for fs, p in zip(file_stats, inputs, strict=True)],
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
            "finished_at": utc_timestamp(),
            "versions": {"ctr_ad": __version__, "python": platform.python_version(),
                         "polars": pl.__version__, "pyarrow": pa.__version__},
        },
    }
    return manifest


def _write_splits(stage: Path, spills: list[str], features_path: str, pool: ProcessPoolExecutor | None,
                  window: int, quiet: bool) -> None:
    writers: dict[str, pq.ParquetWriter] = {}
    schema: pa.Schema | None = None
    try:
        parts_iter = _ordered_map(_transform_block, ((sp, features_path) for sp in spills), pool, window)
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
