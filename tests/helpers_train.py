"""Shared helpers of the training tests: the 8k Criteo sample ingested once per session, small configs.

Import as ``from helpers_train import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from ctr_ad.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CRITEO_8K = REPO / "data" / "criteo-kaggle-8k"
DEMO_CONFIG = REPO / "pipelines" / "configs" / "demo.yaml"
PYTHON = sys.executable

_cache: dict[str, Path] = {}


def ingested_8k(factory: pytest.TempPathFactory) -> Path:
    """The real 8k sample ingested with split=files (train/dev/test), once per test session."""
    if "8k" not in _cache:
        from ctr_ad.ingest.run import run_ingest

        out = factory.mktemp("criteo8k")
        run_ingest(
            [CRITEO_8K / "train.tsv", CRITEO_8K / "dev.tsv", CRITEO_8K / "test.tsv"],
            "criteo",
            out,
            split="files",
            quiet=True,
        )
        _cache["8k"] = out
    return _cache["8k"]


def small_config(**overrides: Any) -> Config:
    """A tiny, fast config: K=2, 2 epochs of small batches; ``overrides`` as ``section__key=value``."""
    sets = [
        "model.components=2",
        "model.embedding_dim=4",
        "model.mlp=[16]",
        "model.dropout=0.1",
        "train.batch_size=512",
        "train.epochs=2",
        "train.early_stopping_patience=null",
        "train.progress=false",
    ]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(DEMO_CONFIG, sets)


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m ctr_ad.cli`` children: the repo importable, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def reseal_manifest(data_dir: Path) -> None:
    """After a test edits a split on purpose, record the new file hashes in manifest.json, as an ingest
    that produced those files would have (training verifies every file against the manifest)."""
    import hashlib
    import json

    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in manifest["outputs"]:
        manifest["outputs"][name] = hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))
