"""``--source table``: a user's own click log, read by a declared schema, through ingest, train,
predict and the real service."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import yaml
from service_helpers import REPO, start_server, train_tiny

from ctr_ad.cli import main as cli_main
from ctr_ad.errors import UserError
from ctr_ad.features import FeatureProcessor
from ctr_ad.ingest.run import run_ingest
from ctr_ad.table_schema import TableSchema

COLUMNS = ["ts", "user_id", "ad_id", "site", "device", "hour", "clicked"]
SCHEMA = {"label": "clicked", "categorical": ["user_id", "ad_id", "site", "device"], "numeric": ["hour"],
          "time": "ts"}
SPLIT_FILES = ("train.parquet", "valid.parquet", "test.parquet")
OBD = REPO / "data" / "open-bandit" / "random-all.csv"
OBD_SCHEMA = REPO / "pipelines" / "schemas" / "open-bandit.yaml"
CRITEO_8K = [REPO / "data" / "criteo-kaggle-8k" / f"{s}.tsv" for s in ("train", "dev", "test")]
AVAZU_9K = Path(os.environ.get("CTR_AD_SHARED_DATASETS", REPO.parent / "shared" / "datasets")) / "avazu-9k"


def user_log(n: int = 1200, seed: int = 7) -> pl.DataFrame:
    """A click log of the shape users bring: ads clicked more by some users, on some devices."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        user, ad = rng.randint(0, 40), rng.randint(0, 25)
        device = rng.choice(["ios", "android", "web"])
        p = 0.05 + 0.4 * (ad % 4 == 0) + 0.2 * (device == "ios")
        # Timestamps are shuffled a little: the time split must sort by value, not by position.
        rows.append((1_700_000_000 + 10 * i + rng.randint(0, 200), f"u{user}", f"a{ad}", f"s{rng.randint(0, 6)}",
                     device, (i // 50) % 24, int(rng.random() < p)))
    return pl.DataFrame(rows, schema=dict.fromkeys(COLUMNS), orient="row")


def write_csv(frame: pl.DataFrame, path: Path, separator: str = ",", header: bool = True) -> Path:
    text = frame.write_csv(separator=separator, include_header=header)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)
    return path


def ingest(inputs, out: Path, schema: dict | TableSchema = SCHEMA, **kw) -> dict:
    declared = schema if isinstance(schema, TableSchema) else TableSchema.of(schema)
    return run_ingest([Path(p) for p in inputs], "table", out, quiet=True, schema=declared, **kw)


def split_bytes(out: Path) -> list[bytes]:
    return [(out / name).read_bytes() for name in SPLIT_FILES]


@pytest.fixture(scope="module")
def log() -> pl.DataFrame:
    return user_log()


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory, log) -> Path:
    d = tmp_path_factory.mktemp("logs")
    write_csv(log, d / "log.csv")
    return d


# ------------------------------------------------------------------------------------------ formats
def test_csv_tsv_gz_and_parquet_give_the_same_dataset(tmp_path, log, csv_dir):
    write_csv(log, tmp_path / "log.tsv.gz", separator="\t", header=False)
    log.write_parquet(tmp_path / "log.parquet")
    m_csv = ingest([csv_dir / "log.csv"], tmp_path / "csv")
    m_tsv = ingest([tmp_path / "log.tsv.gz"], tmp_path / "tsv", {**SCHEMA, "header": False, "columns": COLUMNS})
    m_pq = ingest([tmp_path / "log.parquet"], tmp_path / "pq")
    for m in (m_csv, m_tsv, m_pq):
        assert m["rows"] == {"read": 1200, "written": 1200, "quarantined": 0}
        assert m["source"] == "table" and m["schema"]["label"]["column"] == "clicked"
    assert split_bytes(tmp_path / "csv") == split_bytes(tmp_path / "tsv") == split_bytes(tmp_path / "pq")
    fp = FeatureProcessor.load(tmp_path / "pq" / "features.json")
    assert fp.categorical == ["user_id", "ad_id", "site", "device"] and fp.dense == ["hour"]
    assert fp.label == "clicked" and fp.schema["time"]["column"] == "ts"
    train = pl.read_parquet(tmp_path / "csv" / "train.parquet")
    assert train.columns == ["label", "user_id", "ad_id", "site", "device", "hour", "hour__missing"]
    total_clicks = sum(int(pl.read_parquet(tmp_path / "csv" / f)["label"].sum()) for f in SPLIT_FILES)
    assert total_clicks == int(log["clicked"].sum())


def test_header_auto_detects_a_header_line(tmp_path, log):
    auto = {**SCHEMA, "header": "auto", "columns": COLUMNS}
    write_csv(log, tmp_path / "with.csv")
    write_csv(log, tmp_path / "without.csv", header=False)
    ingest([tmp_path / "with.csv"], tmp_path / "a", auto)
    ingest([tmp_path / "without.csv"], tmp_path / "b", auto)
    assert split_bytes(tmp_path / "a") == split_bytes(tmp_path / "b")


# ------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("reading,encode", [
    ({"reading": "binary"}, lambda c: f"{c}.0"),
    ({"reading": "boolean"}, lambda c: ["FALSE", "True"][c]),
    ({"reading": "threshold", "threshold": 30}, lambda c: str(45 if c else 3)),  # e.g. seconds of dwell
    ({"reading": "values", "positive": ["click"], "negative": ["view", "skip"]},
     lambda c: "click" if c else "view"),
])
def test_label_readings(tmp_path, log, reading, encode):
    clicks = log["clicked"].to_list()
    frame = log.with_columns(pl.Series("clicked", [encode(c) for c in clicks], dtype=pl.Utf8))
    write_csv(frame, tmp_path / "log.csv")
    m = ingest([tmp_path / "log.csv"], tmp_path / "out", {**SCHEMA, "label": {"column": "clicked", **reading}})
    assert m["rows"]["quarantined"] == 0
    labels = pl.concat([pl.read_parquet(tmp_path / "out" / f)["label"] for f in SPLIT_FILES])
    assert labels.dtype == pl.Float32 and set(labels.unique().to_list()) <= {0.0, 1.0}
    assert int(labels.sum()) == sum(clicks)


