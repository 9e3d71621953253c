"""The ingest's compiled loops (``ctr_ad/_kernels.c``), built with the package and called by ctypes.

``pip install`` compiles the C file into ``ctr_ad/_kernels*.so`` (the extension is optional: without a
C compiler the install still succeeds). Without it every caller keeps its polars/numpy path, which
gives the same results more slowly; ``CTR_AD_NO_KERNELS=1`` forces that path (tests compare both).
ctypes releases the GIL for the call, so an ingest's block threads run the loops side by side.

* :class:`StringIndex`: exact lookup of strings in a fixed vocabulary through a hash table built
  once, probed over a column's Arrow string views. polars' join hashes the whole vocabulary again
  on every call; on 2M Criteo rows the 26 lookups a row took 4.9 CPU-s as joins.
* :func:`encode_values`: a column dictionary-encoded, with the counts of its values among chosen rows
  (one pass gives a block's spill and its training rows' vocabulary counts).
* :func:`split_fields`: a block of ASCII lines as text columns, what polars' CSV reader gives with
  every field read as text, in one pass that writes the columns' Arrow views (values over 12 bytes
  copied to their column's own buffer): 0.4 of the CSV reader's CPU on Criteo, and the field counts
  come with it.
* :func:`line_spans`: start, end and field count of every line of a block, in one pass.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

__all__ = ["StringIndex", "available", "encode_values", "line_spans", "split_fields"]

log = logging.getLogger(__name__)

DISABLE_ENV = "CTR_AD_NO_KERNELS"
_INT64_P = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
_INT32_P = np.ctypeslib.ndpointer(dtype=np.int32, flags="C_CONTIGUOUS")


def _load() -> ctypes.CDLL | None:
    if os.environ.get(DISABLE_ENV):
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:  # e.g. built for another machine: the polars path still works
                log.warning("%s: not loadable (%s); ingest uses its slower polars path", path, exc)
                return None
            break
    else:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.ctr_index_build.argtypes = [p, i64, p, _INT32_P, i64]
    lib.ctr_index_build.restype = None
    lib.ctr_index_probe.argtypes = [_INT32_P, i64, p, p, p, p, i64, i64, p, _INT32_P, i32, i32, i32]
    lib.ctr_index_probe.restype = None
    lib.ctr_line_spans.argtypes = [ctypes.c_char_p, i64, ctypes.c_uint8, _INT64_P, _INT64_P, _INT64_P]
    lib.ctr_line_spans.restype = None
    lib.ctr_split_fields.argtypes = [ctypes.c_char_p, i64, ctypes.c_uint8, i64, i64, p, p, i64, _INT64_P,
                                     _INT64_P, _INT64_P]
    lib.ctr_split_fields.restype = i64
    lib.ctr_compact_views.argtypes = [p, i64, ctypes.c_char_p, p]
    lib.ctr_compact_views.restype = None
    lib.ctr_encode_values.argtypes = [p, p, i64, i64, p, p, _INT32_P, i64, _INT32_P, _INT64_P, _INT32_P]
    lib.ctr_encode_values.restype = i64
    return lib


_LIB = _load()


def available() -> bool:
    """Whether the compiled loops are in use (built, and not turned off by ``CTR_AD_NO_KERNELS``)."""
    return _LIB is not None


class _Views:
    """A string column's Arrow views and data buffers as C pointers; keeps the array alive."""

    def __init__(self, array: pa.Array) -> None:
        if array.type != pa.string_view():
            array = array.cast(pa.string_view())
        self.array = array
        buffers = array.buffers()
        self.validity = buffers[0].address if buffers[0] is not None and array.null_count else None
        views = buffers[1]
        self.views = views.address + 16 * array.offset if views is not None else None
        data = [b.address if b is not None else 0 for b in buffers[2:]]
        self.buffers = (ctypes.c_void_p * max(len(data), 1))(*data)
        self.length = len(array)


