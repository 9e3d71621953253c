"""Streaming reader of raw click logs with per-line validation and a quarantine.

A file is read in blocks of whole lines (plain or gzip, detected by magic bytes, not by name), each
block is parsed with vectorized polars string kernels, and every line ends up either in the block's
validated frame or in its quarantine list with the file, the 1-based line number, the reason and the
raw text. Memory is bounded by the block size, whatever the file size.

Validated frames hold ``_line`` (line number), the label as Float32 when the file has labels, dense
fields as Float64 (null = missing) and categorical fields as Utf8 (null = missing).
"""

from __future__ import annotations

import functools
import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctr_ad import native
from ctr_ad.errors import UserError
from ctr_ad.schema import SourceSpec, get_source

DEFAULT_BLOCK_BYTES = 16 * 1024 * 1024
#: A longer line is quarantined without being held in memory (real click-log lines are < 1 KB).
MAX_LINE_BYTES = 1024 * 1024
RAW_PREVIEW_CHARS = 2000
GZIP_MAGIC = b"\x1f\x8b"
#: Characters stripped around a label (both when checking it and when parsing it).
LABEL_STRIP = " \t\r\n\x0b\x0c"


@dataclass(frozen=True)
class Layout:
    """Where each field sits in the lines of one file (resolved from the spec and the header)."""

    path: str
    separator: str
    names: tuple[str, ...]  # column name of each field position
    label: str | None
    dense: tuple[str, ...]
    categorical: tuple[str, ...]
    min_fields: int
    integer_dense: bool
    float_ints: bool
    first_data_line: int  # 1-based line number of the first data line
    #: Declared logs (``--source table``): how the label reads (a ``LabelSpec``; None: 0/1), the time
    #: column (a ``TimeSpec``), and whether blocks are Parquet row batches instead of lines.
    label_rule: Any = None
    time: Any = None
    parquet: bool = False

    @property
    def max_fields(self) -> int:
        return len(self.names)


@dataclass
class RawBlock:
    """One block of lines: the validated rows and the quarantined ones."""

    frame: pl.DataFrame
    quarantine: list[dict] = field(default_factory=list)
    lines_read: int = 0


@dataclass(frozen=True)
class LongLine:
    """A line longer than ``MAX_LINE_BYTES``: replaced by an empty line in its block, quarantined."""

    line: int
    preview: bytes
    length: int