def test_boolean_labels_from_parquet(tmp_path, log):
    log.with_columns(pl.col("clicked").cast(pl.Boolean)).write_parquet(tmp_path / "log.parquet")
    boolean = {**SCHEMA, "label": {"column": "clicked", "reading": "boolean"}}
    ingest([tmp_path / "log.parquet"], tmp_path / "out", boolean)
    labels = pl.concat([pl.read_parquet(tmp_path / "out" / f)["label"] for f in SPLIT_FILES])
    assert int(labels.sum()) == int(log["clicked"].sum())


# ------------------------------------------------------------------------------------------ time split
def test_time_split_puts_the_latest_rows_in_test(tmp_path, log):
    shuffled = log.sample(fraction=1.0, shuffle=True, seed=3)  # file order is not time order
    write_csv(shuffled, tmp_path / "log.csv")
    m = ingest([tmp_path / "log.csv"], tmp_path / "out", split="time", valid_frac=0.1, test_frac=0.2)
    # The expected split: rank rows by time; ties share the split of their first row.
    ordered = shuffled.sort("ts")
    valid_from, test_from = ordered["ts"][960 - 120], ordered["ts"][960]
    expected = {"train": int((shuffled["ts"] < valid_from).sum()),
                "valid": int(((shuffled["ts"] >= valid_from) & (shuffled["ts"] < test_from)).sum()),
                "test": int((shuffled["ts"] >= test_from).sum())}
    assert m["splits"] == expected and abs(expected["test"] - 240) <= 3
    test = pl.read_parquet(tmp_path / "out" / "test.parquet")
    later = shuffled.filter(pl.col("ts") >= test_from)
    assert test.height == later.height and int(test["label"].sum()) == int(later["clicked"].sum())
    # Within a split rows keep their file order.
    fp = FeatureProcessor.load(tmp_path / "out" / "features.json")
    vocab = {v: i + 2 for i, v in enumerate(fp.vocab["user_id"])}
    assert test["user_id"].to_list() == [vocab.get(u, 1) for u in later["user_id"].to_list()]