class StringIndex:
    """The positions of a list of distinct strings, for exact lookups of whole columns.

    A probe compares the value itself (length, then bytes), never only its hash: a collision costs
    one more probe and cannot give a wrong position."""

    def __init__(self, values: list[str]) -> None:
        assert _LIB is not None, "the compiled kernels are not built"
        self._table = _Views(pa.array(values, type=pa.string_view()))
        self._n_slots = 1 << max(2 * len(values), 1).bit_length()  # load factor at most 1/2
        self._slots = np.empty(self._n_slots, dtype=np.int32)
        _LIB.ctr_index_build(self._table.views, self._table.length, self._table.buffers, self._slots,
                             self._n_slots)

    def __len__(self) -> int:
        return self._table.length

    def codes(self, values: pl.Series, first: int, missing: int, unknown: int) -> pl.Series:
        """Int32 codes of a Utf8 ``values``: ``first + position`` for a listed value, ``missing`` for
        a null, ``unknown`` for any other value."""
        assert _LIB is not None
        out = np.empty(len(values), dtype=np.int32)
        if len(values):
            column = _Views(values.rechunk().to_arrow(compat_level=pl.CompatLevel.newest()))
            _LIB.ctr_index_probe(self._slots, self._n_slots, self._table.views, self._table.buffers,
                                 column.views, column.validity, column.array.offset, column.length,
                                 column.buffers, out, first, missing, unknown)
        return pl.Series(values.name, out, dtype=pl.Int32)


def line_spans(block: bytes, separator: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per line of ``block``: start offset, end offset and number of fields."""
    assert _LIB is not None
    n_lines = block.count(b"\n") + 1
    starts = np.empty(n_lines, dtype=np.int64)
    ends = np.empty(n_lines, dtype=np.int64)
    fields = np.empty(n_lines, dtype=np.int64)
    _LIB.ctr_line_spans(block, len(block), ord(separator), starts, ends, fields)
    return starts, ends, fields


def encode_values(values: pl.Series, counted: np.ndarray | None = None
                  ) -> tuple[pl.Series, np.ndarray, np.ndarray]:
    """A Utf8 column dictionary-encoded: ``(distinct, counts, codes)``, the distinct non-null values in
    order of first occurrence, how often each occurs among the rows where ``counted`` (bool, one per
    row; None = every row) is set (int64, possibly 0), and each row's index into ``distinct``
    (int32, -1 for a null)."""
    assert _LIB is not None
    n = len(values)
    if n == 0:
        return values.clear(), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    values = values.rechunk()
    column = _Views(values.to_arrow(compat_level=pl.CompatLevel.newest()))
    flags = None
    if counted is not None:
        counted = np.ascontiguousarray(counted, dtype=np.bool_)
        assert counted.shape == (n,)
        flags = counted.ctypes.data
    slots = np.empty(1 << (2 * n).bit_length(), dtype=np.int32)
    first = np.empty(n, dtype=np.int32)
    counts = np.empty(n, dtype=np.int64)
    codes = np.empty(n, dtype=np.int32)
    distinct = _LIB.ctr_encode_values(column.views, column.validity, column.array.offset, n, column.buffers,
                                      flags, slots, len(slots), first, counts, codes)
    return values.gather(first[:distinct]), counts[:distinct], codes


#: Views address long values by a 32-bit offset into the block.
MAX_SPLIT_BYTES = 1 << 31


def split_fields(block: bytes, separator: str, names: list[str]) -> tuple[pl.DataFrame, np.ndarray] | None:
    """``(columns, fields per line)`` of a block of lines: one Utf8 column per name, an empty field
    null, fields past the names ignored, a short line's missing fields null; None when the block
    holds a non-ASCII byte or an empty line, or is too large (the caller then reads it with polars)."""
    assert _LIB is not None
    if not block or len(block) >= MAX_SPLIT_BYTES:
        return None
    n_lines = block.count(b"\n") + 1
    n_cols = len(names)
    views = np.empty((n_cols, n_lines, 2), dtype=np.uint64)
    stride = (n_lines + 7) // 8
    validity = np.zeros((n_cols, stride), dtype=np.uint8)
    nulls = np.empty(n_cols, dtype=np.int64)
    long_bytes = np.empty(n_cols, dtype=np.int64)
    fields = np.empty(n_lines, dtype=np.int64)
    got = _LIB.ctr_split_fields(block, len(block), ord(separator), n_cols, n_lines, views.ctypes.data,
                                validity.ctypes.data, stride, nulls, long_bytes, fields)
    if got < 0:
        return None
    columns = []
    for c, name in enumerate(names):
        buffers = [pa.py_buffer(validity[c]), pa.py_buffer(views[c])]
        if long_bytes[c]:  # its values over 12 bytes, copied out of the block
            data = np.empty(int(long_bytes[c]), dtype=np.uint8)
            _LIB.ctr_compact_views(views[c].ctypes.data, n_lines, block, data.ctypes.data)
            buffers.append(pa.py_buffer(data))
        array = pa.Array.from_buffers(pa.string_view(), n_lines, buffers, null_count=int(nulls[c]))
        columns.append(pl.Series(name, array))
    frame = pl.DataFrame(columns)
    frame.columns = list(names)  # as given: the constructor renames an empty name to column_0
    return frame, fields
