"""The success paths of ``ctr-ad experiment``, ``ctr-ad report`` and ``ctr-ad pipeline run`` as commands.

Each runs ``python -m ctr_ad.cli`` in a child process on the real 8k Criteo sample with a tiny
configuration, and checks the exit code, the files written and the lines printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctr_ad.ingest.run import run_ingest

ROOT = Path(__file__).resolve().parents[1]
CRITEO = [ROOT / "data" / "criteo-kaggle-8k" / f"{s}.tsv" for s in ("train", "dev", "test")]
EXPERIMENT = {
    "training": {
        # The plain ensemble, stated in full: the built-in defaults carry the reproducibility recipe.
        "model": {"components": 2, "embedding_dim": 4, "mlp": [8], "anchor": "none"},
        "anti_distillation": {"data_order": "shared"},
        "train": {"batch_size": 512, "epochs": 1, "early_stopping_patience": None, "threads": 1, "device": "cpu",
                  "weight_averaging_epochs": 0.0, "best_step_selection": "ensemble"},
    },
    "replicas": 2,
    "confirm": False,  # the confirmation round is tested in test_experiment.py
    "arms": [{"name": "plain-shared"}, {"name": "logreg", "kind": "logreg", "max_iter": 50}],
}


def ctr_ad(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "ctr_ad.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """``ctr-ad experiment`` run once on the ingested sample: (the finished process, its EXP_DIR)."""
    root = tmp_path_factory.mktemp("commands")
    run_ingest(CRITEO, "criteo", root / "data", split="files", quiet=True)
    (root / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    proc = ctr_ad("experiment", "--data", "data", "--config", "exp.yaml", "--out", "exp", cwd=root)
    return proc, root / "exp"


def test_experiment_command(experiment: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, exp_dir = experiment
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((exp_dir / "results.json").read_text())
    assert set(results["arms"]) == {"plain-shared", "logreg"} and results["best"] == "plain-shared"
    assert proc.stdout.splitlines() == ["exp/results.json: 2 arms, best arm plain-shared"]
    assert "[experiment] done: 4 trained, 0 skipped" in proc.stderr
    for arm in results["arms"]:
        for r in range(2):
            assert (exp_dir / "arms" / arm / f"r{r}" / "predictions.parquet").is_file()
    assert (exp_dir / "arms" / "plain-shared" / "r0" / "run" / "bundle" / "model.safetensors").is_file()


def test_report_command(experiment: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, exp_dir = experiment
    assert (exp_dir / "results.json").is_file(), "the experiment command failed (see test_experiment_command)"
    proc = ctr_ad("report", "exp", cwd=exp_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["report: exp/report.html (and exp/report.md)"]
    html = (exp_dir / "report.html").read_text()
    assert "Best arm: <b>plain-shared</b>" in html and "logreg" in html
    assert "| arm | role |" in (exp_dir / "report.md").read_text()


def test_pipeline_run_command(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({**EXPERIMENT, "arms": EXPERIMENT["arms"][:1]}))
    pipeline = {
        "out": "out",
        "experiment": "exp.yaml",
        "datasets": [{"name": "criteo", "source": "criteo", "split": "files", "inputs": [str(p) for p in CRITEO]}],
    }
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipeline))
    proc = ctr_ad("pipeline", "run", "pipe.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *summary, serve = proc.stdout.splitlines()
    printed = json.loads("\n".join(summary))
    out = tmp_path / "out"
    published = out / "published"
    bundle = published / (published / "CURRENT").read_text().strip()
    assert tmp_path / printed["bundle"] == bundle and (bundle / "model.safetensors").is_file()
    assert serve == f"serve: ctr-ad serve --bundle {printed['bundle']}"
    assert list(printed["reports"]) == ["criteo"]
    assert tmp_path / printed["reports"]["criteo"] == out / "experiments" / "criteo" / "report.html"
    assert (out / "experiments" / "criteo" / "report.html").is_file()
    metrics = json.loads((published / "offline_metrics.json").read_text())
    assert metrics["arm"] == "plain-shared" and printed["offline_pd_rel"] == metrics["pd_rel"] >= 0
    state = json.loads((out / "pipeline-state.json").read_text())
    assert set(state) == {"criteo/ingest", "criteo/experiment", "criteo/report", "publish"}
