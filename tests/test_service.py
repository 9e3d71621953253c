"""The prediction service end to end: real ``ctr-ad serve`` processes on free loopback ports, bundles
trained in the session on the real 8k Criteo sample.

Two servers share the module: ``main`` (bundle A published as a pipeline does, with its offline
pd_rel; shadow B; admin token) and ``plain`` (bundle A, no shadow, admin disabled, small limits, a
short body-read timeout, inline inference) — the fuzzing and bad-input tests run against ``plain``
so they cannot disturb ``main``'s monitoring figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import (
    CRITEO_8K,
    Server,
    cli,
    ingest_8k,
    instances,
    raw_rows,
    start_server,
    subprocess_env,
    train_tiny,
)

from ctr_ad import metrics
from ctr_ad.artifacts import OfflineMetrics, write_document
from ctr_ad.bundle import load
from ctr_ad.errors import UserError
from ctr_ad.features import as_numpy
from service.command import add_arguments, settings_from_args
from service.encoding import RecordEncoder, RequestParser
from service.model_store import load_slot, offline_metrics
from service.monitoring import BucketHistogram, FeedbackStore, Monitor, RollingWindow
from service.settings import ServiceSettings

TOKEN = "test-admin-token"
OFFLINE_PD_REL = 1e-4  # far below any real PD: the alert must fire once enough pairs are seen
MIN_PAIRS = 50
BODY_TIMEOUT_S = 1.5


def publish(root: Path, bundles: dict[str, Path], current: str, pd_rel: float) -> Path:
    """``root/{CURRENT, offline_metrics.json, bundles/<name>/}`` as the pipeline publishes them."""
    for name, src in bundles.items():
        shutil.copytree(src, root / "bundles" / name)
    (root / "CURRENT").write_text(f"bundles/{current}\n")
    # Written with the contract's own model and writer, as the pipeline's publish step does.
    write_document(root / "offline_metrics.json",
                   OfflineMetrics(bundle=f"bundles/{current}", dataset="criteo-8k", arm="test", pd_rel=pd_rel))
    return root


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("service")
    data = ingest_8k(root / "data")
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda s: train_tiny(data, root / f"run{s}", seed=s), (0, 1))
    # What the pipeline publishes: the bundle and the offline reproducibility of its experiment.
    published = publish(root / "published", {"a": a / "bundle"}, "a", OFFLINE_PD_REL)
    return {"data": data, "a": a, "b": b, "root": root, "published": published}


@pytest.fixture(scope="module")
def servers(runs: dict[str, Path]) -> Any:
    root = runs["root"]
    main_args = ["--bundle", str(runs["published"]), "--shadow", str(runs["b"]),
                 "--alert-min-instances", str(MIN_PAIRS), "--shadow-linger-ms", "1"]
    plain_args = ["--bundle", str(runs["a"] / "bundle"), "--max-instances", "50", "--max-body-bytes", "65536",
                  "--inference", "inline", "--admin-token-env", "CTR_AD_TEST_TOKEN_NOT_SET",
                  "--body-timeout-s", str(BODY_TIMEOUT_S)]
    with ThreadPoolExecutor(2) as pool:
        main_f = pool.submit(start_server, main_args, root / "main.log", CTR_AD_ADMIN_TOKEN=TOKEN)
        plain_f = pool.submit(start_server, plain_args, root / "plain.log", CTR_AD_ADMIN_TOKEN=TOKEN)
        main, plain = main_f.result(), plain_f.result()
    yield {"main": main, "plain": plain}
    for s in (main, plain):
        s.stop()


@pytest.fixture(scope="module")
def main(servers: dict[str, Server]) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def plain(servers: dict[str, Server]) -> Server:
    return servers["plain"]


@pytest.fixture(scope="module")
def bundles(runs: dict[str, Path]) -> dict[str, Any]:
    return {"a": load(runs["a"]), "b": load(runs["b"])}


@pytest.fixture(scope="module")
def test_rows() -> pl.DataFrame:
    return raw_rows(CRITEO_8K / "test.tsv")


def fields_of(bundle: Any) -> list[str]:
    return bundle.features.raw_fields


def predict(server: Server, insts: list[dict[str, Any]], **params: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/predict", json={"instances": insts}, params=params, timeout=30)


def admin(server: Server, body: dict[str, Any] | None = None, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.url}/v1/admin/reload", json=body or {}, headers=headers, timeout=60)


def reproducibility(server: Server) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/monitoring/reproducibility", timeout=10)
    assert r.status_code == 200
    return r.json()


def wait_for_shadow(server: Server, n: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rep = reproducibility(server)
        if rep["shadow"]["instances"] >= n or time.monotonic() > deadline:
            return rep
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ predict
def test_health_ready_and_loopback_default(main: Server) -> None:
    assert main.host == "127.0.0.1"  # started without --host
    assert httpx.get(f"{main.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{main.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_predict_single_and_batch(main: Server, bundles: dict[str, Any], test_rows: pl.DataFrame) -> None:
    insts = instances(test_rows.head(5), fields_of(bundles["a"]))
    one = predict(main, insts[:1])
    assert one.status_code == 200, one.text
    body = one.json()
    assert len(body["predictions"]) == 1 and set(body["predictions"][0]) == {"ctr", "component_std"}
    assert body["request_id"] == one.headers["x-request-id"]
    assert body["model_version"] == one.headers["x-model-version"]
    batch = predict(main, insts, components="true").json()
    preds = batch["predictions"]
    assert len(preds) == 5 and batch["request_id"] != body["request_id"]
    for p in preds:
        comps = np.array(p["components"])
        assert comps.shape == (3,) and 0 < p["ctr"] < 1
        assert p["ctr"] == pytest.approx(comps.mean(), abs=1e-7)  # mean_prob ensemble
        assert p["component_std"] == pytest.approx(comps.std(), abs=1e-7)
    assert preds[0]["ctr"] == pytest.approx(body["predictions"][0]["ctr"], abs=1e-6)
    # An empty instance is all-missing, which is a valid input.
    assert predict(main, [{}]).status_code == 200


def test_served_predictions_equal_batch_predict(main: Server, runs: dict[str, Path], bundles: dict[str, Any],
                                                test_rows: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "pred.parquet"
    r = cli("predict", "--bundle", str(runs["a"]), "--input", str(CRITEO_8K / "test.tsv"), "--source", "criteo",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    batch = pl.read_parquet(out).sort("line")
    rows = test_rows.sort("_line")
    assert batch.get_column("line").to_list() == rows.get_column("_line").to_list()
    served = predict(main, instances(rows, fields_of(bundles["a"])), components="true")
    assert served.status_code == 200, served.text
    preds = served.json()["predictions"]
    ctr = np.array([p["ctr"] for p in preds])
    comps = np.array([p["components"] for p in preds])
    assert len(ctr) == batch.height == 391
    np.testing.assert_allclose(ctr, batch.get_column("ctr").to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(comps, batch.select("p_0", "p_1", "p_2").to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose([p["component_std"] for p in preds], batch.get_column("component_std").to_numpy(),
                               rtol=0, atol=1e-6)


def test_numpy_encoder_equals_feature_transform_on_all_8k_rows(bundles: dict[str, Any]) -> None:
    fp = bundles["a"].features
    frames = [raw_rows(CRITEO_8K / f"{s}.tsv") for s in ("train", "dev", "test")]
    raw = pl.concat(frames, how="diagonal_relaxed")
    body = json.dumps({"instances": instances(raw, fp.raw_fields)}).encode()
    parsed = RequestParser(fp, max_instances=10_000).parse(body)
    cat, dense = RecordEncoder(fp).encode(parsed)
    cat_ref, dense_ref = as_numpy(fp.transform(raw), fp)
    assert cat.shape == cat_ref.shape and raw.height > 7900
    np.testing.assert_array_equal(cat, cat_ref)
    np.testing.assert_array_equal(dense, dense_ref)


def test_model_info(main: Server, bundles: dict[str, Any]) -> None:
    info = httpx.get(f"{main.url}/v1/model").json()
    meta = bundles["a"].metadata
    assert info["components"] == 3
    assert info["penalty"] == meta["penalty"] and info["lambda"] == meta["lambda"]
    assert info["data_fingerprint"] == meta["data_fingerprint"] and info["data_fingerprint"]
    assert info["valid_metrics"] == meta["valid_metrics"] and "logloss" in info["valid_metrics"]
    assert info["created_at"] == meta["created_at"]
    assert info["offline_pd_rel"] == OFFLINE_PD_REL
    assert info["fields"]["dense"][0] == "I1" and info["fields"]["categorical"][-1] == "C26"
    assert info["shadow"]["model_version"] != info["model_version"]


# ------------------------------------------------------------------------------------------ monitoring
def test_monitoring_tracks_shadow_pd_and_alerts(main: Server, runs: dict[str, Path], bundles: dict[str, Any],
                                                test_rows: pl.DataFrame) -> None:
    rows = test_rows.head(300)
    insts = instances(rows, fields_of(bundles["a"]))
    p_a = bundles["a"].predict_raw(rows)
    p_b = bundles["b"].predict_raw(rows)

    # 1. Shadow = a copy of the primary: live PD is exactly 0, no alert.
    r = admin(main, {"shadow": str(runs["a"])})
    assert r.status_code == 200, r.text
    before = reproducibility(main)
    assert before["window"]["instances"] == 0 and before["shadow"]["instances"] == 0  # reload restarts windows
    for chunk in range(0, 300, 100):
        assert predict(main, insts[chunk:chunk + 100]).status_code == 200
    rep = wait_for_shadow(main, 300)
    assert rep["instances_seen"] == before["instances_seen"] + 300
    assert rep["window"]["instances"] == 300
    assert rep["shadow"]["instances"] == 300 and rep["shadow"]["pd_abs"] == 0.0 and rep["shadow"]["pd_rel"] == 0.0
    assert rep["alert"] is False
    spread = rep["component_spread"]
    assert spread["mean"] == pytest.approx(p_a.component_std.mean(), abs=1e-7)
    assert spread["p50"] == pytest.approx(np.quantile(p_a.component_std, 0.5), abs=1e-7)
    assert spread["p99"] <= spread["max"]

    # 2. Shadow = the independently trained replica: live PD = offline PD of the same rows; alert.
    r = admin(main, {"shadow": str(runs["b"])})
    assert r.status_code == 200, r.text
    for chunk in range(0, 300, 100):
        assert predict(main, insts[chunk:chunk + 100]).status_code == 200
    rep = wait_for_shadow(main, 300)
    shadow = rep["shadow"]
    assert shadow["instances"] == 300 and shadow["dropped"] == 0
    offline = metrics.pd_metrics(p_a.ctr, p_b.ctr)  # what an offline replica comparison reports
    pd_rel = offline["pd_rel"]
    assert shadow["pd_abs"] == pytest.approx(offline["pd_abs"], rel=1e-5) and shadow["pd_abs"] > 0
    assert shadow["pd_rel"] == pytest.approx(pd_rel, rel=1e-5)
    assert shadow["pd_rms"] == pytest.approx(offline["pd_rms"], rel=1e-5)
    assert rep["offline"]["pd_rel"] == OFFLINE_PD_REL and rep["offline"]["source"].endswith("offline_metrics.json")
    assert rep["alert"] is True and rep["alert_detail"]["live_pd_rel"] > 2 * OFFLINE_PD_REL

    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{main.url}/metrics").text)}
    alert = [s.value for s in fams["ctr_ad_reproducibility_alert"].samples]
    assert alert == [1.0]
    live = [s.value for s in fams["ctr_ad_live_pd_rel"].samples]
    assert live[0] == pytest.approx(pd_rel, rel=1e-5)


def test_monitoring_without_shadow_reports_spread(plain: Server, bundles: dict[str, Any],
                                                  test_rows: pl.DataFrame) -> None:
    before = reproducibility(plain)
    insts = instances(test_rows.head(40), fields_of(bundles["a"]))
    assert predict(plain, insts).status_code == 200
    rep = reproducibility(plain)
    assert rep["instances_seen"] == before["instances_seen"] + 40
    assert rep["component_spread"]["mean"] > 0 and rep["component_spread"]["components"] == 3
    assert rep["shadow"]["enabled"] is False and rep["shadow"]["pd_rel"] is None
    assert rep["alert"] is False and "no shadow" in rep["alert_detail"]["reason"]


def _alert_after(pairs: tuple[np.ndarray, np.ndarray], offline_pd_rel: float, **settings: Any) -> dict[str, Any]:
    """The alert of a monitor fed ``pairs`` (primary, shadow) for a primary with this offline pd_rel."""
    monitor = Monitor(ServiceSettings(bundle="unused", **settings))
    monitor.record_shadow(*pairs)
    state = SimpleNamespace(primary=SimpleNamespace(offline={"pd_rel": offline_pd_rel}), shadow=object())
    return monitor.alert_state(state)  # type: ignore[arg-type]


def test_alert_stays_off_at_a_realistic_offline_pd_rel(bundles: dict[str, Any], test_rows: pl.DataFrame) -> None:
    """Offline pd_rel measured between the two replicas on the dev rows; live pairs on the test rows:
    the same retraining noise, so no alert — and the same pairs do alert against 1e-4."""
    dev = raw_rows(CRITEO_8K / "dev.tsv")
    offline = metrics.pd_metrics(bundles["a"].predict_raw(dev).ctr, bundles["b"].predict_raw(dev).ctr)["pd_rel"]
    live = (bundles["a"].predict_raw(test_rows).ctr, bundles["b"].predict_raw(test_rows).ctr)
    assert 1e-3 < offline < 1  # a real retraining difference, not a placeholder
    calm = _alert_after(live, offline, alert_min_instances=MIN_PAIRS)
    assert calm["alert"] is False and calm["live_pd_rel"] < 2 * offline, calm
    assert "≤" in calm["reason"]
    assert _alert_after(live, OFFLINE_PD_REL, alert_min_instances=MIN_PAIRS)["alert"] is True


def test_alert_min_instances_gates_the_alert(bundles: dict[str, Any], test_rows: pl.DataFrame) -> None:
    p_a, p_b = bundles["a"].predict_raw(test_rows).ctr, bundles["b"].predict_raw(test_rows).ctr
    n = len(p_a)
    below = _alert_after((p_a, p_b), OFFLINE_PD_REL, alert_min_instances=n + 1)
    assert below["alert"] is False and f"fewer than {n + 1}" in below["reason"]
    assert _alert_after((p_a, p_b), OFFLINE_PD_REL, alert_min_instances=n)["alert"] is True


def test_feedback_gives_online_logloss_and_calibration(main: Server, bundles: dict[str, Any]) -> None:
    rows = raw_rows(CRITEO_8K / "dev.tsv").head(120)
    insts = instances(rows, fields_of(bundles["a"]))
    labels = rows.get_column("label").cast(pl.Int64).to_list()
    served = [predict(main, insts[i:i + 40]).json() for i in range(0, 120, 40)]
    p = np.concatenate([[x["ctr"] for x in s["predictions"]] for s in served])
    # A wrong number of labels is rejected and consumes nothing.
    bad = httpx.post(f"{main.url}/v1/feedback",
                     json={"outcomes": [{"request_id": served[0]["request_id"], "labels": [1]}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["path"] == "outcomes[0].labels"
    outcomes = [{"request_id": s["request_id"], "labels": labels[i * 40:(i + 1) * 40]} for i, s in enumerate(served)]
    outcomes.append({"request_id": "never-served", "labels": [1]})
    r = httpx.post(f"{main.url}/v1/feedback", json={"outcomes": outcomes})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted_labels": 120, "unknown_request_ids": ["never-served"]}
    again = httpx.post(f"{main.url}/v1/feedback", json={"outcomes": outcomes[:1]}).json()
    assert again["accepted_labels"] == 0 and again["unknown_request_ids"] == [served[0]["request_id"]]
    online = reproducibility(main)["online"]
    y = np.array(labels, dtype=float)
    assert online["instances"] == 120
    assert online["logloss"] == pytest.approx(metrics.logloss(y, p), rel=1e-9)
    assert online["calibration"] == pytest.approx(metrics.calibration(y, p), rel=1e-9)
    assert sum(b["instances"] for b in online["reliability"]) == 120


def test_prometheus_metrics_parse(main: Server) -> None:
    assert predict(main, [{"I1": 1}]).status_code == 200
    text = httpx.get(f"{main.url}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("ctr_ad_http_requests", "ctr_ad_http_request_duration_seconds", "ctr_ad_instances_scored",
                 "ctr_ad_component_spread", "ctr_ad_shadow_abs_diff", "ctr_ad_shadow_rel_diff", "ctr_ad_model_info",
                 "ctr_ad_ready"):
        assert name in fams, name
    req = [s for s in fams["ctr_ad_http_requests"].samples
           if s.labels.get("route") == "/v1/predict" and s.labels.get("status") == "200" and s.name.endswith("_total")]
    assert req and req[0].value >= 1
    lat = [s for s in fams["ctr_ad_http_request_duration_seconds"].samples
           if s.name.endswith("_count") and s.labels["route"] == "/v1/predict"]
    assert lat and lat[0].value >= 1
    # Every answered prediction went through exactly one forward pass, shared or not.
    passes = fams["ctr_ad_inference_forward_passes"].samples[0].value
    batched = fams["ctr_ad_inference_batched_requests"].samples[0].value
    assert 1 <= passes <= batched == req[0].value
    roles = {s.labels["role"] for s in fams["ctr_ad_model_info"].samples}
    assert roles == {"primary", "shadow"}
    spread_count = [s.value for s in fams["ctr_ad_component_spread"].samples if s.name.endswith("_count")]
    assert spread_count[0] >= 1
    scored = {s.labels["role"]: s.value for s in fams["ctr_ad_instances_scored"].samples if s.name.endswith("_total")}
    assert scored["primary"] >= scored["shadow"] > 0


# ------------------------------------------------------------------------------------------ admin
def test_admin_auth(main: Server, plain: Server) -> None:
    assert admin(main, token=None).status_code == 401
    assert admin(main, token="wrong").status_code == 401
    r = httpx.post(f"{main.url}/v1/admin/reload", json={}, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    bad = admin(main, {"bundle": "/nonexistent/run"})
    assert bad.status_code == 422 and "bundle not found" in bad.json()["detail"][0]["msg"]
    # Admin disabled (no token configured): the routes do not exist, with or without a token.
    assert admin(plain, token=None).status_code == 404
    assert admin(plain).status_code == 404


def test_reload_under_load_loses_no_request(main: Server, runs: dict[str, Path], bundles: dict[str, Any],
                                            test_rows: pl.DataFrame) -> None:
    rows = test_rows.head(8)
    insts = instances(rows, fields_of(bundles["a"]))
    expected = {k: bundles[k].predict_raw(rows).ctr for k in ("a", "b")}
    version_a = httpx.get(f"{main.url}/v1/model").json()["model_version"]
    results: list[tuple[int, str, list[float]]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{main.url}/v1/predict", json={"instances": insts})
                body = r.json()
                results.append((r.status_code, body.get("model_version", ""),
                                [p["ctr"] for p in body.get("predictions", [])]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    versions = {version_a: "a"}
    try:
        for target in ("b", "a", "b", "a"):
            time.sleep(0.3)
            r = admin(main, {"bundle": str(runs[target])})
            assert r.status_code == 200, r.text
            versions[r.json()["model_version"]] = target
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(results) > 20
    assert all(status == 200 for status, _, _ in results), {s for s, _, _ in results}
    seen = {v for _, v, _ in results}
    assert seen <= set(versions) and {versions[v] for v in seen} == {"a", "b"}
    for _, version, ctr in results:
        # Every response comes whole from the model it names: no request straddles a swap.
        np.testing.assert_allclose(ctr, expected[versions[version]], rtol=0, atol=1e-6)
    assert httpx.get(f"{main.url}/v1/model").json()["model_version"] == version_a
    assert httpx.get(f"{main.url}/readyz").status_code == 200


# ------------------------------------------------------------------------------------------ bad input
BAD_BODIES: list[tuple[str, bytes, int, str | None]] = [
    ("malformed-json", b'{"instances": [{"I1": 3,', 400, None),
    ("not-json", b"I1=3&C1=x", 400, None),
    ("empty-body", b"", 400, None),
    ("string-for-dense", b'{"instances": [{"I1": "three"}]}', 422, "instances[0].I1"),
    ("bool-for-dense", b'{"instances": [{"I1": 1}, {"I2": true}]}', 422, "instances[1].I2"),
    ("number-for-categorical", b'{"instances": [{"C3": 1.5}]}', 422, "instances[0].C3"),
    ("object-for-categorical", b'{"instances": [{"C3": {"a": 1}}]}', 422, "instances[0].C3"),
    ("nan", b'{"instances": [{"I4": NaN}]}', 422, "instances[0].I4"),
    ("infinity", b'{"instances": [{"I4": -Infinity}]}', 422, "instances[0].I4"),
    ("overflow", b'{"instances": [{"I4": 1e400}]}', 422, "instances[0].I4"),
    ("huge-int", b'{"instances": [{"I4": ' + b"9" * 400 + b"}]}", 422, "instances[0].I4"),
    ("non-integer-count", b'{"instances": [{"I5": 2.5}]}', 422, "instances[0].I5"),
    ("unknown-fields", b'{"instances": [{"I1": 1, "bogus": 2, "zzz": "x"}]}', 422, "instances[0].bogus"),
    ("instance-not-object", b'{"instances": [[1, 2]]}', 422, "instances[0]"),
    ("instances-not-list", b'{"instances": {"I1": 1}}', 422, "instances"),
    ("no-instances", b'{"rows": []}', 422, "instances"),
    ("empty-instances", b'{"instances": []}', 422, "instances"),
    ("body-is-list", b"[{}]", 422, "<body>"),
    ("too-many-instances", json.dumps({"instances": [{}] * 51}).encode(), 413, "instances"),
]


@pytest.mark.parametrize(("name", "body", "status", "path"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_clear_4xx(plain: Server, name: str, body: bytes, status: int, path: str | None) -> None:
    r = httpx.post(f"{plain.url}/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail and all(d["msg"] for d in detail)
    if path is not None:
        assert detail[0]["path"] == path, detail
    if name == "unknown-fields":
        assert r.json()["unknown_fields"] == ["bogus", "zzz"]
        assert "'bogus'" in detail[0]["msg"] and "I1..I13" in detail[0]["msg"]


def test_oversized_bodies_and_bad_params_then_still_serving(plain: Server) -> None:
    big = b'{"instances": [' + b'{"C1": "' + b"x" * 70_000 + b'"}]}'
    r = httpx.post(f"{plain.url}/v1/predict", content=big)
    assert r.status_code == 413 and "limit" in r.json()["detail"][0]["msg"]

    def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(f"{plain.url}/v1/predict", content=chunks())
    assert r.status_code == 413
    r = httpx.post(f"{plain.url}/v1/predict", params={"components": "perhaps"}, json={"instances": [{}]})
    assert r.status_code == 422 and r.json()["detail"][0]["path"] == "components"
    assert httpx.get(f"{plain.url}/v1/predict").status_code == 405
    assert httpx.get(f"{plain.url}/no/such/route").status_code == 404
    assert httpx.post(f"{plain.url}/v1/feedback", content=b"{", headers={"content-type": "application/json"}
                      ).status_code == 400
    # ... and the server is still up and scoring.
    assert httpx.get(f"{plain.url}/healthz").status_code == 200
    assert predict(plain, [{"I1": 1, "C1": "68fd1e64"}]).status_code == 200
    assert plain.proc.poll() is None


def test_openapi_documents_json_responses_with_their_schemas(plain: Server) -> None:
    """Every JSON 200 response is documented as its model (a generated client gets typed results),
    not as ``{"type": "string"}``."""
    doc = httpx.get(f"{plain.url}/openapi.json").json()
    expected = {("post", "/v1/predict"): "PredictResponse", ("get", "/v1/model"): "ModelInfo",
                ("get", "/healthz"): "Health", ("get", "/readyz"): "Health",
                ("post", "/v1/feedback"): "FeedbackResponse", ("post", "/v1/admin/reload"): "ReloadResponse",
                ("get", "/v1/monitoring/reproducibility"): "ReproducibilityReport"}
    for (method, path), model in expected.items():
        content = doc["paths"][path][method]["responses"]["200"]["content"]
        assert list(content) == ["application/json"], (path, content)
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}, path
    labels = doc["components"]["schemas"]["Outcome"]["properties"]["labels"]["items"]
    assert {"type": "integer", "minimum": 0, "maximum": 1} in labels["anyOf"]


@pytest.mark.parametrize("labels", [[True], [False], [1, True], [1.0], [2]])
def test_feedback_refuses_booleans_and_non_binary_labels(plain: Server, labels: list[Any]) -> None:
    served = predict(plain, [{"I1": 1}] * len(labels)).json()
    r = httpx.post(f"{plain.url}/v1/feedback", json={"outcomes": [{"request_id": served["request_id"],
                                                                   "labels": labels}]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["path"].startswith("outcomes[0].labels[")


def test_stalled_request_body_gets_408_and_the_connection_closed(plain: Server) -> None:
    """A client that sends headers and half its body, then stalls, is answered 408 once the
    body-read timeout passes and its connection is closed (not held forever)."""
    for path in ("/v1/predict", "/v1/feedback"):
        with socket.create_connection((plain.host, plain.port), timeout=BODY_TIMEOUT_S + 10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 100\r\n\r\n{{\"instances\": [".encode())
            start = time.monotonic()
            data = b""
            while chunk := sock.recv(65536):  # returns b"" when the server closes the connection
                data += chunk
            waited = time.monotonic() - start
        assert data.startswith(b"HTTP/1.1 408 "), data[:200]
        assert BODY_TIMEOUT_S * 0.9 <= waited < BODY_TIMEOUT_S + 5, waited
        assert b'"type":"timeout"' in data
    # A slow but steady client within the budget is served.
    with socket.create_connection((plain.host, plain.port), timeout=10) as sock:
        body = b'{"instances": [{"I1": 1}]}'
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(BODY_TIMEOUT_S / 3)
        sock.sendall(body[10:])
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert predict(plain, [{}]).status_code == 200


def test_fuzz_openapi_schema_no_server_errors_and_responses_match_it(plain: Server) -> None:
    """Schemathesis generates valid and invalid requests for every documented operation: never a 5xx,
    and every response conforms to the documented schema and content type of its status."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{plain.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/feedback", "/v1/admin/reload", "/v1/model",
                                              "/v1/monitoring/reproducibility"}
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    failures: list[str] = []
    checked = 0
    client = httpx.Client(base_url=plain.url, timeout=30)
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=30 if op.path == "/v1/predict" else 10, deadline=None, database=None,
                      derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                nonlocal checked
                kwargs = case.as_transport_kwargs(base_url=plain.url)
                r = client.request(kwargs["method"], kwargs["url"], params=kwargs.get("params"),
                                   headers=kwargs.get("headers"),
                                   content=kwargs.get("data") if kwargs.get("json") is None else None,
                                   json=kwargs.get("json"))
                checked += 1
                try:
                    case.validate_response(r, checks=checks)
                except Exception as exc:  # schemathesis raises a group of check failures
                    failures.append(f"{case.method} {case.path} -> {r.status_code}: {str(exc)[:300]}")

            try:
                run()
            except Unsatisfiable:
                # An operation without parameters or body (GET /healthz) has nothing to make invalid.
                assert mode == GenerationMode.NEGATIVE, op.path
    client.close()
    assert checked > 100
    assert not failures, failures[:5]
    assert predict(plain, [{}]).status_code == 200