def test_time_split_of_iso_datetimes_and_the_cli_default(tmp_path, log):
    frame = log.with_columns(pl.from_epoch("ts", time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S").alias("ts"))
    write_csv(frame.sample(fraction=1.0, shuffle=True, seed=5), tmp_path / "log.csv")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    code = cli_main(["ingest", "--source", "table", "--schema", str(tmp_path / "s.yaml"), "--input",
                     str(tmp_path / "log.csv"), "--out", str(tmp_path / "iso"), "--quiet"])
    assert code == 0
    manifest = json.loads((tmp_path / "iso" / "manifest.json").read_text())
    assert manifest["options"]["split"] == "time"  # a declared time column makes it the default
    write_csv(log.sample(fraction=1.0, shuffle=True, seed=5), tmp_path / "epoch.csv")
    ingest([tmp_path / "epoch.csv"], tmp_path / "epoch", split="time")
    assert split_bytes(tmp_path / "iso") == split_bytes(tmp_path / "epoch")


def test_time_split_needs_a_time_column(tmp_path, csv_dir):
    no_time = {k: v for k, v in SCHEMA.items() if k != "time"} | {"ignore": ["ts"]}
    with pytest.raises(UserError, match="--split time needs a time column"):
        ingest([csv_dir / "log.csv"], tmp_path / "out", no_time, split="time")


# ------------------------------------------------------------------------------------------ quarantine
def test_bad_rows_are_quarantined_with_reasons(tmp_path, log):
    lines = write_csv(log, tmp_path / "clean.csv").read_text().splitlines()
    bad = {
        5: ("1700000050,u1,a2,s3,ios,4,maybe", "label clicked: maybe is not 0 or 1"),
        9: ("1700000090,u1,a2,s3,ios,four,0", "field hour: four is not a finite number"),
        14: ("yesterday,u1,a2,s3,ios,4,1", "field ts: yesterday is not a time (number or ISO 8601)"),
        20: ("1700000200,u1,a2,s3,ios,4", "expected 7 fields, found 6"),
        31: ("", "empty line"),
        40: ("1700000400,u1,a2,s3,ios,4,", "label clicked: <missing> is not 0 or 1"),
    }
    for line_no, (raw, _) in bad.items():
        lines.insert(line_no - 1, raw)
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    m = ingest([tmp_path / "log.csv"], tmp_path / "out", max_bad_fraction=0.05, block_bytes=4096, split="time")
    assert m["rows"] == {"read": 1206, "written": 1200, "quarantined": 6}
    assert m["inputs"][0]["rows_read"] == m["inputs"][0]["rows_written"] + m["inputs"][0]["rows_quarantined"]
    records = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"], r["raw"]) for r in records] == [
        (line_no, reason, raw) for line_no, (raw, reason) in sorted(bad.items())]
    assert {r["file"] for r in records} == {str(tmp_path / "log.csv")}
    # The valid rows are exactly the clean file's dataset (the time split ranks valid rows only).
    ingest([tmp_path / "clean.csv"], tmp_path / "clean", split="time")
    for name in SPLIT_FILES:  # (the bytes differ: Parquet row groups follow the blocks of lines)
        assert pl.read_parquet(tmp_path / "out" / name).equals(pl.read_parquet(tmp_path / "clean" / name))


def test_bad_parquet_rows_name_the_row_and_keep_its_values(tmp_path, log):
    frame = log.with_columns(pl.col("clicked").cast(pl.Utf8), pl.col("hour").cast(pl.Utf8))
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 10).then(pl.lit("2")).otherwise(pl.col("clicked")).alias("clicked"),
        pl.when(pl.int_range(pl.len()) == 20).then(pl.lit("noon")).otherwise(pl.col("hour")).alias("hour"),
    )
    frame.write_parquet(tmp_path / "log.parquet", row_group_size=300)
    m = ingest([tmp_path / "log.parquet"], tmp_path / "out", block_bytes=256 * 100)
    assert m["rows"] == {"read": 1200, "written": 1198, "quarantined": 2}
    records = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in records] == [
        (11, "label clicked: 2 is not 0 or 1"), (21, "field hour: noon is not a finite number")]
    assert json.loads(records[1]["raw"])["hour"] == "noon" and json.loads(records[1]["raw"])["user_id"]


