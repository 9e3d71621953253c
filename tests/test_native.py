"""The compiled ingest loops (ctr_ad/native.py) give what their polars/numpy paths give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctr_ad import native
from ctr_ad.features import FeatureProcessor
from ctr_ad.ingest.reader import line_spans_numpy, read_raw
from ctr_ad.ingest.run import run_ingest

REPO = Path(__file__).resolve().parents[1]
CRITEO = REPO / "data" / "criteo-kaggle-8k"
FIRST, MISSING, UNKNOWN = 2, 0, 1

needs_kernels = pytest.mark.skipif(not native.available(), reason="compiled kernels not built (no C compiler?)")


def test_kernels_are_built_in_ci():
    """CI installs with a compiler: there a missing build is a failure, not a slow pass."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI the kernels are optional")
    assert native.available(), "ctr_ad/_kernels.c was not compiled by the install"


def ingest_without_kernels(inputs: list[Path], out: Path, **options) -> dict:
    """The manifest of a Criteo ingest in a process that runs with ``CTR_AD_NO_KERNELS=1``."""
    script = ("import sys, json; from pathlib import Path; from ctr_ad import native;"
              "assert not native.available(); from ctr_ad.ingest.run import run_ingest;"
              "inputs, out, options = json.loads(sys.argv[1]);"
              "m = run_ingest([Path(p) for p in inputs], 'criteo', Path(out), quiet=True, **options);"
              "print(json.dumps(m))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps([list(map(str, inputs)), str(out), options])],
                          env={**os.environ, native.DISABLE_ENV: "1"}, capture_output=True, text=True, timeout=300,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def expected(vocab: list[str], values: list[str | None]) -> list[int]:
    table = {v: i + FIRST for i, v in enumerate(vocab)}
    return [MISSING if v is None else table.get(v, UNKNOWN) for v in values]


# Short values (inline in a view), values of 4 and 12 bytes (the masking boundaries), long ones (in
# data buffers), multi-byte characters and the empty string.
texts = st.one_of(st.text(max_size=3), st.text(min_size=4, max_size=4), st.text(min_size=10, max_size=14),
                  st.text(min_size=13, max_size=40), st.sampled_from(["", "a", "abcd", "abcdefghijkl", "é" * 7]))


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(vocab=st.lists(texts, unique=True, max_size=60), others=st.lists(st.one_of(texts, st.none()), max_size=60),
       data=st.data())
def test_index_codes_equal_a_dict_lookup(vocab, others, data):
    picked = data.draw(st.lists(st.sampled_from(vocab), max_size=60)) if vocab else []
    values = data.draw(st.permutations(picked + others))
    codes = native.StringIndex(vocab).codes(pl.Series("f", values, dtype=pl.Utf8), FIRST, MISSING, UNKNOWN)
    assert codes.dtype == pl.Int32 and codes.name == "f"
    assert codes.to_list() == expected(vocab, values)


@needs_kernels
def test_index_on_many_values_sliced_and_chunked_columns():
    rng = np.random.default_rng(7)
    vocab = [f"{x:08x}" for x in rng.choice(2**32, 50_000, replace=False)]
    vocab += [f"long value {i:06d}" for i in range(5_000)]
    pool = vocab + [f"{x:09x}" for x in rng.integers(0, 2**36, 20_000)] + [f"long value {i:06d}!" for i in range(2_000)]
    values = [pool[i] if i % 97 else None for i in rng.integers(0, len(pool), 120_000)]
    index = native.StringIndex(vocab)
    assert len(index) == len(vocab)
    series = pl.Series("f", values, dtype=pl.Utf8)
    want = expected(vocab, values)
    assert index.codes(series, FIRST, MISSING, UNKNOWN).to_list() == want
    # A slice (offsets into the views and the validity bits) and two chunks (two sets of buffers).
    assert index.codes(series.slice(1234, 5000), FIRST, MISSING, UNKNOWN).to_list() == want[1234:6234]
    chunked = pl.concat([series.slice(0, 60_000), series.slice(60_000)], rechunk=False)
    assert chunked.n_chunks() == 2
    assert index.codes(chunked, FIRST, MISSING, UNKNOWN).to_list() == want


@needs_kernels
def test_index_ignores_bytes_after_a_short_value():
    """A writer may leave anything in a view past a short value: the lookup masks it off."""
    def views(values: list[bytes], padding: int) -> pa.Array:
        raw = b"".join(len(v).to_bytes(4, "little") + v + bytes([padding]) * (12 - len(v)) for v in values)
        return pa.Array.from_buffers(pa.string_view(), len(values), [None, pa.py_buffer(raw)])

    values = [b"", b"a", b"abc", b"abcd", b"abcde", b"abcdefghijk", b"abcdefghijkl"]
    index = native.StringIndex([v.decode() for v in values])
    for padding in (0x00, 0xFF, 0x5A):
        series = pl.Series("f", views(values, padding))
        assert series.to_list() == [v.decode() for v in values]
        if padding:  # the padding reaches the lookup as written (polars keeps the views)
            kept = series.to_arrow(compat_level=pl.CompatLevel.newest()).buffers()[1]
            assert bytes([padding]) * 10 in bytes(kept)
        assert index.codes(series, FIRST, MISSING, UNKNOWN).to_list() == list(range(FIRST, FIRST + len(values)))


@needs_kernels
def test_index_of_nothing_and_on_nothing():
    nothing = native.StringIndex([])
    assert nothing.codes(pl.Series("f", ["a", None], dtype=pl.Utf8), FIRST, MISSING, UNKNOWN).to_list() == [
        UNKNOWN, MISSING]
    assert native.StringIndex(["a"]).codes(pl.Series("f", [], dtype=pl.Utf8), FIRST, MISSING, UNKNOWN).to_list() == []


@needs_kernels
@settings(max_examples=300, deadline=None)
@given(block=st.lists(st.sampled_from([b"a", b"bc", b"\t", b"\n", b",", b"\r", b"\xc3\xa9", b"\xff"]),
                      max_size=200).map(b"".join),
       separator=st.sampled_from(["\t", ","]))
def test_line_spans_equal_the_numpy_path(block, separator):
    for got, want in zip(native.line_spans(block, separator), line_spans_numpy(block, separator), strict=True):
        assert got.dtype == np.int64
        assert got.tolist() == want.tolist()


@needs_kernels
def test_vocabulary_codes_equal_the_join_on_the_real_sample(tmp_path):
    run_ingest([CRITEO / "train.tsv"], "criteo", tmp_path, quiet=True)
    fp = FeatureProcessor.load(tmp_path / "features.json")
    raw, _ = read_raw([CRITEO / "train.tsv", CRITEO / "dev.tsv", CRITEO / "test.tsv"], "criteo")
    for f in fp.categorical:
        values = raw.get_column(f)
        assert fp._codes(f, values).to_list() == fp._joined_codes(f, values).to_list()


@needs_kernels
def test_ingest_with_and_without_kernels_gives_the_same_dataset(tmp_path):
    """Bad lines of every kind included: field counts come from the kernel's line spans."""
    lines = (CRITEO / "train.tsv").read_bytes().split(b"\n")
    bad = [b"1\t2\t3", lines[5] + b"\textra", b"", b"\t" * 39, lines[7].replace(b"\t", b",", 3)]
    mixed = b"\n".join(lines[:3000] + bad + lines[3000:])
    source = tmp_path / "mixed.tsv"
    source.write_bytes(mixed)
    inputs = [source, CRITEO / "dev.tsv", CRITEO / "test.tsv"]
    fast = run_ingest(inputs, "criteo", tmp_path / "fast", quiet=True, split="files")
    slow = ingest_without_kernels(inputs, tmp_path / "slow", split="files")
    assert fast["rows"]["quarantined"] == len(bad)
    assert fast["fingerprint"] == slow["fingerprint"]
    assert fast["quarantine_sha256"] == slow["quarantine_sha256"]


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(texts, st.none()), max_size=200), data=st.data())
def test_encode_values_equals_a_counter(values, data):
    counted = data.draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    distinct, counts, codes = native.encode_values(pl.Series("f", values, dtype=pl.Utf8),
                                                   None if counted is None else np.array(counted))
    seen = [v for v in dict.fromkeys(values) if v is not None]  # first-occurrence order
    assert distinct.to_list() == seen
    flags = counted if counted is not None else [True] * len(values)
    assert counts.tolist() == [sum(1 for x, c in zip(values, flags, strict=True) if c and x == v) for v in seen]
    assert codes.dtype == np.int32
    assert codes.tolist() == [-1 if v is None else seen.index(v) for v in values]


