"""Ingest of the real embedded click logs: accounting, formats, quarantine, determinism."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ctr_ad import features
from ctr_ad.errors import UserError
from ctr_ad.features import SMALL_BATCH_ROWS, FeatureProcessor
from ctr_ad.ingest.reader import read_raw
from ctr_ad.ingest.run import run_ingest
from ctr_ad.schema import CRITEO_CATEGORICAL

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
CRITEO = DATA / "criteo-kaggle-8k"
VARIANTS = DATA / "criteo-variants"
SHARED = Path(os.environ.get("CTR_AD_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
OUTPUTS = ("train.parquet", "valid.parquet", "test.parquet", "features.json", "quarantine.jsonl")


def ingest(inputs, out, source="criteo", **kw):
    return run_ingest([Path(p) for p in inputs], source, Path(out), quiet=True, **kw)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctr_ad.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_every_criteo_8k_row_is_accounted_for(tmp_path):
    m = ingest([CRITEO / "train.tsv", CRITEO / "dev.tsv", CRITEO / "test.tsv"], tmp_path, split="files")
    assert [f["rows_read"] for f in m["inputs"]] == [7200, 409, 391]
    assert m["rows"] == {"read": 8000, "written": 8000, "quarantined": 0}
    assert m["splits"] == {"train": 7200, "valid": 409, "test": 391}
    train = pl.read_parquet(tmp_path / "train.parquet")
    assert train.height == 7200 and int(train["label"].sum()) == 1549
    assert int(pl.read_parquet(tmp_path / "test.parquet")["label"].sum()) == 86
    fp = FeatureProcessor.load(tmp_path / "features.json")
    assert train.columns == ["label", *fp.categorical_columns, *fp.dense_columns]
    assert train.select(fp.categorical_columns).dtypes == [pl.Int32] * 26
    for col, card in zip(fp.categorical_columns, fp.cardinalities, strict=True):
        assert train[col].min() >= 0 and train[col].max() < card
    # Dense values are standardised on train: mean ~0 over present values.
    i5 = train.filter(pl.col("I5__missing") == 0)["I5"]
    assert abs(i5.mean()) < 1e-3 and abs(i5.std() - 1) < 1e-2


def test_vocab_is_fit_on_train_only_and_ordered(tmp_path):
    ingest([CRITEO / "train.tsv", CRITEO / "dev.tsv", CRITEO / "test.tsv"], tmp_path, split="files",
           min_count=3)
    fp = FeatureProcessor.load(tmp_path / "features.json")
    raw, _ = read_raw([CRITEO / "train.tsv"], "criteo")
    counts = raw["C3"].drop_nulls().value_counts(name="n")
    expected = counts.filter(pl.col("n") >= 3).sort(["n", "C3"], descending=[True, False])["C3"].to_list()
    assert fp.vocab["C3"] == expected
    dev_only = set(read_raw([CRITEO / "dev.tsv"], "criteo")[0]["C3"].drop_nulls()) - set(raw["C3"])
    assert dev_only and not dev_only & set(fp.vocab["C3"])


def test_stripped_trailing_fields_are_valid_and_equal_the_full_rows(tmp_path):
    stripped, q = read_raw([VARIANTS / "criteo-1k-stripped-trailing.tsv"], "criteo")
    assert stripped.height == 1000 and q == []
    full, _ = read_raw([VARIANTS / "kaggle-train-2k-with-id.csv"], "criteo-csv")
    cols = ["label", *(f"I{i}" for i in range(1, 14)), *CRITEO_CATEGORICAL]
    assert stripped.select(cols).equals(full.head(1000).select(cols))


@pytest.mark.parametrize(
    ("file", "source", "rows"),
    [
        ("criteo-variants/kaggle-train-2k-with-id.csv", "criteo-csv", 1999),
        ("criteo-variants/criteo-200-header-floats.csv", "criteo-csv", 200),
        ("criteo-variants/criteo-1k-stripped-trailing.tsv", "criteo", 1000),
        ("open-bandit/random-all.csv", "obd", 10000),
    ],
)
def test_format_variants_ingest(tmp_path, file, source, rows):
    m = ingest([DATA / file], tmp_path, source=source, split="random", seed=3)
    assert m["rows"] == {"read": rows, "written": rows, "quarantined": 0}
    assert sum(m["splits"].values()) == rows
    fp = FeatureProcessor.load(tmp_path / "features.json")
    if source == "obd":
        assert len(fp.dense) == len([c for c in fp.dense if c.startswith("user-item_affinity_")]) > 0
        assert fp.categorical_columns[:2] == ["item_id", "position"]


def test_header_floats_parse_as_integers():
    raw, _ = read_raw([VARIANTS / "criteo-200-header-floats.csv"], "criteo-csv")
    assert raw["I3"][0] == 260.0 and raw["I1"][0] is None and raw["C1"][0] == "05db9164"


def test_avazu_with_and_without_header(tmp_path):
    avazu = SHARED / "avazu-9k"
    if not avazu.exists():
        pytest.skip(f"Avazu sample not redistributable; {avazu} absent on this machine")
    m = ingest([avazu / "train.csv", avazu / "dev.csv", avazu / "test.csv"], tmp_path, source="avazu",
               split="files")
    assert m["splits"] == {"train": 8087, "valid": 480, "test": 432}
    assert int(pl.read_parquet(tmp_path / "train.parquet")["label"].sum()) == 1397


def _corrupt_copy(tmp_path: Path, garbage: bool = True) -> tuple[Path, dict[int, str]]:
    lines = (CRITEO / "train.tsv").read_bytes().split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    fields = lines[10].split(b"\t")
    injected = {
        21: (b"\t".join(lines[20].split(b"\t")[:12]), "expected 15..40 fields"),
        41: (b"\t".join([*fields[:3], b"12abc", *fields[4:]]), "field I3: 12abc is not an integer"),
        61: (b"\x00\xff\xfe garbage \x9c\x80" * 5, "undecodable bytes"),
        81: (b"\t".join([b"7", *fields[1:]]), "label label: 7 is not 0 or 1"),
        101: (b"\t".join([*lines[30].split(b"\t"), b"extra"]), "expected 15..40 fields, found 41"),
    }
    if not garbage:  # without undecodable bytes the block takes the CSV-reader fast path
        del injected[61]
    out: list[bytes] = []
    for line in lines:
        out.append(line)
        if len(out) in injected:
            out[-1] = injected[len(out)][0]
            out.append(line)
    path = tmp_path / "corrupt.tsv"
    path.write_bytes(b"\n".join(out) + b"\n")
    return path, {k: v[1] for k, v in injected.items()}


@pytest.mark.parametrize("garbage", [True, False])
def test_corrupt_lines_are_quarantined_exactly(tmp_path, garbage):
    path, injected = _corrupt_copy(tmp_path, garbage)
    m = ingest([path], tmp_path / "out")
    assert m["rows"] == {"read": 7200 + len(injected), "written": 7200, "quarantined": len(injected)}
    records = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == sorted(injected)
    for r in records:
        assert injected[r["line"]] in r["reason"], r
        assert r["file"] == str(path) and r["raw"]
    # The valid rows are exactly the original file's rows.
    clean = ingest([CRITEO / "train.tsv"], tmp_path / "clean")
    for split in ("train", "valid", "test"):
        assert clean["splits"][split] == m["splits"][split]


def test_too_many_bad_rows_fail_with_a_summary(tmp_path):
    path, _ = _corrupt_copy(tmp_path)
    r = cli("ingest", "--source", "criteo", "--input", str(path), "--out", str(tmp_path / "o"),
            "--max-bad-fraction", "0.0001", "--quiet")
    assert r.returncode == 2
    assert "5 of 7205 rows" in r.stderr and "corrupt.tsv:21" in r.stderr and "Traceback" not in r.stderr
    # Nothing is published; the bad lines are kept beside the (absent) dataset, not inside it.
    assert not (tmp_path / "o").exists()
    assert len((tmp_path / "o.failed-quarantine.jsonl").read_text().splitlines()) == 5
    assert "o.failed-quarantine.jsonl" in r.stderr


def test_gzip_equals_plain_and_reruns_are_byte_identical(tmp_path):
    gz = tmp_path / "train.tsv.gz"
    gz.write_bytes(gzip.compress((CRITEO / "train.tsv").read_bytes()))
    a = ingest([CRITEO / "train.tsv"], tmp_path / "a", split="random", seed=7)
    b = ingest([gz], tmp_path / "b", split="random", seed=7)
    c = ingest([CRITEO / "train.tsv"], tmp_path / "c", split="random", seed=7)
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert a["fingerprint"] == b["fingerprint"] == c["fingerprint"]
    d = ingest([CRITEO / "train.tsv"], tmp_path / "d", split="random", seed=8)
    assert d["fingerprint"] != a["fingerprint"]


def test_two_worker_streamed_run_equals_in_memory(tmp_path):
    """Small blocks + 2 processes give the same files as one block in one process."""
    inputs = [CRITEO / "train.tsv", CRITEO / "dev.tsv"]
    ingest(inputs, tmp_path / "mem", block_bytes=1 << 30)
    ingest(inputs, tmp_path / "stream", block_bytes=64 * 1024, workers=2)
    mem = FeatureProcessor.load(tmp_path / "mem" / "features.json")
    stream = FeatureProcessor.load(tmp_path / "stream" / "features.json")
    assert mem.vocab == stream.vocab
    for name in ("train", "valid", "test"):
        assert pl.read_parquet(tmp_path / "mem" / f"{name}.parquet").equals(
            pl.read_parquet(tmp_path / "stream" / f"{name}.parquet"))
    # Independent check of the vocabulary on the first 80 % of rows, computed in memory.
    raw = pl.concat([read_raw([p], "criteo")[0] for p in inputs])
    train = raw.head(raw.height - 2 * round(raw.height * 0.1))
    counts = train["C10"].drop_nulls().value_counts(name="n").filter(pl.col("n") >= 2)
    assert stream.vocab["C10"] == counts.sort(["n", "C10"], descending=[True, False])["C10"].to_list()


def test_small_and_large_transform_paths_agree(tmp_path, monkeypatch):
    ingest([CRITEO / "train.tsv"], tmp_path)
    fp = FeatureProcessor.load(tmp_path / "features.json")
    raw, _ = read_raw([CRITEO / "dev.tsv", CRITEO / "test.tsv"], "criteo")
    assert raw.height < SMALL_BATCH_ROWS
    small = fp.transform(raw)
    big_raw = pl.concat([raw] * (SMALL_BATCH_ROWS // raw.height + 1))
    big = fp.transform(big_raw).head(raw.height)
    assert small.equals(big)
    assert (small["C3"] == 1).sum() > 0  # unseen values map to out-of-vocabulary
    assert (small["C3"] == 0).sum() > 0  # and missing ones to 0
    # Large vocabularies are binary-searched instead of hash-joined: same indices.
    monkeypatch.setattr(features, "SEARCH_LOOKUP_FROM", 1)
    searched = FeatureProcessor.load(tmp_path / "features.json").transform(big_raw).head(raw.height)
    assert searched.equals(small)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file"),
        ("empty", "file is empty"),
        ("directory", "is a directory"),
        ("wrong-format", "is this a criteo file"),
    ],
)
def test_bad_inputs_give_one_clear_line(tmp_path, setup, message):
    target = tmp_path / "input.tsv"
    if setup == "empty":
        target.write_text("")
    elif setup == "directory":
        target.mkdir()
    elif setup == "wrong-format":
        shutil.copy(VARIANTS / "kaggle-train-2k-with-id.csv", target)
    r = cli("ingest", "--source", "criteo", "--input", str(target), "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unlabeled_file_is_refused_by_ingest_but_read_for_scoring(tmp_path):
    lines = (CRITEO / "test.tsv").read_text().splitlines()
    unlabeled = tmp_path / "unlabeled.tsv"
    unlabeled.write_text("\n".join(line.split("\t", 1)[1] for line in lines) + "\n")
    raw, q = read_raw([unlabeled], "criteo")
    assert raw.height == 391 and q == [] and "label" not in raw.columns
    with pytest.raises(UserError, match="no label column"):
        ingest([unlabeled], tmp_path / "o")
