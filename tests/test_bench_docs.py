"""benchmarks/README.md quotes the serve benchmark's tables exactly as ``results/serve.json`` gives them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_readme_agrees_with_serve_json() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_serve
    finally:
        sys.path.pop(0)
    result = json.loads((REPO / "benchmarks" / "results" / "serve.json").read_text())
    assert set(result["shadow_cost"]) == {f"{n}inst_c{c}" for n in (1, 100) for c in (1, 8, 32)}
    assert result["load_generator"].startswith("wrk")
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert bench_serve.markdown_tables(result) in readme
    for name, value in result["figures"].items():
        assert result["meets_targets"][name] is (
            value >= bench_serve.TARGETS[name] if name.startswith("instances") else value <= bench_serve.TARGETS[name])


def test_serve_backends_readme_agrees_with_serve_backends_json() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_serve
    finally:
        sys.path.pop(0)
    result = json.loads((REPO / "benchmarks" / "results" / "serve-backends.json").read_text())
    assert set(result["scenarios"]) == {"torch", "onnxruntime"}
    assert set(result["scenarios"]["torch"]) == {f"{n}inst_c{c}" for n in (1, 100) for c in (1, 8, 32)}
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert bench_serve.backend_tables(result) in readme


def test_ingest_readme_agrees_with_ingest_json() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_ingest
    finally:
        sys.path.pop(0)
    result = json.loads((REPO / "benchmarks" / "results" / "ingest.json").read_text())
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert bench_ingest.markdown_tables(result) in readme
    targets = {t["name"]: t for t in result["targets"]}
    # The three figures the ingest issue asks for are there, each with its verdict.
    assert {"floor_ratio", "throughput"} <= set(targets)
    assert any(name.startswith("memory_ratio_") for name in targets)
    for t in targets.values():
        value, target = t.get("value", t.get("value_mib")), t.get("target", t.get("target_mib"))
        assert t["met"] is (value >= target if t["name"] == "throughput" else value <= target), t["name"]