# Lines of fields: empty, short, exactly 12 bytes, long (copied out of the block), at the block's end.
field_text = st.one_of(st.just(""), st.text(alphabet="abcXYZ019 _-.\"#\x00\x7f'", min_size=1, max_size=4),
                       st.text(alphabet="abc", min_size=12, max_size=12),
                       st.text(alphabet="xyz", min_size=13, max_size=30))


@needs_kernels
@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.lists(field_text, min_size=1, max_size=7), min_size=1, max_size=30),
       separator=st.sampled_from(["\t", ","]), n_names=st.integers(1, 6))
def test_split_fields_equals_the_csv_reader(rows, separator, n_names):
    block = "\n".join(separator.join(row) for row in rows).encode()
    names = [f"f{i}" for i in range(n_names)]
    split = native.split_fields(block, separator, names)
    if any(len(row) == 1 and row[0] == "" for row in rows):  # an empty line: the general path's case
        assert split is None
        return
    assert split is not None
    frame, fields = split
    # The reader's rules: fields past the names ignored, missing ones null, an empty field null.
    padded = [(row + [""] * n_names)[:n_names] for row in rows]
    assert frame.rows() == [tuple(v or None for v in row) for row in padded]
    assert fields.tolist() == [len(row) for row in rows]
    try:  # and polars' CSV reader agrees (it refuses a block whose first line has another field count;
        # ingest then reads it line by line, with the rules above)
        want = pl.read_csv(block, separator=separator, truncate_ragged_lines=True, new_columns=names,
                           has_header=False, infer_schema=False, quote_char=None)
    except pl.exceptions.PolarsError as exc:
        assert len(rows[0]) != n_names, exc
    else:
        assert frame.equals(want)
    # A long value lives in its column's own buffer, not in the whole block.
    for name in names:
        data = frame.get_column(name).to_arrow(compat_level=pl.CompatLevel.newest()).buffers()[2:]
        assert sum(b.size for b in data if b is not None) <= len(block)


