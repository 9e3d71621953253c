"""Parameter counts and equal-budget sizing (ctr_ad/capacity.py), checked against the real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers_train import REPO, ingested_8k

from ctr_ad.capacity import equal_budget, parameter_count, tower_parameters
from ctr_ad.cli import main as ctr_ad_main
from ctr_ad.config import ModelConfig
from ctr_ad.errors import UserError
from ctr_ad.experiment import ArmSpec, arm_training_config, load_experiment_config
from ctr_ad.features import FeatureProcessor
from ctr_ad.model import EnsembleCTR

ARMS_CONFIG = REPO / "pipelines" / "configs" / "experiment-arms-smelu-k8.yaml"
CARDS = [3, 50, 1000, 7, 20_000, 2]
FIELDS = [f"f{i}" for i in range(len(CARDS))]


def real_count(cfg: ModelConfig, cards: list[int], n_dense: int, fields: list[str] | None = None) -> int:
    model = EnsembleCTR.from_config(cfg, cards, n_dense, fields=fields)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def criteo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureProcessor]:
    data = ingested_8k(tmp_path_factory)
    return data, FeatureProcessor.load(data / "features.json")


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"components": 1, "mlp": []},
        {"components": 8, "embedding_dim": 4, "mlp": [54, 27]},
        {"components": 3, "embedding_dim": 5, "mlp": [7, 5, 3], "anchor": "logreg"},  # anchor: buffers only
        {"hash_buckets": 100},
        {"hash_buckets": {"f4": 10}, "share_embeddings": True},
    ],
)
def test_parameter_count_is_the_models(settings: dict) -> None:
    cfg = ModelConfig(**{"anchor": "none", **settings})
    assert parameter_count(cfg, CARDS, 5, FIELDS) == real_count(cfg, CARDS, 5, FIELDS)


@pytest.mark.parametrize("components", [2, 8, 16])
def test_equal_budget_keeps_the_parameter_count(components: int) -> None:
    base = ModelConfig(anchor="none")  # K = 4, d = 8, MLP 64-32
    narrow = equal_budget(base, components, len(CARDS), 5)
    assert narrow.components == components and narrow.embedding_dim == 32 // components
    assert narrow.mlp[1] == round(narrow.mlp[0] / 2)  # the widths keep their ratio
    before, after = real_count(base, CARDS, 5), real_count(narrow, CARDS, 5)
    assert abs(after / before - 1) < 0.01, (narrow, before, after)
    # K · d is kept, so the tables are exactly as large on any data; the towers come within a few %
    # (one unit of width moves K' towers at once: 16 × ~60 parameters here).
    towers = components * tower_parameters(len(CARDS), 5, narrow.embedding_dim, narrow.mlp)
    assert abs(towers / (4 * tower_parameters(len(CARDS), 5, 8, [64, 32])) - 1) < 0.03
    assert base.components == 4 and base.mlp == [64, 32]  # the input config is left alone


def test_equal_budget_edge_cases() -> None:
    linear = equal_budget(ModelConfig(components=4, embedding_dim=8, mlp=[]), 8, 3, 2)
    assert (linear.components, linear.embedding_dim, linear.mlp) == (8, 4, [])
    assert equal_budget(ModelConfig(components=4, embedding_dim=2), 16, 3, 2).embedding_dim == 1  # floor of 1
    with pytest.raises(UserError, match="components must be >= 1"):
        equal_budget(ModelConfig(), 0, 3, 2)


def test_shipped_k8_narrow_arm_has_the_baselines_parameter_count(criteo: tuple[Path, FeatureProcessor]) -> None:
    _, features = criteo
    cards, n_dense = features.cardinalities, len(features.dense_columns)
    cfg = load_experiment_config(ARMS_CONFIG)
    arms = {a.name: a for a in cfg.all_arms()}
    models = {n: arm_training_config(cfg, arms[n], 0).model for n in ("plain-indep", "k8-narrow", "k8")}
    counts = {n: real_count(m, cards, n_dense) for n, m in models.items()}
    assert abs(counts["k8-narrow"] / counts["plain-indep"] - 1) < 0.05
    assert counts["k8"] / counts["plain-indep"] == pytest.approx(2.0, rel=0.01)  # same width: twice the size
    # The YAML's widths are what the helper computes for this data, not numbers that went stale.
    sized = equal_budget(models["plain-indep"], 8, len(cards), n_dense)
    assert (sized.embedding_dim, sized.mlp) == (models["k8-narrow"].embedding_dim, models["k8-narrow"].mlp)
    assert arms["k8-narrow"].role == "recipe" and models["plain-indep"].components == 4


def test_capacity_command_prints_an_arm_that_loads(
    criteo: tuple[Path, FeatureProcessor], capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = criteo
    argv = [
        "capacity",
        "--data",
        str(data),
        "--config",
        str(REPO / "pipelines" / "configs" / "demo.yaml"),
        "--set",
        "model.anchor=none",
        "--components",
        "8",
    ]
    assert ctr_ad_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base"]["components"] == 4 and out["equal_budget"]["components"] == 8
    assert abs(out["equal_budget"]["ratio"] - 1) < 0.05
    arm = ArmSpec.model_validate(yaml.safe_load(out["arm"]))
    assert arm.name == "k8-narrow" and arm.role == "recipe"
    assert arm.set == {
        "model.components": 8,
        "model.embedding_dim": out["equal_budget"]["embedding_dim"],
        "model.mlp": out["equal_budget"]["mlp"],
    }
    assert ctr_ad_main(["capacity", "--data", str(data / "missing"), "--components", "8"]) == 2
    assert "data directory not found" in capsys.readouterr().err
