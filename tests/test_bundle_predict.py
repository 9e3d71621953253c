"""Bundles: round trip, refusal of damaged bundles, and `ctr-ad predict` on raw logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from helpers_train import REPO, ingested_8k, small_config

from ctr_ad.bundle import CHECKSUMS, BundleError, load
from ctr_ad.cli import main as cli_main
from ctr_ad.hashing import sha256_file
from ctr_ad.model import ensemble_probability
from ctr_ad.train import TrainResult, train

KAGGLE_TEST = REPO / "data" / "criteo-variants" / "kaggle-test-2k-placeholder-labels.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    data_dir = ingested_8k(tmp_path_factory)
    cfg = small_config(model__components=3, train__epochs=1)
    return train(data_dir, cfg, tmp_path_factory.mktemp("bundle_run") / "run", log=False)


def damaged_copy(trained: TrainResult, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir / "bundle", run / "bundle")
    return run / "bundle"


def test_round_trip_predicts_like_the_trained_model(trained: TrainResult) -> None:
    bundle = load(trained.run_dir)
    assert load(trained.run_dir / "bundle").path == bundle.path
    meta = bundle.metadata
    assert meta["components"] == 3 and meta["penalty"] == "none" and meta["lambda"] == 0.0
    assert len(meta["data_fingerprint"]) == 64 and meta["version"] and meta["created_at"].endswith("Z")
    assert meta["valid_metrics"]["logloss"] == trained.valid_metrics["logloss"]
    assert bundle.config.model.components == 3 and bundle.components == 3

    data_dir = Path(meta["data_dir"])
    test = pl.read_parquet(data_dir / "test.parquet")
    pred = bundle.predict_frame(test)
    assert pred.ctr.shape == (test.height,) and pred.components.shape == (test.height, 3)
    np.testing.assert_allclose(pred.component_std, pred.components.std(axis=1), atol=1e-7)
    cat = torch.from_numpy(test.select(bundle.features.categorical_columns).to_numpy().astype(np.int64))
    dense = torch.from_numpy(test.select(bundle.features.dense_columns).to_numpy())
    trained.model.eval()
    with torch.no_grad():
        want = ensemble_probability(trained.model(cat, dense), "mean_prob").numpy()
    np.testing.assert_allclose(pred.ctr, want, rtol=1e-5, atol=1e-7)
    # Small batches score the same rows the same way (the service path).
    one = bundle.predict_frame(test.head(1))
    np.testing.assert_allclose(one.ctr, pred.ctr[:1], rtol=1e-5)


def test_refuses_missing_truncated_and_tampered_files(trained: TrainResult, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load(tmp_path / "nothing")

    b = damaged_copy(trained, tmp_path / "missing")
    (b / "features.json").unlink()
    with pytest.raises(BundleError, match=r"missing features\.json"):
        load(b)

    b = damaged_copy(trained, tmp_path / "truncated")
    weights = b / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"model\.safetensors.*truncated"):
        load(b)

    b = damaged_copy(trained, tmp_path / "tampered")
    meta = json.loads((b / "metadata.json").read_text())
    meta["components"] = 99
    (b / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"metadata\.json: checksum mismatch"):
        load(b)


def test_refuses_weights_that_do_not_fit_the_config(trained: TrainResult, tmp_path: Path) -> None:
    b = damaged_copy(trained, tmp_path / "shape")
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    cfg["model"]["embedding_dim"] = 7
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    # Re-sign the files: the mismatch must be caught by the shape check, not by the checksum.
    sums = "".join(
        f"{sha256_file(b / n)}  {n}\n" for n in ("model.safetensors", "features.json", "config.yaml", "metadata.json")
    )
    (b / CHECKSUMS).write_text(sums)
    with pytest.raises(BundleError, match=r"shape .* imply"):
        load(b)
    # The CLI turns it into one line and exit code 2.
    code = cli_main(
        [
            "predict",
            "--bundle",
            str(b),
            "--input",
            str(KAGGLE_TEST),
            "--source",
            "criteo-csv",
            "--out",
            str(tmp_path / "p.parquet"),
        ]
    )
    assert code == 2


def test_predict_command_scores_every_row(trained: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "preds.parquet"
    code = cli_main(
        [
            "predict",
            "--bundle",
            str(trained.run_dir),
            "--input",
            str(KAGGLE_TEST),
            "--source",
            "criteo-csv",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    preds = pl.read_parquet(out)
    assert preds.height == 1999
    assert {"line", "label", "ctr", "component_std", "p_0", "p_1", "p_2"} <= set(preds.columns)
    probs = preds.select("ctr", "p_0", "p_1", "p_2").to_numpy()
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()
    assert preds["line"].to_list()[:2] == [2, 3]  # line 1 is the CSV header

    # Several inputs: a `file` column (index into --input) tells the rows apart.
    code = cli_main(
        ["predict", "--bundle", str(trained.run_dir), "--input", str(KAGGLE_TEST), str(KAGGLE_TEST),
         "--source", "criteo-csv", "--out", str(out)]
    )  # fmt: skip
    both = pl.read_parquet(out)
    assert code == 0 and both.height == 2 * 1999 and both["file"].unique().sort().to_list() == [0, 1]
    np.testing.assert_allclose(both["ctr"].to_numpy()[1999:], preds["ctr"].to_numpy())

    # A malformed row is quarantined and reported, not silently dropped.
    lines = KAGGLE_TEST.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], lines[1], "60000099,0,1,2", *lines[2:5]]) + "\n")
    capsys.readouterr()
    code = cli_main(
        [
            "predict",
            "--bundle",
            str(trained.run_dir),
            "--input",
            str(bad),
            "--source",
            "criteo-csv",
            "--out",
            str(out),
            "--quarantine",
            str(tmp_path / "q.jsonl"),
            "--max-bad-fraction",  # 1 bad row of 5: above the default 1 %
            "0.5",
        ]
    )
    assert code == 0
    assert pl.read_parquet(out).height == 4
    assert "1 row(s) quarantined" in capsys.readouterr().err
    record = json.loads((tmp_path / "q.jsonl").read_text().splitlines()[0])
    assert record["file"] == str(bad)


def test_predict_raw_encodes_small_batches_like_the_transform(trained: TrainResult) -> None:
    from ctr_ad.ingest.reader import read_raw

    bundle = load(trained.run_dir)
    raw, _ = read_raw([KAGGLE_TEST], "criteo-csv")
    a = bundle.predict_raw(raw.head(50))
    b = bundle.predict_frame(bundle.features.transform(raw.head(50)))
    np.testing.assert_array_equal(a.ctr, b.ctr)
    np.testing.assert_array_equal(a.components, b.components)


def test_predict_refuses_a_log_of_another_format(trained: TrainResult, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.parquet"
    criteo = REPO / "data" / "criteo-kaggle-8k" / "test.tsv"
    code = cli_main(["predict", "--bundle", str(trained.run_dir), "--input", str(criteo), "--source", "avazu",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "391 of 391 rows" in err and "above --max-bad-fraction" in err and "Traceback" not in err
    assert not out.exists()


def test_predict_out_naming_a_directory_is_one_line(trained: TrainResult, tmp_path: Path, capsys) -> None:
    code = cli_main(["predict", "--bundle", str(trained.run_dir), "--input", str(KAGGLE_TEST), "--source",
                     "criteo-csv", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory" in err and str(tmp_path) in err
    assert len(err.strip().splitlines()) == 1


def test_bundle_with_zero_std_features_is_refused_at_load(trained: TrainResult, tmp_path: Path) -> None:
    """std = 0 would make NaN predictions (predict) or a 422 blamed on the client (serve): refuse the bundle."""
    b = damaged_copy(trained, tmp_path)
    feats = json.loads((b / "features.json").read_text())
    feats["dense_stats"]["I3"]["std"] = 0.0
    (b / "features.json").write_text(json.dumps(feats))
    sums = "".join(
        f"{sha256_file(b / n)}  {n}\n" for n in ("model.safetensors", "features.json", "config.yaml", "metadata.json")
    )
    (b / CHECKSUMS).write_text(sums)
    with pytest.raises(BundleError, match=r"'I3': std 0\.0"):
        load(b)


def test_a_bundle_from_before_the_anchor_loads_unanchored(tmp_path_factory: pytest.TempPathFactory,
                                                          tmp_path: Path) -> None:
    """Bundles written before `model.anchor` existed have no such key: they load as unanchored models,
    not with the built-in default (an anchor they have no weights for)."""
    data_dir = ingested_8k(tmp_path_factory)
    plain = train(data_dir, small_config(model__anchor="none", train__max_steps=2), tmp_path / "old", log=False)
    b = plain.run_dir / "bundle"
    cfg = yaml.safe_load((b / "config.yaml").read_text())
    del cfg["model"]["anchor"], cfg["model"]["anchor_C"]
    (b / "config.yaml").write_text(yaml.safe_dump(cfg))
    sums = "".join(
        f"{sha256_file(b / n)}  {n}\n" for n in ("model.safetensors", "features.json", "config.yaml", "metadata.json")
    )
    (b / CHECKSUMS).write_text(sums)
    bundle = load(b)
    assert not bundle.model.anchored and bundle.config.model.anchor == "none"
    test = pl.read_parquet(data_dir / "test.parquet")
    assert np.isfinite(bundle.predict_frame(test.head(50)).ctr).all()