def open_binary(path: Path):
    """Open ``path`` for reading bytes, transparently gunzipping it."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def read_chunks(path: Path, size: int) -> Iterator[bytes]:
    """The bytes of ``path`` (gunzipped) in chunks of ``size``; a truncated or corrupt gzip stream is
    a UserError naming the file."""
    try:
        with open_binary(path) as fh:
            while True:
                data = fh.read(size)
                if not data:
                    return
                yield data
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UserError(f"{path}: truncated or corrupt gzip file ({exc})") from None


def check_input_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass the log files inside it")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")


def _split_header(line: bytes, sep: str, path: Path) -> list[str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: line 1: the header is not valid UTF-8") from None
    return [c.strip().strip('"') for c in text.rstrip("\r\n").split(sep)]


def _looks_unlabeled(first_line: bytes, spec: SourceSpec) -> bool:
    """A headerless line one field short whose first categorical sits where a dense value would.

    Criteo's unlabeled test files have 39 fields; a labeled line with stripped trailing fields can
    too, but there position 13 holds I13 (an integer or empty), not C1 (a non-empty hex id).
    """
    fields = first_line.rstrip(b"\r\n").split(spec.separator.encode())
    if len(fields) != len(spec.columns) - 1 or not spec.dense:
        return False
    probe = fields[len(spec.dense)].strip()
    return bool(probe) and not probe.lstrip(b"-").replace(b".", b"", 1).isdigit()


def resolve_layout(path: Path, spec: SourceSpec, first_line: bytes, labeled: bool | None) -> Layout:
    """Work out the field positions of ``path`` from ``spec`` and, if any, its header line."""
    sep = spec.separator
    header: list[str] | None = None
    if spec.header == "required":
        header = _split_header(first_line, sep, path)
        if len(header) == 1:
            raise UserError(
                f"{path}: line 1: no {sep!r} separator in the header; is this a {spec.name} file?"
            )
    elif spec.header == "optional":
        candidate = _split_header(first_line, sep, path)
        if candidate and candidate[0].lower() == spec.columns[0].lower():
            header = candidate
    elif sep.encode() not in first_line:
        raise UserError(
            f"{path}: line 1: no {sep!r} separator found; is this a {spec.name} file? (see --source)"
        )

    if header is None:
        names = list(spec.columns)
        has_label = spec.label is not None
        if labeled is False or (labeled is None and _looks_unlabeled(first_line, spec)):
            # Unlabeled logs (e.g. Criteo's test files) are the same layout without the label column.
            names = [n for n in names if n != spec.label]
            has_label = False
        min_fields = spec.min_fields or len(names)
        if not has_label:
            min_fields = min(min_fields, len(names)) - (1 if spec.min_fields else 0)
        dense = spec.dense
        return Layout(
            path=str(path), separator=sep, names=tuple(names), label=spec.label if has_label else None,
            dense=dense, categorical=spec.categorical, min_fields=min_fields,
            integer_dense=spec.integer_dense, float_ints=spec.float_ints, first_data_line=1,
        )

    canonical = {c.lower(): c for c in (*spec.columns, *spec.ignored)}
    canonical.update(spec.aliases)
    names = [canonical.get(h.lower(), h) for h in header]
    dense = list(spec.dense)
    if spec.dense_prefix:
        dense += [n for n in names if n.startswith(spec.dense_prefix)]
    needed = [*dense, *spec.categorical]
    missing = [n for n in needed if n not in names]
    if missing:
        raise UserError(
            f"{path}: line 1: header lacks column(s) {', '.join(missing)}; is this a {spec.name} file?"
        )
    has_label = spec.label in names and labeled is not False
    if labeled and not has_label:
        raise UserError(f"{path}: line 1: header has no label column {spec.label!r}")
    return Layout(
        path=str(path), separator=sep, names=tuple(names), label=spec.label if has_label else None,
        dense=tuple(dense), categorical=spec.categorical, min_fields=len(names),
        integer_dense=spec.integer_dense, float_ints=spec.float_ints, first_data_line=2,
    )


def iter_line_blocks(
    path: Path, block_bytes: int = DEFAULT_BLOCK_BYTES, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes, tuple[LongLine, ...]]]:
    """Yield ``(first_line_number, bytes, long_lines)`` blocks that end on line boundaries (no
    trailing newline). A line longer than ``max_line_bytes`` is never held whole: it is read past
    and replaced by an empty line in its block, and described in ``long_lines`` (for the quarantine).
    """
    line_no = 1
    carry = b""
    skipping: list | None = None  # [preview, length] of a long line being read past
    pending: list[LongLine] = []
    for data in read_chunks(path, block_bytes):
        if skipping is not None:
            nl = data.find(b"\n")
            if nl < 0:
                skipping[1] += len(data)
                continue
            pending.append(LongLine(line_no, skipping[0], skipping[1] + nl))
            skipping = None
            data = data[nl:]  # the long line becomes an empty line before this newline
        cut = data.rfind(b"\n")
        if cut < 0:
            carry += data
            if len(carry) > max_line_bytes:
                skipping = [carry[: 4 * RAW_PREVIEW_CHARS], len(carry)]
                carry = b""
            continue
        # One copy of the block (carry + head); the tail after the last newline is small.
        block = b"".join((carry, memoryview(data)[:cut]))
        carry = data[cut + 1 :]
        block, long_lines = _blank_long_lines(block, line_no, max_line_bytes, pending)
        pending = []
        yield line_no, block, long_lines
        line_no += block.count(b"\n") + 1
    if skipping is not None:
        pending.append(LongLine(line_no, skipping[0], skipping[1]))
    if carry or pending:
        block, long_lines = _blank_long_lines(carry, line_no, max_line_bytes, pending)
        yield line_no, block, long_lines


def _may_hold_long_line(block: bytes, max_line_bytes: int) -> bool:
    """False when no line of ``block`` is longer than ``max_line_bytes``, at the cost of a few
    ``find`` calls instead of a scan of every byte (a quarter of the block reader's time).

    A line of more than ``max_line_bytes`` bytes holds at least one whole window
    ``[k * h, (k + 1) * h)`` with ``h = max_line_bytes // 2`` and no newline in it; so if every whole
    window has a newline, there is no long line. True means "maybe": the caller then looks exactly."""
    h = max(max_line_bytes // 2, 1)
    return any(block.find(b"\n", start, start + h) < 0 for start in range(0, len(block) - h + 1, h))


def _blank_long_lines(
    block: bytes, first_line: int, max_line_bytes: int, known: list[LongLine]
) -> tuple[bytes, tuple[LongLine, ...]]:
    """Replace the lines of ``block`` longer than ``max_line_bytes`` by empty lines."""
    if len(block) <= max_line_bytes or not _may_hold_long_line(block, max_line_bytes):
        return block, tuple(known)
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.append(np.flatnonzero(data == 10), len(data))
    starts = np.concatenate(([0], ends[:-1] + 1))
    long_idx = np.flatnonzero(ends - starts > max_line_bytes)
    if not len(long_idx):
        return block, tuple(known)
    parts: list[bytes] = []
    found = list(known)
    pos = 0
    for i in long_idx.tolist():
        s, e = int(starts[i]), int(ends[i])
        parts.append(block[pos:s])
        found.append(LongLine(first_line + i, block[s : s + 4 * RAW_PREVIEW_CHARS], e - s))
        pos = e
    parts.append(block[pos:])
    return b"".join(parts), tuple(sorted(found, key=lambda x: x.line))


def line_spans(block: bytes, separator: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per line of ``block``: start offset, end offset and number of fields (no decoding): one
    compiled pass over the bytes (:mod:`ctr_ad.native`), else numpy (2 x the CPU)."""
    if native.available():
        return native.line_spans(block, separator)
    return line_spans_numpy(block, separator)


def line_spans_numpy(block: bytes, separator: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`line_spans` without the compiled kernels."""
    data = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    ends = np.append(newlines, len(data))
    starts = np.concatenate(([0], newlines + 1))
    seps = np.flatnonzero(data == ord(separator))
    fields = np.diff(np.searchsorted(seps, ends), prepend=0) + 1
    return starts, ends, fields


def _decode_lines(block: bytes) -> tuple[list[str], list[int]]:
    """Decode a block into lines; returns the lines and the indices of undecodable ones."""
    try:
        return block.decode("utf-8").split("\n"), []
    except UnicodeDecodeError:
        pass
    lines: list[str] = []
    bad: list[int] = []
    for i, raw in enumerate(block.split(b"\n")):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("utf-8", "backslashreplace"))
            bad.append(i)
    return lines, bad


def _checks(layout: Layout) -> list[tuple[pl.Expr, pl.Expr]]:
    """(is-bad flag, reason) per validation rule, in the order a line's first failure is reported.

    The frame they run on holds ``_bad_utf8``, ``_nf`` (field count) and the fields as strings.
    Flags are null-safe (a null never hides a bad line).
    """
    checks: list[tuple[pl.Expr, pl.Expr]] = [
        (pl.col("_bad_utf8"), pl.lit("undecodable bytes (not UTF-8)")),
        ((pl.col("_nf") == 1) & pl.col(layout.names[0]).is_null(), pl.lit("empty line")),
    ]
    span = (str(layout.max_fields) if layout.min_fields == layout.max_fields
            else f"{layout.min_fields}..{layout.max_fields}")
    checks.append((
        (pl.col("_nf") < layout.min_fields) | (pl.col("_nf") > layout.max_fields),
        pl.format("expected {} fields, found {}", pl.lit(span), pl.col("_nf")),
    ))
    if layout.label and layout.label_rule is not None:
        from ctr_ad.ingest.table import label_check

        checks.append(label_check(layout.label_rule, layout.label,
                                  pl.col(layout.label).str.strip_chars(LABEL_STRIP)))
    elif layout.label:
        lab = pl.col(layout.label).str.strip_chars(LABEL_STRIP)
        checks.append((
            ~lab.is_in(["0", "1"]).fill_null(False),
            pl.format("label {}: {} is not 0 or 1", pl.lit(layout.label), lab.fill_null("<missing>")),
        ))
    for name in layout.dense:
        raw = pl.col(name)
        bad, what = _dense_bad(layout, raw, pl.col(f"_v_{name}"))
        checks.append((bad, pl.format("field {}: {} {}", pl.lit(name), raw, pl.lit(what))))
    if layout.time is not None:
        from ctr_ad.ingest.table import time_check

        checks.append(time_check(layout.time))
    return [(flag.fill_null(True), reason) for flag, reason in checks]


def _dense_value(layout: Layout, raw: pl.Expr) -> pl.Expr:
    """The parsed value of a dense field (null when missing or malformed)."""
    if layout.integer_dense and not layout.float_ints:
        return raw.cast(pl.Int64, strict=False).cast(pl.Float64)
    return raw.cast(pl.Float64, strict=False)


def _dense_bad(layout: Layout, raw: pl.Expr, value: pl.Expr) -> tuple[pl.Expr, str]:
    """Is-bad flag of a dense field given its parsed value, and what a bad value is not."""
    present = raw.is_not_null() & (raw != "")
    if layout.integer_dense and not layout.float_ints:
        return present & value.is_null(), "is not an integer"
    bad = present & (value.is_null() | ~value.is_finite().fill_null(False))
    if layout.integer_dense:
        return bad | (present & (value != value.floor()).fill_null(False)), "is not an integer"
    return bad, "is not a finite number"


def _outputs(layout: Layout) -> list[pl.Expr]:
    out = [pl.col("_line")]
    if layout.label:
        label = pl.col(layout.label).str.strip_chars(LABEL_STRIP)
        if layout.label_rule is not None:
            from ctr_ad.ingest.table import label_value

            out.append(label_value(layout.label_rule, label).alias("label"))
        else:
            out.append(label.cast(pl.Float32, strict=False).alias("label"))
    out += [pl.col(f"_v_{name}").alias(name) for name in layout.dense]
    out += [pl.col(name) for name in layout.categorical]
    if layout.time is not None:
        out.append(pl.col("_time"))
    return out


def _finish(layout: Layout, df: pl.DataFrame, raw_line: Callable[[int], str]) -> RawBlock:
    """Split a parsed frame into validated rows and quarantine records (reasons only for bad rows)."""
    checks = _checks(layout)
    if layout.time is not None:
        from ctr_ad.ingest.table import with_time

        df = with_time(df, layout.time)
    df = df.with_columns(_dense_value(layout, pl.col(n)).alias(f"_v_{n}") for n in layout.dense)
    df = df.with_columns(_bad=pl.any_horizontal([flag for flag, _ in checks]))
    n_bad = int(df.get_column("_bad").sum())
    # Filtering copies every column: skip it for the usual block without a bad line.
    good = (df.filter(~pl.col("_bad")) if n_bad else df).select(_outputs(layout))
    quarantine: list[dict] = []
    if n_bad:
        bad = df.filter(pl.col("_bad"))
        reasons = bad.select(
            "_line", "_idx", pl.coalesce([pl.when(flag).then(reason) for flag, reason in checks]).alias("r")
        )
        for line, idx, reason in reasons.iter_rows():
            quarantine.append({"file": layout.path, "line": line, "reason": reason,
                               "raw": raw_line(idx)[:RAW_PREVIEW_CHARS]})
    return RawBlock(frame=good, quarantine=quarantine, lines_read=df.height)


def _parse_fast(layout: Layout, first_line: int, block: bytes) -> RawBlock | None:
    """The compiled field split (an ASCII block) or polars' CSV reader over the whole block; None when
    the block needs the careful path."""
    if b"\r" in block:
        return None
    # Line spans: the CSV reader's path needs their field counts; the compiled split gives the same
    # columns with the field counts, so there they are computed only if a bad line needs its text.
    spans = functools.cache(lambda: line_spans(block, layout.separator))
    split = native.split_fields(block, layout.separator, list(layout.names)) if native.available() else None
    if split is not None:
        fields, n_fields = split
        n_lines = fields.height
    else:
        n_fields = spans()[2]
        n_lines = len(n_fields)
        try:
            fields = pl.read_csv(block, separator=layout.separator, truncate_ragged_lines=True,
                                 new_columns=list(layout.names), has_header=False, infer_schema=False,
                                 quote_char=None)
        except (pl.exceptions.PolarsError, UnicodeDecodeError):
            return None  # e.g. undecodable bytes
        if fields.height != n_lines or fields.width != len(layout.names):
            return None  # e.g. blank lines, which the CSV reader skips
    df = fields.with_columns(
        _line=pl.int_range(first_line, first_line + n_lines, dtype=pl.Int64),
        _idx=pl.int_range(0, n_lines, dtype=pl.Int64),
        _nf=pl.Series(n_fields, dtype=pl.Int64),
        _bad_utf8=pl.lit(False),
    )
    if first_line == 1 and layout.first_data_line == 2:
        df = df.slice(1)  # the header line

    def raw_line(i: int) -> str:
        starts, ends, _ = spans()
        return block[starts[i] : ends[i]].decode("utf-8", "backslashreplace")

    return _finish(layout, df, raw_line)


def _parse_careful(layout: Layout, first_line: int, block: bytes) -> RawBlock:
    """Line-by-line decoding (undecodable bytes, blank lines, CRLF), then vectorized splitting."""
    lines, undecodable = _decode_lines(block)
    n = len(lines)
    sep = layout.separator
    raw = pl.Series("_raw", lines, dtype=pl.Utf8).str.strip_chars_end("\r")
    df = pl.DataFrame({
        "_line": pl.int_range(first_line, first_line + n, dtype=pl.Int64, eager=True),
        "_idx": pl.int_range(0, n, dtype=pl.Int64, eager=True),
        "_raw": raw,
        "_bad_utf8": pl.int_range(0, n, eager=True).is_in(undecodable) if undecodable else [False] * n,
    })
    if first_line == 1 and layout.first_data_line == 2:
        df = df.slice(1)
    names = list(layout.names)
    split = pl.col("_raw").str.split_exact(sep, len(names) - 1).struct.rename_fields(names)
    df = df.with_columns(
        _nf=pl.col("_raw").str.count_matches(sep, literal=True) + 1,
        _fields=split,
    ).unnest("_fields")
    # As in the CSV reader of the fast path, an empty field is null (an empty line too).
    df = df.with_columns(pl.when(pl.col(n) != "").then(pl.col(n)).otherwise(None).alias(n)
                         for n in layout.names)
    return _finish(layout, df, lambda i: raw[i])


def parse_block(layout: Layout, first_line: int, block: Any, long_lines: tuple[LongLine, ...] = ()) -> RawBlock:
    """Validate and split one block of lines; see the module docstring. ``long_lines`` (from
    :func:`iter_line_blocks`) are quarantined as too long instead of as the empty lines they became.
    A Parquet layout's blocks are frames of string fields (see :mod:`ctr_ad.ingest.table`)."""
    if layout.parquet:
        from ctr_ad.ingest.table import parse_frame_block

        return parse_frame_block(layout, first_line, block)
    parsed = _parse_fast(layout, first_line, block) or _parse_careful(layout, first_line, block)
    if long_lines:
        by_line = {x.line: x for x in long_lines}
        for rec in parsed.quarantine:
            x = by_line.get(rec["line"])
            if x is not None:
                rec["reason"] = f"line longer than {MAX_LINE_BYTES} bytes"
                rec["bytes"] = x.length
                rec["raw"] = x.preview.decode("utf-8", "backslashreplace")[:RAW_PREVIEW_CHARS]
    return parsed


def _first_line(path: Path) -> bytes:
    with open_binary(path) as fh:
        try:
            return fh.readline(1 << 20)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{path}: cannot read: {exc}") from None


def open_source(path: Path, spec: SourceSpec, labeled: bool | None = None) -> Layout:
    """Check ``path`` exists, is a non-empty file, and resolve its layout."""
    check_input_file(path)
    if spec.table is not None:
        from ctr_ad.ingest.table import parquet_by_format, resolve_table_layout

        if parquet_by_format(path, spec.table):
            return resolve_table_layout(path, spec, None)
    first = _first_line(path)
    if not first.strip():
        raise UserError(f"{path}: line 1 is empty; expected {spec.name} data")
    if spec.table is not None:
        return resolve_table_layout(path, spec, first)
    return resolve_layout(path, spec, first, labeled)


def iter_blocks(path: Path, layout: Layout, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[tuple[int, Any, tuple]]:
    """``(first_line, block, long_lines)`` for :func:`parse_block`: line blocks of a text log, row
    batches of a Parquet one."""
    if layout.parquet:
        from ctr_ad.ingest.table import iter_parquet_blocks

        return iter_parquet_blocks(path, layout, block_bytes)
    return iter_line_blocks(path, block_bytes)


def iter_raw_blocks(
    path: Path, spec: SourceSpec, labeled: bool | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> Iterator[RawBlock]:
    layout = open_source(path, spec, labeled)
    for first_line, block, long_lines in iter_blocks(path, layout, block_bytes):
        yield parse_block(layout, first_line, block, long_lines)


def read_raw(
    paths: list[Path], source: str | SourceSpec, labeled: bool | None = None
) -> tuple[pl.DataFrame, list[dict]]:
    """Read whole files into one validated frame (for batch scoring); returns frame and quarantine.
    ``source`` is a built-in source's name or a spec (a declared schema's ``to_spec()``)."""
    spec = source if isinstance(source, SourceSpec) else get_source(source)
    frames: list[pl.DataFrame] = []
    quarantine: list[dict] = []
    for path in paths:
        for block in iter_raw_blocks(Path(path), spec, labeled):
            frames.append(block.frame)
            quarantine.extend(block.quarantine)
    if not frames:
        raise UserError(f"{', '.join(map(str, paths))}: no rows")
    return pl.concat(frames, how="diagonal_relaxed"), quarantine