# ------------------------------------------------------------------------------------------ start-up
def test_missing_or_corrupt_bundle_refuses_to_start(runs: dict[str, Path], tmp_path: Path) -> None:
    r = cli("serve", "--bundle", str(tmp_path / "nope"), "--port", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctr-ad serve: error:") and "not found" in lines[0]

    broken = tmp_path / "broken"
    shutil.copytree(runs["a"] / "bundle", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = cli("serve", "--bundle", str(runs["a"]), "--shadow", str(broken), "--port", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors" in lines[0], r.stderr


def test_multi_worker_server_answers(runs: dict[str, Path], tmp_path: Path) -> None:
    """--workers 2: uvicorn workers share the socket ctr-ad serve bound (TCP_NODELAY and all)."""
    server = start_server(["--bundle", str(runs["a"]), "--workers", "2"], tmp_path / "workers.log")
    try:
        assert "2 worker(s)" in server.log()
        with httpx.Client(timeout=30) as c:
            for _ in range(4):
                r = c.post(f"{server.url}/v1/predict", json={"instances": [{"I1": 2}]})
                assert r.status_code == 200 and r.elapsed.total_seconds() < 5
    finally:
        server.stop()
    assert server.proc.returncode is not None


# ------------------------------------------------------------------------------------------ units
def test_rolling_window_keeps_the_last_rows() -> None:
    w = RollingWindow(5)
    w.add(np.arange(3.0))
    w.add(np.arange(3.0, 7.0))
    rows, since = w.snapshot()
    assert sorted(rows[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0] and w.total == 7 and since is not None
    w.add(np.arange(100.0))
    assert sorted(w.snapshot()[0][:, 0].tolist()) == [95.0, 96.0, 97.0, 98.0, 99.0]


def test_bucket_histogram_is_cumulative_with_inclusive_bounds() -> None:
    h = BucketHistogram([0.1, 0.2])
    h.observe(np.array([0.05, 0.1, 0.15, 0.3]))
    fam = h.family("x", "doc")
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name == "x_bucket"}
    assert buckets == {"0.1": 2, "0.2": 3, "+Inf": 4}


def test_offline_metrics_contract(runs: dict[str, Path], tmp_path: Path) -> None:
    """A published bundle reads ``<published>/offline_metrics.json`` only when it names that bundle;
    otherwise ``--offline-pd-rel`` or the bundle metadata; side files elsewhere are not read."""
    loose = tmp_path / "loose"
    shutil.copytree(runs["a"] / "bundle", loose)
    (loose / "offline_metrics.json").write_text(json.dumps({"pd_rel": 0.05}))  # not the contract: ignored
    assert offline_metrics(loose, {}) is None
    assert offline_metrics(loose, {"offline_metrics": {"pd_rel": 0.03}}) == {
        "pd_rel": 0.03, "source": str(loose / "metadata.json")}
    assert offline_metrics(loose, {"pd_rel": 0.04}, given=0.02)["source"] == "--offline-pd-rel"
    published = publish(tmp_path / "published", {"best": loose, "older": runs["b"] / "bundle"}, "best", 0.08)
    found = offline_metrics(published / "bundles" / "best", {})
    assert found is not None and found["pd_rel"] == 0.08 and found["arm"] == "test"
    assert found["source"] == str((published / "offline_metrics.json").resolve())
    assert offline_metrics(published / "bundles" / "older", {}) is None
    # A broken metrics file is logged and skipped: monitoring lacks the figure, the service still starts.
    (published / "offline_metrics.json").write_text("{not json")
    assert offline_metrics(published / "bundles" / "best", {"pd_rel": 0.01})["pd_rel"] == 0.01


def test_published_layout_of_the_pipeline(runs: dict[str, Path], tmp_path: Path) -> None:
    """``<out>/published/{CURRENT, offline_metrics.json, bundles/<name>/}``: served and monitored as one."""
    published = publish(tmp_path / "published", {"best": runs["a"] / "bundle", "older": runs["b"] / "bundle"},
                        "best", 0.08)
    slot = load_slot(published, max_instances=10)
    assert slot.path == published / "bundles" / "best" and slot.source == published
    assert slot.offline is not None and slot.offline["pd_rel"] == 0.08
    # The metrics file describes the CURRENT bundle only.
    assert load_slot(published / "bundles" / "older", max_instances=10).offline is None


def test_feedback_store_adds_nothing_for_the_garbage_collector_to_walk() -> None:
    """100,000 remembered predictions must not be 100,000 objects every full collection walks
    (each such collection is a stall of the event loop)."""
    store = FeedbackStore(10_000)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(5000):
        store.put(f"r{i}", np.full(3, 0.1), "v1")
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    served = store.take("r7")
    assert served is not None and served.version == "v1" and served.ctr.tolist() == [0.1] * 3
    assert store.take("r7") is None and len(store) == 4999


GC_PROBE = """
import gc, json, sys, time
from starlette.testclient import TestClient
from service.app import create_app
from service.settings import ServiceSettings

def full_collection():
    t = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t

app = create_app(ServiceSettings(bundle=sys.argv[1], inference="inline"))
before = min(full_collection() for _ in range(3))
with TestClient(app) as client:
    assert client.get("/readyz").status_code == 200
    after = min(full_collection() for _ in range(3))
    print(json.dumps({"frozen": gc.get_freeze_count(), "gen0": gc.get_threshold()[0],
                      "before_s": before, "after_s": after}))
"""


def test_server_keeps_the_garbage_collector_off_its_startup_heap(runs: dict[str, Path]) -> None:
    """Once started, a server process has moved its start-up heap (torch, polars, pydantic, the
    bundles) out of the collector's reach: a full collection no longer walks it."""
    r = subprocess.run([sys.executable, "-c", GC_PROBE, str(runs["a"])], capture_output=True, text=True,
                       timeout=180, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe["frozen"] > 100_000 and probe["gen0"] >= 10_000, probe
    assert probe["after_s"] < probe["before_s"] / 3, probe


def test_settings_flags_then_environment_then_defaults_all_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTR_AD_MAX_INSTANCES", "7")
    assert ServiceSettings.build(bundle="b").max_instances == 7
    assert ServiceSettings.build(bundle="b", max_instances=9).max_instances == 9
    assert ServiceSettings.build(bundle="b").window == ServiceSettings.model_fields["window"].default
    with pytest.raises(UserError, match=r"^--window \(or CTR_AD_WINDOW\): .*greater than or equal to 1"):
        ServiceSettings.build(bundle="b", window=0)
    with pytest.raises(UserError, match=r"--bundle \(or CTR_AD_BUNDLE\) is required"):
        ServiceSettings.build()
    monkeypatch.setenv("CTR_AD_ALERT_FACTOR", "-1")
    with pytest.raises(UserError, match="CTR_AD_ALERT_FACTOR"):
        ServiceSettings.build(bundle="b")
    monkeypatch.delenv("CTR_AD_ALERT_FACTOR")
    # The command's flags are the settings' fields; a flag left out is not passed on.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--bundle", "b", "--window", "5", "--access-log"]))
    assert (settings.window, settings.max_instances, settings.access_log) == (5, 7, True)
    assert ServiceSettings.from_json(settings.to_json()) == settings
