"""ONNX export and the onnxruntime serving backend, on bundles trained on the real Criteo 8k sample:
parity with ``ctr-ad predict`` on every row of the real Criteo samples, the files written beside the
graph, and ``ctr-ad serve --backend onnxruntime`` answering the same routes as the PyTorch backend."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
from helpers_extras import require_extra
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import CRITEO_8K, REPO, ingest_8k, instances, start_server

from ctr_ad import metrics
from ctr_ad.bundle import BundleError, load
from ctr_ad.cli import main as ctr_ad_main
from ctr_ad.config import load_config
from ctr_ad.train import train

onnx = require_extra("onnx", "onnx")
onnxruntime = require_extra("onnxruntime", "onnx")

from service.onnx_backend import OnnxBundle  # noqa: E402 - needs onnxruntime

VARIANTS = REPO / "data" / "criteo-variants"
# Every real Criteo sample of data/ with the reader it needs: the test split, then the other layouts.
REAL_SAMPLES = [
    (CRITEO_8K / "test.tsv", "criteo"),
    (CRITEO_8K / "dev.tsv", "criteo"),
    (VARIANTS / "criteo-1k-stripped-trailing.tsv", "criteo"),
    (VARIANTS / "kaggle-train-2k-with-id.csv", "criteo-csv"),
    (VARIANTS / "kaggle-test-2k-placeholder-labels.csv", "criteo-csv"),
    (VARIANTS / "criteo-200-header-floats.csv", "criteo-csv"),
]
TOLERANCE = 1e-5


def _train(data: Path, run: Path, seed: int, extra: list[str]) -> Path:
    cfg = load_config(REPO / "pipelines" / "configs" / "demo.yaml", [
        "model.components=3", "model.embedding_dim=4", "model.mlp=[16]", "model.dropout=0.1", "train.epochs=1",
        "train.batch_size=512", "train.progress=false", "train.threads=1", f"train.seed_init={seed}",
        f"train.seed_data={seed}", *extra,
    ])
    assert train(data, cfg, run, log=False).bundle_dir is not None
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    data = ingest_8k(root / "data")
    # Run a exercises every op of the graph: the frozen linear anchor, SmeLU, dropout (off at inference).
    specs = [("a", 0, ["model.anchor=logreg", "model.anchor_C=0.03", "model.activation=smelu"]), ("b", 1, [])]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda s: _train(data, root / f"run-{s[0]}", s[1], s[2]), specs)
    out = {"root": root, "a": a, "b": b}
    for name in ("a", "b"):
        assert ctr_ad_main(["export", "--bundle", str(out[name]), "--format", "onnx",
                            "--out", str(root / f"onnx-{name}" / "model.onnx")]) == 0
        out[f"onnx-{name}"] = root / f"onnx-{name}" / "model.onnx"
    return out


def _session(path: Path) -> Any:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_the_graph_its_features_and_a_readme(runs: dict[str, Path]) -> None:
    graph = runs["onnx-a"]
    bundle = load(runs["a"])
    assert (graph.parent / "features.json").read_bytes() == (bundle.path / "features.json").read_bytes()
    readme = (graph.parent / "model.README.md").read_text()
    assert "int64 | [batch, 26]" in readme and "C26 (<" in readme and "I13__missing" in readme
    proto = onnx.load(str(graph))
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert shapes == {"cat": ["batch", 26], "dense": ["batch", 26]}
    assert [o.name for o in proto.graph.output] == ["ctr", "components"]
    doc = json.loads({p.key: p.value for p in proto.metadata_props}["ctr_ad"])
    assert doc["components"] == 3 and doc["config"]["model"]["anchor"] == "logreg"
    assert doc["metadata"]["data_fingerprint"] == bundle.metadata["data_fingerprint"]


def test_onnx_matches_ctr_ad_predict_on_every_real_criteo_row(runs: dict[str, Path], tmp_path: Path) -> None:
    from ctr_ad.ingest.reader import read_raw

    bundle = load(runs["a"])
    session = _session(runs["onnx-a"])
    worst, rows = 0.0, 0
    for path, source in REAL_SAMPLES:
        out = tmp_path / f"{path.stem}.parquet"
        assert ctr_ad_main(["predict", "--bundle", str(runs["a"]), "--input", str(path), "--source", source,
                            "--out", str(out)]) == 0
        predicted = pl.read_parquet(out)
        raw, _ = read_raw([path], source)
        cat, dense = bundle.features.encode(raw)
        ctr, comps = session.run(None, {"cat": cat, "dense": dense})
        assert predicted.get_column("line").to_list() == raw.get_column("_line").to_list()
        delta = max(np.abs(ctr - predicted.get_column("ctr").to_numpy()).max(),
                    np.abs(comps - predicted.select("p_0", "p_1", "p_2").to_numpy()).max())
        assert delta <= TOLERANCE, f"{path.name}: max |Δp| {delta:.3g}"
        worst, rows = max(worst, float(delta)), rows + raw.height
        # A batch of one row (dynamic batch) scores like the same row inside a batch.
        one, _ = session.run(None, {"cat": cat[:1], "dense": dense[:1]})
        assert abs(float(one[0]) - float(ctr[0])) <= 1e-6
    assert rows == 391 + 409 + 1000 + 1999 + 1999 + 200
    print(f"ONNX parity: max |Δp| {worst:.3g} over {rows} real rows")


def test_export_refuses_bad_destinations(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert ctr_ad_main(["export", "--bundle", str(runs["a"]), "--out", str(tmp_path / "model.pt")]) == 2
    assert capsys.readouterr().err.strip().endswith("--out must end in .onnx")
    # Another encoding already lives in the target directory: refuse rather than pair the graph with it.
    (tmp_path / "features.json").write_text("{}")
    assert ctr_ad_main(["export", "--bundle", str(runs["a"]), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "exists with another feature encoding" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def test_backend_refuses_a_graph_without_its_own_features(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    copy = tmp_path / "graph"
    copy.mkdir()
    (copy / "model.onnx").write_bytes(runs["onnx-a"].read_bytes())
    with pytest.raises(BundleError, match=r"features\.json: missing"):
        OnnxBundle.load(copy)
    (copy / "features.json").write_bytes((runs["onnx-b"].parent / "features.json").read_bytes() + b" ")
    with pytest.raises(BundleError, match="checksum mismatch"):
        OnnxBundle.load(copy / "model.onnx")
    # A bundle directory is not a graph: one line saying how to make one, nothing bound.
    assert ctr_ad_main(["serve", "--backend", "onnxruntime", "--bundle", str(runs["a"]), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "expected one .onnx graph, found 0" in err and "ctr-ad export" in err and len(err.splitlines()) == 1


def test_onnxruntime_backend_serves_the_same_routes(runs: dict[str, Path]) -> None:
    from ctr_ad.ingest.reader import read_raw

    root = runs["root"]
    server = start_server(["--backend", "onnxruntime", "--bundle", str(runs["onnx-a"]), "--shadow",
                           str(runs["onnx-b"].parent), "--alert-min-instances", "50", "--shadow-linger-ms", "1"],
                          root / "onnx-serve.log")
    try:
        a, b = load(runs["a"]), load(runs["b"])
        rows, _ = read_raw([CRITEO_8K / "test.tsv"], "criteo")
        r = httpx.post(f"{server.url}/v1/predict", json={"instances": instances(rows, a.features.raw_fields)},
                       params={"components": "true"}, timeout=30)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        expected = a.predict_raw(rows)
        np.testing.assert_allclose([p["ctr"] for p in preds], expected.ctr, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose([p["components"] for p in preds], expected.components, rtol=0, atol=TOLERANCE)
        info = httpx.get(f"{server.url}/v1/model", timeout=10).json()
        assert info["backend"] == "onnxruntime" and info["components"] == 3
        from service.model_store import model_version

        assert info["model_version"] == model_version(a.path, a.metadata) == r.headers["x-model-version"]
        # Monitoring: the shadow (also a graph) scores the same rows; live PD = the offline PD of these rows.
        start = time.monotonic()
        while True:
            rep = httpx.get(f"{server.url}/v1/monitoring/reproducibility", timeout=10).json()
            if rep["shadow"]["instances"] >= len(preds) or time.monotonic() - start > 30:
                break
            time.sleep(0.05)
        offline = metrics.pd_metrics(expected.ctr, b.predict_raw(rows).ctr)
        assert rep["shadow"]["instances"] == len(preds) == 391
        assert rep["shadow"]["pd_rel"] == pytest.approx(offline["pd_rel"], rel=1e-4)
        fams = {f.name for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
        assert "ctr_ad_live_pd_rel" in fams
        bad = httpx.post(f"{server.url}/v1/predict", json={"instances": [{"I1": "x"}]}, timeout=10)
        assert bad.status_code == 422
    finally:
        server.stop()


def test_offline_figures_of_a_graph_name_the_graph_as_their_source(tmp_path: Path) -> None:
    from service.model_store import offline_metrics

    graph = tmp_path / "model.onnx"
    found = offline_metrics(tmp_path, {"offline_metrics": {"pd_rel": 0.05}}, metadata_file=graph)
    assert found == {"pd_rel": 0.05, "source": str(graph)}
    # A bundle directory keeps naming its metadata.json.
    assert offline_metrics(tmp_path, {"pd_rel": 0.07})["source"] == str(tmp_path / "metadata.json")
