"""``ctr-ad pipeline run``: ingest → experiment → report → publish, with unchanged steps skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ctr_ad import bundle as bundle_mod
from ctr_ad.cli import main
from ctr_ad.errors import UserError
from ctr_ad.pipeline import current_bundle, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = {
    "training": {
        # The plain ensemble, stated in full: the built-in defaults carry the reproducibility recipe.
        "model": {"components": 2, "embedding_dim": 4, "mlp": [8], "anchor": "none"},
        "anti_distillation": {"data_order": "shared"},
        "train": {"batch_size": 512, "epochs": 1, "early_stopping_patience": None, "threads": 1, "device": "cpu",
                  "weight_averaging_epochs": 0.0, "best_step_selection": "ensemble"},
    },
    "replicas": 2,
    "arms": [
        {"name": "plain-shared"},
        {"name": "logreg", "kind": "logreg", "max_iter": 50},
    ],
    "grids": [{"name": "ad", "penalties": ["output_decorrelation"], "lambdas": [0.3], "data_orders": ["independent"]}],
}


def write_pipeline(root: Path) -> Path:
    (root / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    criteo = [str(ROOT / "data" / "criteo-kaggle-8k" / f"{s}.tsv") for s in ("train", "dev", "test")]
    pipeline = {
        "out": str(root / "out"),
        "experiment": "exp.yaml",
        "publish": "criteo",
        "datasets": [
            {"name": "criteo", "source": "criteo", "split": "files", "inputs": criteo},
            {"name": "synth", "source": "synthetic", "synthetic": {"rows": 3000, "seed": 1}},
        ],
    }
    path = root / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def test_pipeline_runs_skips_unchanged_steps_and_publishes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_pipeline(tmp_path)
    caplog.set_level("INFO", logger="ctr_ad")
    first = run_pipeline(path)
    messages = caplog.messages
    out = tmp_path / "out"
    assert all(s["status"] == "ran" for s in first["steps"])
    assert {s["step"] for s in first["steps"]} == {
        "criteo/ingest",
        "criteo/experiment",
        "criteo/report",
        "synth/synthesise",
        "synth/ingest",
        "synth/experiment",
        "synth/report",
        "publish",
    }
    for name in ("criteo", "synth"):
        assert (out / "experiments" / name / "report.html").is_file()
    published = out / "published"
    metrics = json.loads((published / "offline_metrics.json").read_text())
    bundle_dir = current_bundle(published)
    assert bundle_dir == published / (published / "CURRENT").read_text().strip()
    assert metrics["arm"] in ("plain-shared", "ad-output_decorrelation-l0.3-indep")
    assert metrics["pd_rel"] >= 0 and metrics["dataset"] == "criteo" and metrics["data_fingerprint"]
    loaded = bundle_mod.load(bundle_dir)
    assert loaded.components == 2
    assert bundle_mod.load(published / metrics["shadow_bundle"]).components == 2
    assert any("serve it with: ctr-ad serve --bundle" in m for m in messages)
    state = json.loads((out / "pipeline-state.json").read_text())
    # the step's recorded duration is the one it logged and covers the experiment run it wraps
    experiment_wall_s = json.loads((out / "experiments" / "criteo" / "results.json").read_text())["run"]["wall_s"]
    logged = {s["step"]: s["duration_s"] for s in first["steps"]}
    assert state["criteo/experiment"]["duration_s"] == logged["criteo/experiment"] >= experiment_wall_s - 0.01

    again = run_pipeline(path)
    assert all(s["status"] == "skipped" for s in again["steps"])

    # a changed experiment config reruns experiment, report and publish, not ingest
    EXPERIMENT_CHANGED = {**EXPERIMENT, "arms": EXPERIMENT["arms"][:1]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT_CHANGED))
    third = {s["step"]: s["status"] for s in run_pipeline(path)["steps"]}
    assert third["criteo/ingest"] == "skipped" and third["synth/synthesise"] == "skipped"
    assert third["criteo/experiment"] == "ran" and third["criteo/report"] == "ran"


def test_pipeline_validation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nexperiment: e.yaml\ndatasets: [{name: a, source: criteo, inputs: [f], extra: 1}]\n")
    with pytest.raises(UserError, match="unknown key"):
        load_pipeline(bad)
    bad.write_text("out: x\nexperiment: e.yaml\ndatasets: [{name: a, source: criteo}]\n")
    with pytest.raises(UserError, match="either 'inputs' or 'synthetic'"):
        load_pipeline(bad)
    assert main(["pipeline", "run", str(tmp_path / "missing.yaml")]) == 2


def test_demo_pipeline_is_valid() -> None:
    from ctr_ad.experiment import load_experiment_config

    cfg, base = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    assert {d.name for d in cfg.datasets} >= {"criteo-8k"}
    for ds in cfg.datasets:
        exp = load_experiment_config(base / (ds.experiment or cfg.experiment))
        assert exp.replicas == 3
        # every demo experiment weighs the recipe and an anti-distillation arm against plain-indep
        names = {a.name for a in exp.all_arms()}
        assert {"plain-indep", "recipe-anchor-avg1", "ad-ncl_logit", "logreg"} <= names
        assert exp.confirm