def test_too_many_bad_rows_fail_and_leave_no_dataset(tmp_path, log):
    frame = log.with_columns(pl.lit("yes").alias("clicked"))
    write_csv(frame, tmp_path / "log.csv")
    with pytest.raises(UserError, match="label clicked is not 0 or 1"):
        ingest([tmp_path / "log.csv"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ schema errors
@pytest.mark.parametrize("change,message", [
    ({"categorcal": ["site"]}, "unknown key 'categorcal'"),
    ({"label": {"column": "clicked", "reading": "threshold"}}, "'threshold' is needed"),
    ({"label": {"column": "clicked", "reading": "sometimes"}}, "'label.reading'"),
    ({"numeric": ["hour", "site"]}, "column 'site' is listed twice"),
    ({"header": False}, "needs 'columns'"),
    ({"categorical": ["label", "site"]}, "feature name 'label' is reserved"),
    ({"categorical": [], "numeric": []}, "at least one feature"),
])
def test_bad_schema_files_name_the_key(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SCHEMA, **change}))
    with pytest.raises(UserError, match=message) as info:
        TableSchema.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("change,message", [
    ({"categorical": ["user_id", "ad_id", "site"]}, r"column\(s\) 'device' have no role in the schema"),
    ({"categorical": ["user_id", "ad_id", "site", "device", "country"]},
     r"header lacks column\(s\) country declared in the schema"),
])
def test_schema_and_file_mismatch_is_one_line(tmp_path, csv_dir, change, message):
    with pytest.raises(UserError, match=message):
        ingest([csv_dir / "log.csv"], tmp_path / "out", {**SCHEMA, **change})


def test_format_mismatch_is_one_line(tmp_path, log, csv_dir):
    log.write_parquet(tmp_path / "log.parquet")
    with pytest.raises(UserError, match="is a Parquet file \\(the schema says format: csv\\)"):
        ingest([tmp_path / "log.parquet"], tmp_path / "a", {**SCHEMA, "format": "csv"})
    with pytest.raises(UserError, match="not a Parquet file"):
        ingest([csv_dir / "log.csv"], tmp_path / "b", {**SCHEMA, "format": "parquet"})
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes((tmp_path / "log.parquet").read_bytes()[:300])
    with pytest.raises(UserError, match=r"truncated\.parquet: unreadable Parquet file"):
        ingest([truncated], tmp_path / "c")


