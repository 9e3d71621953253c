"""Streaming ingest: raw logs -> ``train/valid/test.parquet`` + ``features.json`` + manifest + quarantine.

Three passes over bounded blocks of lines, so memory does not grow with the input:
1. parse and validate every block (quarantining bad lines) into a temporary spill of typed Parquet;
2. decide each row's split (sequential, seeded random or by file) and fit the feature processor on
   the training rows only (streaming value counts + dense moments);
3. transform every block and append it to the split files.
Blocks are independent, so passes 1 and 3 and the counting of pass 2 run on ``workers`` processes;
the main process merges results in block order, so the output is byte-identical for any worker count.
Outputs are written under temporary names and renamed at the end: an interrupted run never leaves a
file that looks complete.
"""

from __future__ import annotations

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
from ctr_ad.ingest.reader import DEFAULT_BLOCK_BYTES, Layout, iter_line_blocks, open_source, parse_block
from ctr_ad.schema import get_source

SPLITS = ("train", "valid", "test")
SPLIT_MODES = ("sequential", "random", "files")
PARQUET_COMPRESSION = "zstd"


@dataclass(frozen=True)
class SpillBlock:
    file_index: int
    path: str
    rows: int
    row_offset: int  # global index of the block's first valid row


# --------------------------------------------------------------------------------------- workers
def _parse_and_spill(layout: Layout, first_line: int, block: bytes, spill_path: str) -> tuple[int, int, list]:
    parsed = parse_block(layout, first_line, block)
    # Arrow IPC, uncompressed: the spill is read back twice, and IPC is the cheapest format to do so.
    parsed.frame.write_ipc(spill_path, compression="uncompressed")
    return parsed.frame.height, parsed.lines_read, parsed.quarantine


