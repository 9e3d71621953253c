"""Reading logs declared by a :class:`~ctr_ad.table_schema.TableSchema` (``--source table``).

Text logs (CSV/TSV, plain or gzip, with or without a header) go through the line reader of
:mod:`ctr_ad.ingest.reader` like every built-in source; this module resolves their layout from the
schema and supplies the label and time rules the validation applies. Parquet logs are read in
batches of rows, their used columns turned into the same string fields a text line yields, and
validated by the same rules, so a row is accepted or quarantined (``line`` = 1-based row number,
``raw`` = the row as JSON) exactly as its CSV twin would be.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from ctr_ad.errors import UserError
from ctr_ad.schema import SourceSpec
from ctr_ad.table_schema import LabelSpec, TableSchema, TimeSpec

PARQUET_MAGIC = b"PAR1"
#: Rows per Parquet block for a given text block size (a click-log line is ~100-300 bytes).
BYTES_PER_ROW = 256
TAB_SUFFIXES = (".tsv", ".tab", ".tsv.gz", ".tab.gz")


def is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == PARQUET_MAGIC


def parquet_by_format(path: Path, schema: TableSchema) -> bool:
    """Whether ``path`` is read as Parquet; a file of another kind than the schema's ``format`` is an error."""
    parquet = is_parquet(path)
    if schema.format == "parquet" and not parquet:
        raise UserError(f"{path}: not a Parquet file (the schema says format: parquet)")
    if schema.format in ("csv", "tsv") and parquet:
        raise UserError(f"{path}: is a Parquet file (the schema says format: {schema.format})")
    return parquet


def separator_for(path: Path, schema: TableSchema) -> str:
    """The schema's separator, else tab for ``*.tsv``/``*.tab`` (optionally ``.gz``), else comma."""
    fixed = schema.text_separator
    if fixed:
        return fixed
    return "\t" if path.name.lower().endswith(TAB_SUFFIXES) else ","


