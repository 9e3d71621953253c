"""The Criteo-like synthetic generator: layout, determinism, a learnable planted click model."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ctr_ad.ingest.reader import read_raw
from ctr_ad.ingest.run import run_ingest
from ctr_ad.synthetic import BLOCK_ROWS, iter_blocks, write_synthetic


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.tsv", "b.tsv", "c.tsv"))
    write_synthetic(a, 5000, seed=3)
    write_synthetic(b, 5000, seed=3)
    write_synthetic(c, 5000, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_blocks_are_bounded_and_rows_exact():
    sizes = [f.height for f in iter_blocks(BLOCK_ROWS * 2 + 7, seed=0)]
    assert sizes == [BLOCK_ROWS, BLOCK_ROWS, 7]


def test_cli_writes_gzip_criteo_layout_that_ingests_cleanly(tmp_path):
    out = tmp_path / "s.tsv.gz"
    r = subprocess.run([sys.executable, "-m", "ctr_ad.cli", "synth", "--rows", "60000", "--seed", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = gzip.decompress(out.read_bytes()).decode().splitlines()
    assert len(lines) == 60000 and all(len(x.split("\t")) == 40 for x in lines[:1000])
    m = run_ingest([out], "synthetic", tmp_path / "p", quiet=True)
    assert m["rows"] == {"read": 60000, "written": 60000, "quarantined": 0}
    train = pl.read_parquet(tmp_path / "p" / "train.parquet")
    ctr = train["label"].mean()
    assert 0.2 < ctr < 0.3, ctr
    # Heavy tails and realistic missingness: I1 missing ~45 %, I2 has negatives, C3 has a long tail.
    raw, _ = read_raw([out], "criteo")
    assert 0.4 < raw["I1"].is_null().mean() < 0.5
    assert (raw["I2"] < 0).any()
    assert raw["C3"].n_unique() > 5000

    # The planted click model is learnable: a linear model beats chance by a wide margin.
    test = pl.read_parquet(tmp_path / "p" / "test.parquet")
    cols = [c for c in train.columns if c != "label"]
    onehot = {c: train[c].value_counts().filter(pl.col("count") >= 5)[c].to_list()
              for c in ["C1", "C2", "C14"]}

    def features(frame: pl.DataFrame) -> np.ndarray:
        blocks = [frame.select([c for c in cols if c.startswith("I")]).to_numpy()]
        blocks += [np.stack([(frame[c] == v).to_numpy() for v in vs], axis=1) for c, vs in onehot.items()]
        return np.hstack(blocks).astype(np.float32)

    model = LogisticRegression(max_iter=300).fit(features(train), train["label"].to_numpy())
    auc = roc_auc_score(test["label"].to_numpy(), model.predict_proba(features(test))[:, 1])
    assert auc > 0.68, auc
