"""benchmarks/README.md quotes the serve and ingest benchmarks' tables exactly as their result files
give them."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"


def bench_and_result(module: str, results: str) -> tuple[ModuleType, dict[str, Any]]:
    """The benchmark script ``module`` (imported from benchmarks/) and its stored ``results`` file."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        bench = importlib.import_module(module)
    finally:
        sys.path.pop(0)
    return bench, json.loads((REPO / "benchmarks" / "results" / results).read_text())


def test_serve_readme_agrees_with_serve_json() -> None:
    bench_serve, result = bench_and_result("bench_serve", "serve.json")
    assert set(result["shadow_cost"]) == {f"{n}inst_c{c}" for n in (1, 100) for c in (1, 8, 32)}
    assert result["load_generator"].startswith("wrk")
    assert bench_serve.markdown_tables(result) in README.read_text()
    for name, value in result["figures"].items():
        assert result["meets_targets"][name] is (
            value >= bench_serve.TARGETS[name] if name.startswith("instances") else value <= bench_serve.TARGETS[name])


def test_serve_backends_readme_agrees_with_serve_backends_json() -> None:
    bench_serve, result = bench_and_result("bench_serve", "serve-backends.json")
    assert set(result["scenarios"]) == {"torch", "onnxruntime"}
    assert set(result["scenarios"]["torch"]) == {f"{n}inst_c{c}" for n in (1, 100) for c in (1, 8, 32)}
    assert bench_serve.backend_tables(result) in README.read_text()


def test_ingest_readme_agrees_with_ingest_json() -> None:
    bench_ingest, result = bench_and_result("bench_ingest", "ingest.json")
    assert bench_ingest.markdown_tables(result) in README.read_text()
    targets = {t["name"]: t for t in result["targets"]}
    # The three figures the ingest issue asks for are there, each with its verdict.
    assert {"floor_ratio", "throughput"} <= set(targets)
    assert any(name.startswith("memory_ratio_") for name in targets)
    for t in targets.values():
        value, target = t.get("value", t.get("value_mib")), t.get("target", t.get("target_mib"))
        assert t["met"] is (value >= target if t["name"] == "throughput" else value <= target), t["name"]