# ------------------------------------------------------------------------------------ validation rules
def label_check(rule: LabelSpec, name: str, lab: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(is-bad flag, reason) of a label read by ``rule``; ``lab`` is the stripped raw string."""
    if rule.reading in ("binary", "threshold"):
        value = lab.cast(pl.Float64, strict=False)
        if rule.reading == "binary":
            bad, what = ~value.is_in([0.0, 1.0]), "is not 0 or 1"
        else:
            bad, what = value.is_null() | ~value.is_finite(), "is not a number"
    elif rule.reading == "boolean":
        bad, what = ~lab.str.to_lowercase().is_in(["true", "false"]), "is not true or false"
    else:
        allowed = [*(rule.positive or []), *(rule.negative or [])]
        bad, what = ~lab.is_in(allowed), f"is not one of {', '.join(allowed)}"
    return bad, pl.format("label {}: {} {}", pl.lit(name), lab.fill_null("<missing>"), pl.lit(what))


def label_value(rule: LabelSpec, lab: pl.Expr) -> pl.Expr:
    """The 0/1 label (Float32) of a valid raw label string."""
    if rule.reading == "binary":
        value = lab.cast(pl.Float64, strict=False)
    elif rule.reading == "threshold":
        value = lab.cast(pl.Float64, strict=False) >= rule.threshold
    elif rule.reading == "boolean":
        value = lab.str.to_lowercase() == "true"
    else:
        value = lab.is_in(rule.positive or [])
    return value.cast(pl.Float32)


def with_time(df: pl.DataFrame, rule: TimeSpec) -> pl.DataFrame:
    """Add ``_time`` (Float64: seconds since the epoch for date-times, the number itself otherwise;
    null when missing or unreadable) from the raw time field."""
    raw = df.get_column(rule.column).str.strip_chars()
    if rule.format is not None:
        parsed = raw.str.to_datetime(rule.format, strict=False)
        seconds = parsed.dt.epoch("us").cast(pl.Float64) / 1e6
    else:
        number = raw.cast(pl.Float64, strict=False)
        try:  # ISO 8601; the format is inferred from the block's first date-time
            parsed = raw.set(number.is_not_null(), None).str.to_datetime(strict=False)
            seconds = number.fill_null(parsed.dt.epoch("us").cast(pl.Float64) / 1e6)
        except pl.exceptions.PolarsError:
            seconds = number
    seconds = seconds.set(~seconds.is_finite().fill_null(False), None)
    return df.with_columns(seconds.alias("_time"))


def time_check(rule: TimeSpec) -> tuple[pl.Expr, pl.Expr]:
    raw = pl.col(rule.column)
    what = f"is not a time ({rule.format})" if rule.format else "is not a time (number or ISO 8601)"
    return (pl.col("_time").is_null(),
            pl.format("field {}: {} {}", pl.lit(rule.column), raw.fill_null("<missing>"), pl.lit(what)))


# ------------------------------------------------------------------------------------ layouts
def resolve_table_layout(path: Path, spec: SourceSpec, first_line: bytes | None):
    """The :class:`~ctr_ad.ingest.reader.Layout` of a declared log (``first_line`` None: Parquet)."""
    from ctr_ad.ingest.reader import Layout, _split_header

    schema: TableSchema = spec.table
    if first_line is None:
        header = _parquet_file(path).schema_arrow.names
        sep, first_data_line = ",", 1
    else:
        sep = separator_for(path, schema)
        header = None
        if schema.header is not False:
            candidate = _split_header(first_line, sep, path)
            if schema.header is True or [c.lower() for c in candidate] == [c.lower() for c in schema.columns or ()]:
                header = candidate
            if schema.header is True and len(candidate) == 1 and sep.encode() not in first_line:
                raise UserError(f"{path}: line 1: no {sep!r} separator in the header; set 'separator' "
                                f"or 'format' in the schema")
        first_data_line = 2 if header is not None else 1
    names = list(header) if header is not None else list(schema.columns or ())
    dense = list(schema.numeric)
    if schema.numeric_prefix:
        other_roles = {schema.label.column, *schema.categorical, *schema.ignore,
                       *([schema.time.column] if schema.time else [])}
        dense += [n for n in names if n.startswith(schema.numeric_prefix) and n not in {*dense, *other_roles}]
    used = {schema.label.column, *dense, *schema.categorical, *([schema.time.column] if schema.time else [])}
    declared = used | set(schema.ignore)
    missing = [n for n in [*dense, *schema.categorical] if n not in names]
    if missing:
        raise UserError(f"{path}: {'line 1: header' if first_line else 'Parquet schema'} lacks column(s) "
                        f"{', '.join(missing)} declared in the schema")
    undeclared = [n for n in names if n not in declared]
    if undeclared and schema.other_columns == "error":
        raise UserError(f"{path}: column(s) {', '.join(repr(n) for n in undeclared[:10])} have no role in "
                        f"the schema; add them to 'ignore' (or set other_columns: ignore)")
    # Unused columns get private names: they may be empty, repeated or clash with the reader's own.
    names = [n if n in used else f"_ignored_{i}" for i, n in enumerate(names)]
    if first_line is None:  # Parquet: only the used columns are read
        names = [n for n in names if n in used]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: a declared column appears twice in the header")
    label = schema.label.column if schema.label.column in names else None
    time = schema.time if schema.time and schema.time.column in names else None
    return Layout(
        path=str(path), separator=sep, names=tuple(names), label=label, dense=tuple(dense),
        categorical=tuple(schema.categorical), min_fields=len(names), integer_dense=False,
        float_ints=False, first_data_line=first_data_line, label_rule=schema.label, time=time,
        parquet=first_line is None,
    )


# ------------------------------------------------------------------------------------ Parquet
def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: unreadable Parquet file ({exc})") from None


def _as_text(column: pl.Series) -> pl.Series:
    """A Parquet column as the string field a text log would hold (empty = missing)."""
    dtype = column.dtype
    if dtype == pl.Date:
        column = column.cast(pl.Datetime("us"))
        dtype = column.dtype
    if isinstance(dtype, pl.Datetime):
        # Date-times become epoch seconds: exact, and read back as a number by the time rule.
        column = column.dt.epoch("us").cast(pl.Float64) / 1e6
    text = column.cast(pl.Utf8)
    return text.set(text == "", None)


def iter_parquet_blocks(path: Path, layout, block_bytes: int) -> Iterator[tuple[int, pl.DataFrame, tuple]]:
    """``(first_row_number, frame of string fields, ())`` per batch of rows, in file order."""
    file = _parquet_file(path)
    columns = list(layout.names)
    first = 1
    try:
        for batch in file.iter_batches(batch_size=max(1, block_bytes // BYTES_PER_ROW), columns=columns):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            try:
                fields = pl.DataFrame([_as_text(frame.get_column(name)) for name in columns])
            except pl.exceptions.PolarsError:
                bad = [f"{n} ({frame.schema[n]})" for n in columns if not frame.schema[n].is_(pl.Utf8)
                       and (frame.schema[n].is_nested() or frame.schema[n] == pl.Binary)]
                raise UserError(f"{path}: column(s) {', '.join(bad) or columns} cannot be read as "
                                f"values (nested or binary Parquet types)") from None
            yield first, fields, ()
            first += fields.height
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: unreadable Parquet file ({exc})") from None


def parse_frame_block(layout, first_line: int, fields: pl.DataFrame):
    """Validate one Parquet block with the rules of the text reader."""
    from ctr_ad.ingest.reader import RAW_PREVIEW_CHARS, _finish

    n = fields.height
    df = fields.with_columns(
        _line=pl.int_range(first_line, first_line + n, dtype=pl.Int64),
        _idx=pl.int_range(0, n, dtype=pl.Int64),
        _nf=pl.lit(layout.max_fields, dtype=pl.Int64),
        _bad_utf8=pl.lit(False),
    )

    def raw_line(i: int) -> str:
        return json.dumps(fields.row(i, named=True), ensure_ascii=False)[:RAW_PREVIEW_CHARS]

    return _finish(layout, df, raw_line)


def parquet_rows(path: Path) -> int:
    return _parquet_file(path).metadata.num_rows