@needs_kernels
def test_split_fields_leaves_non_ascii_and_empty_names_to_the_caller():
    assert native.split_fields("caf\u00e9\t1".encode(), "\t", ["a", "b"]) is None
    frame, _ = native.split_fields(b"x\ty", "\t", ["", "b"])
    assert frame.columns == ["", "b"] and frame.row(0) == ("x", "y")


@needs_kernels
def test_ingest_of_long_and_non_ascii_values_with_and_without_kernels(tmp_path):
    """Small blocks, some of them non-ASCII (read by polars) and some with values over 12 bytes."""
    lines = (CRITEO / "train.tsv").read_text().split("\n")[:3000]
    for i in range(0, 3000, 7):
        fields = lines[i].split("\t")
        fields[16] = f"a-long-category-value-{i % 50}"  # C3
        if i % 700 == 0:
            fields[20] = "caf\u00e9"  # C7
        lines[i] = "\t".join(fields)
    source = tmp_path / "long.tsv"
    source.write_text("\n".join(lines))
    fast = run_ingest([source], "criteo", tmp_path / "fast", quiet=True, block_bytes=64 * 1024)
    slow = ingest_without_kernels([source], tmp_path / "slow", block_bytes=64 * 1024)
    assert fast["fingerprint"] == slow["fingerprint"]
    vocab = json.loads((tmp_path / "fast" / "features.json").read_text())["vocab"]
    assert "a-long-category-value-7" in vocab["C3"] and "caf\u00e9" in vocab["C7"]