def test_cli_refuses_a_bad_schema_in_one_line(tmp_path, csv_dir, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**SCHEMA, "lable": "x"}))
    code = cli_main(["ingest", "--source", "table", "--schema", str(tmp_path / "s.yaml"), "--input",
                     str(csv_dir / "log.csv"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key 'lable'" in err and "Traceback" not in err
    assert cli_main(["ingest", "--source", "table", "--input", str(csv_dir / "log.csv"),
                     "--out", str(tmp_path / "out")]) == 2
    assert "needs a declared schema" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ determinism
def test_reruns_and_worker_counts_are_byte_identical(tmp_path, log, csv_dir):
    log.write_parquet(tmp_path / "log.parquet", row_group_size=200)
    runs = [ingest([tmp_path / "log.parquet"], tmp_path / name, block_bytes=256 * 250, split="time", workers=w)
            for name, w in (("a", 1), ("b", 1), ("c", 2))]
    assert len({m["fingerprint"] for m in runs}) == 1
    for name in (*SPLIT_FILES, "features.json", "quarantine.jsonl"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name
    assert ingest([csv_dir / "log.csv"], tmp_path / "csv1")["fingerprint"] == \
        ingest([csv_dir / "log.csv"], tmp_path / "csv2")["fingerprint"]
    d = ingest([csv_dir / "log.csv"], tmp_path / "d", {**SCHEMA, "numeric_transform": "log1p"})
    assert d["fingerprint"] != runs[0]["fingerprint"]  # the schema is part of what is fingerprinted


def test_schema_flags_equal_the_schema_file(tmp_path, csv_dir):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    common = ["ingest", "--source", "table", "--input", str(csv_dir / "log.csv"), "--quiet"]
    assert cli_main([*common, "--out", str(tmp_path / "file"), "--schema", str(tmp_path / "s.yaml")]) == 0
    assert cli_main([*common, "--out", str(tmp_path / "flags"), "--label", "clicked", "--categorical",
                     "user_id,ad_id,site,device", "--numeric", "hour", "--time", "ts"]) == 0
    for name in (*SPLIT_FILES, "features.json"):
        assert (tmp_path / "file" / name).read_bytes() == (tmp_path / "flags" / name).read_bytes()


# ------------------------------------------------------------------------------------------ train, predict, serve
@pytest.fixture(scope="module")
def table_data(tmp_path_factory, csv_dir) -> Path:
    data = tmp_path_factory.mktemp("table") / "data"
    ingest([csv_dir / "log.csv"], data)
    return data


def test_train_predict_and_serve_by_the_users_field_names(tmp_path, table_data):
    run_dir = train_tiny(table_data, tmp_path / "run", seed=0)
    new_rows = user_log(n=40, seed=99).drop("clicked")  # unlabeled logs to score
    write_csv(new_rows, tmp_path / "new.csv")
    preds_path = tmp_path / "preds.parquet"
    assert cli_main(["predict", "--bundle", str(run_dir), "--input", str(tmp_path / "new.csv"),
                     "--source", "table", "--out", str(preds_path)]) == 0
    preds = pl.read_parquet(preds_path)
    assert preds.height == 40 and "label" not in preds.columns
    assert ((preds["ctr"] > 0) & (preds["ctr"] < 1)).all()
    # The same rows as Parquet, read with a schema file given to predict: the same scores.
    new_rows.write_parquet(tmp_path / "new.parquet")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    assert cli_main(["predict", "--bundle", str(run_dir), "--input", str(tmp_path / "new.parquet"), "--source",
                     "table", "--schema", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "pq.parquet")]) == 0
    assert pl.read_parquet(tmp_path / "pq.parquet")["ctr"].to_list() == preds["ctr"].to_list()

    server = start_server(["--bundle", str(run_dir)], tmp_path / "serve.log")
    try:
        fields = ["user_id", "ad_id", "site", "device", "hour"]
        body = {"instances": new_rows.select(fields).to_dicts()}
        r = httpx.post(f"{server.url}/v1/predict", json=body, timeout=30)
        assert r.status_code == 200, r.text
        served = np.array([p["ctr"] for p in r.json()["predictions"]])
        np.testing.assert_allclose(served, preds["ctr"].to_numpy(), rtol=1e-5, atol=1e-7)
        info = httpx.get(f"{server.url}/v1/model", timeout=10).json()
        assert set(info["fields"]["categorical"]) == {"user_id", "ad_id", "site", "device"}
        r = httpx.post(f"{server.url}/v1/predict", json={"instances": [{"user_id": "u1", "clicks": 3}]}, timeout=30)
        assert r.status_code == 422 and r.json()["unknown_fields"] == ["clicks"]
    finally:
        server.stop()


def test_experiment_runs_unchanged_on_a_declared_log(tmp_path, table_data):
    from ctr_ad.experiment import load_experiment_config, run_experiment

    cfg = load_experiment_config({
        "training": {"model": {"components": 2, "embedding_dim": 4, "mlp": [8]},
                     "train": {"batch_size": 256, "epochs": 1, "early_stopping_patience": None, "threads": 1}},
        "replicas": 2,
        "workers": 1,  # in this process: no worker start-up on a busy machine
        "arms": [{"name": "plain"}, {"name": "logreg", "kind": "logreg", "max_iter": 50}],
    })
    results = run_experiment(table_data, cfg, tmp_path / "exp")
    assert set(results["arms"]) == {"plain", "logreg"}
    for arm in results["arms"].values():
        assert arm["accuracy"]["auc"]["n"] == 2 and 0.5 < arm["accuracy"]["auc"]["mean"] <= 1
    assert results["manifest"]["fingerprint"] == json.loads((table_data / "manifest.json").read_text())["fingerprint"]


def test_pipeline_datasets_take_a_schema(tmp_path):
    from ctr_ad.pipeline import PipelineConfig

    base = {"out": "runs", "experiment": "e.yaml"}
    ok = PipelineConfig.model_validate({**base, "datasets": [
        {"name": "mine", "source": "table", "schema": str(OBD_SCHEMA), "inputs": [str(OBD)]}]})
    assert ok.datasets[0].schema_file == str(OBD_SCHEMA)
    with pytest.raises(ValueError, match="'schema' goes with source: table"):
        PipelineConfig.model_validate({**base, "datasets": [{"name": "m", "source": "table", "inputs": ["x"]}]})


# ------------------------------------------------------------------------------------------ documented example
def test_documented_open_bandit_schema_ingests_the_real_sample_and_trains(tmp_path):
    schema = TableSchema.load(OBD_SCHEMA)
    m = run_ingest([OBD], "table", tmp_path / "obd", quiet=True, schema=schema, split="time")
    assert m["rows"] == {"read": 10000, "written": 10000, "quarantined": 0}
    assert m["splits"] == {"train": 8000, "valid": 1000, "test": 1000}
    labels = pl.concat([pl.read_parquet(tmp_path / "obd" / f)["label"] for f in SPLIT_FILES])
    assert int(labels.sum()) == 38  # the sample's clicks (data/README.md)
    fp = FeatureProcessor.load(tmp_path / "obd" / "features.json")
    assert len(fp.dense) == 80 and fp.categorical[:2] == ["item_id", "position"]
    # The declared schema is the built-in `obd` source's: same rows, same encoding, byte for byte.
    run_ingest([OBD], "table", tmp_path / "seq", quiet=True, schema=schema, split="sequential")
    run_ingest([OBD], "obd", tmp_path / "builtin", quiet=True)
    assert split_bytes(tmp_path / "seq") == split_bytes(tmp_path / "builtin")
    result = train_tiny(tmp_path / "obd", tmp_path / "run", seed=0)
    assert (result / "bundle").is_dir()


@pytest.mark.parametrize("source,schema_file,inputs", [
    ("criteo", "criteo.yaml", CRITEO_8K),
    ("avazu", "avazu.yaml", [AVAZU_9K / f"{s}.csv" for s in ("train", "dev", "test")]),
])
def test_builtin_layouts_as_declared_schemas_write_the_same_splits(tmp_path, source, schema_file, inputs):
    if not inputs[0].exists():
        pytest.skip(f"{inputs[0].parent} absent on this machine (Avazu rows may not be redistributed)")
    schema = TableSchema.load(REPO / "pipelines" / "schemas" / schema_file)
    declared = run_ingest(inputs, "table", tmp_path / "declared", quiet=True, schema=schema, split="files")
    builtin = run_ingest(inputs, source, tmp_path / "builtin", quiet=True, split="files")
    assert declared["rows"] == builtin["rows"] and declared["splits"] == builtin["splits"]
    assert split_bytes(tmp_path / "declared") == split_bytes(tmp_path / "builtin")
    a = FeatureProcessor.load(tmp_path / "declared" / "features.json").to_dict()
    b = FeatureProcessor.load(tmp_path / "builtin" / "features.json").to_dict()
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"schema", "source"}