def _split_codes(mode: str, seed: int, offset: int, n: int, file_index: int, bounds: tuple[int, int],
                 fracs: tuple[float, float]) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test for the rows ``offset .. offset+n`` (independent of blocking)."""
    if mode == "files":
        return np.full(n, file_index, dtype=np.int8)
    idx = np.arange(offset, offset + n, dtype=np.uint64)
    if mode == "sequential":
        n_train, n_valid = bounds
        return np.where(idx < n_train, 0, np.where(idx < n_train + n_valid, 1, 2)).astype(np.int8)
    # splitmix64 of (seed, row index): a fixed-seed uniform per row that no block size can change.
    with np.errstate(over="ignore"):
        z = idx + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    valid_frac, test_frac = fracs
    return np.where(u < test_frac, 2, np.where(u < test_frac + valid_frac, 1, 0)).astype(np.int8)


def _count_train(block: SpillBlock, split_args: tuple, categorical: list[str], dense: list[str],
                 transform: str) -> tuple[dict, dict]:
    frame = pl.read_ipc(block.path, columns=[*categorical, *dense])
    codes = _split_codes(split_args[0], split_args[1], block.row_offset, block.rows, block.file_index,
                         split_args[2], split_args[3])
    train = frame.filter(pl.Series(codes == 0))
    counts = CategoryCounter.block_counts(train, categorical)
    stats = DenseStats(dense, transform).block_stats(train)
    return counts, stats


def _transform_block(block: SpillBlock, split_args: tuple, fp_dict: dict) -> list[pl.DataFrame]:
    fp = FeatureProcessor.from_dict(fp_dict)
    frame = pl.read_ipc(block.path)
    codes = pl.Series(_split_codes(split_args[0], split_args[1], block.row_offset, block.rows,
                                   block.file_index, split_args[2], split_args[3]))
    model = fp.transform(frame)
    if codes.n_unique() == 1:  # a whole block in one split (sequential/files): no filtering copies
        only = int(codes[0]) if len(codes) else 0
        return [model if i == only else model.clear() for i in range(len(SPLITS))]
    return [model.filter(codes == i) for i in range(len(SPLITS))]


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
            if workers > 1 else None)
    window = max(2 * workers, 2)
    try:
        # ---- pass 1: parse, validate, spill
        _log(f"reading {len(inputs)} file(s) as {source} with {workers} worker(s)", quiet)
        file_stats = [{"path": str(p), "rows_read": 0, "rows_written": 0, "rows_quarantined": 0}
                      for p in inputs]
        blocks: list[SpillBlock] = []
        by_kind: Counter = Counter()
        examples: list[dict] = []
        quarantine_tmp = tmp / "quarantine.jsonl"
        n_rows = 0
        n_spill = 0

        def tasks() -> Iterator[tuple]:
            nonlocal n_spill
            for fi, (path, lay) in enumerate(zip(inputs, layouts, strict=True)):
                for first_line, block in iter_line_blocks(path, block_bytes):
                    spill = str(tmp / f"spill-{n_spill:06d}.arrow")
                    n_spill += 1
                    yield fi, (lay, first_line, block, spill)

        task_meta: list[tuple[int, str]] = []

        def parse_args() -> Iterator[tuple]:
            for fi, a in tasks():
                task_meta.append((fi, a[3]))
                yield a

        with open(quarantine_tmp, "w", encoding="utf-8") as qf:
            for i, (good, read, bad) in enumerate(_ordered_map(_parse_and_spill, parse_args(), pool, window)):
                fi, spill = task_meta[i]
                blocks.append(SpillBlock(fi, spill, good, n_rows))
                n_rows += good
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
        for fs in file_stats:
            assert fs["rows_read"] == fs["rows_written"] + fs["rows_quarantined"], fs
        _log(f"read {rows_read} rows: {n_rows} valid, {rows_bad} quarantined", quiet)
        if rows_bad > max_bad_fraction * rows_read:
            raise UserError(_quarantine_summary(by_kind, examples, rows_read, rows_bad, max_bad_fraction))
        if n_rows == 0:
            raise UserError(f"{', '.join(map(str, inputs))}: no valid rows")

        # ---- pass 2: split + fit on the training rows only
        n_test = round(n_rows * test_frac)
        n_valid = round(n_rows * valid_frac)
        split_args = (split, seed, (n_rows - n_valid - n_test, n_valid), (valid_frac, test_frac))
        counter = CategoryCounter(list(spec.categorical))
        stats = DenseStats(dense, spec.dense_transform)
        count_args = ((b, split_args, list(spec.categorical), dense, spec.dense_transform) for b in blocks)
        for counts, block_stats in _ordered_map(_count_train, count_args, pool, window):
            counter.add_counts(counts)
            stats.add_stats(block_stats)
        fp = FeatureProcessor.fit_from(source, spec, dense, counter, stats, min_count)
        _log("fitted features: vocab sizes " + ", ".join(
            f"{c}={n}" for c, n in zip(fp.categorical_columns, fp.cardinalities, strict=True)), quiet)

        # ---- pass 3: transform and write the splits
        writers: dict[str, pq.ParquetWriter] = {}
        split_rows = dict.fromkeys(SPLITS, 0)
        schema: pa.Schema | None = None
        fp_dict = fp.to_dict()
        for parts in _ordered_map(_transform_block, ((b, split_args, fp_dict) for b in blocks), pool, window):
            for name, part in zip(SPLITS, parts, strict=True):
                table = part.to_arrow()
                schema = schema or table.schema
                if part.height == 0:
                    continue
                if name not in writers:
                    writers[name] = pq.ParquetWriter(tmp / f"{name}.parquet", table.schema,
                                                     compression=PARQUET_COMPRESSION)
                writers[name].write_table(table)
                split_rows[name] += part.height
        for name in SPLITS:
            if name in writers:
                writers[name].close()
            else:  # an empty split still gets a file with the right columns
                assert schema is not None
                pq.write_table(schema.empty_table(), tmp / f"{name}.parquet", compression=PARQUET_COMPRESSION)
        fp.save(tmp / "features.json")

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
