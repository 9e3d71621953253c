"""Experiment arms beyond penalty grids: value sweeps (SmeLU β) and stated roles (K' narrow components)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctr_ad.errors import UserError
from ctr_ad.experiment import (
    CONFIRM_SEED_OFFSET,
    _confirmation_arms,
    arm_training_config,
    load_experiment_config,
    role_of,
)
from ctr_ad.protocol import select_baseline
from ctr_ad.strict import load_yaml_mapping

REPO = Path(__file__).resolve().parents[1]

TRAINING = {
    "model": {"components": 2, "embedding_dim": 4, "mlp": [8], "anchor": "none"},
    "train": {"weight_averaging_epochs": 0.0, "best_step_selection": "ensemble"},
}


def config(**extra: object) -> dict:
    return {"training": TRAINING, "arms": [{"name": "plain"}], **extra}


def test_sweep_expands_every_value_with_its_label_and_shared_settings() -> None:
    cfg = load_experiment_config(
        config(
            sweeps=[
                {
                    "name": "smelu",
                    "values": {"model.smelu_beta": [0.1, 1, 10.0]},
                    "labels": {"model.smelu_beta": "beta"},
                    "set": {"model.activation": "smelu"},
                },
                {"name": "grid", "values": {"model.components": [2, 3], "model.dropout": [0.0, 0.25]}},
            ]
        )
    )
    names = [a.name for a in cfg.all_arms()]
    assert names == [
        "plain",
        "smelu-beta0.1",
        "smelu-beta1",
        "smelu-beta10",
        "grid-components2-dropout0",
        "grid-components2-dropout0.25",
        "grid-components3-dropout0",
        "grid-components3-dropout0.25",
    ]
    arms = {a.name: a for a in cfg.all_arms()}
    betas = {n: arm_training_config(cfg, arms[n], 0).model for n in names if n.startswith("smelu")}
    assert [(m.activation, m.smelu_beta) for m in betas.values()] == [("smelu", 0.1), ("smelu", 1.0), ("smelu", 10.0)]
    last = arm_training_config(cfg, arms["grid-components3-dropout0.25"], 0).model
    assert (last.components, last.dropout, last.activation) == (3, 0.25, "relu")


def test_sweep_errors_name_the_problem() -> None:
    with pytest.raises(UserError, match=r"values of .*model.smelu_beta.* must not be empty"):
        load_experiment_config(config(sweeps=[{"name": "s", "values": {"model.smelu_beta": []}}]))
    with pytest.raises(UserError, match=r"labels \['model.dropout'\] name no key of values"):
        load_experiment_config(
            config(sweeps=[{"name": "s", "values": {"model.smelu_beta": [1]}, "labels": {"model.dropout": "p"}}])
        )
    with pytest.raises(UserError, match="arm name 's-act smelu' is not a valid name"):
        load_experiment_config(
            config(
                sweeps=[
                    {"name": "s", "values": {"model.activation": ["smelu"]}, "labels": {"model.activation": "act "}}
                ]
            )
        )
    with pytest.raises(UserError, match="duplicate arm names"):
        load_experiment_config(config(sweeps=[{"name": "s", "values": {"model.smelu_beta": [1, 1.0]}}]))
    with pytest.raises(UserError, match=r"arm s-smelu_beta-1.*smelu_beta"):  # a bad value fails before training
        load_experiment_config(config(sweeps=[{"name": "s", "values": {"model.smelu_beta": [-1]}}]))


def test_roles_smelu_is_a_lever_and_a_stated_role_wins() -> None:
    cfg = load_experiment_config(
        config(
            arms=[
                {"name": "plain"},
                {"name": "k4-narrow", "role": "recipe", "set": {"model.components": 4}},
                {"name": "lr", "kind": "logreg"},
            ],
            sweeps=[{"name": "smelu", "values": {"model.smelu_beta": [1.0]}, "set": {"model.activation": "smelu"}}],
        )
    )
    roles = {
        a.name: role_of(a, arm_training_config(cfg, a, 0).to_dict() if a.kind == "model" else {})
        for a in cfg.all_arms()
    }
    assert roles == {"plain": "plain", "k4-narrow": "recipe", "lr": "linear", "smelu-smelu_beta1": "recipe"}
    with pytest.raises(UserError, match="role"):
        load_experiment_config(config(arms=[{"name": "a", "role": "baseline"}]))

    # Why it matters: a candidate never becomes the baseline it is measured against, however reproducible.
    def arm(role: str, logloss: float, pd_rel: float) -> dict:
        figures = {"accuracy": {"logloss": {"mean": logloss}}, "pd": {"pd_rel": {"mean": pd_rel}}}
        return {"role": role, "kind": "model", **figures, "valid": figures}

    figures = {"plain": (0.450, 0.08), "smelu-smelu_beta1": (0.450, 0.02), "k4-narrow": (0.450, 0.01)}
    summaries = {name: arm(roles[name], *values) for name, values in figures.items()}
    assert select_baseline(summaries, 0.003) == "plain"


def test_confirmation_round_retrains_a_stated_recipe_with_fresh_seeds() -> None:
    cfg = load_experiment_config(
        config(arms=[{"name": "plain"}, {"name": "k8-narrow", "role": "recipe", "set": {"model.components": 8}}])
    )

    def arm(role: str, pd_rel: float) -> dict:
        figures = {"accuracy": {"logloss": {"mean": 0.45}}, "pd": {"pd_rel": {"mean": pd_rel}}}
        return {"role": role, "kind": "model", **figures, "valid": figures}

    again = _confirmation_arms(cfg, {"plain": arm("plain", 0.08), "k8-narrow": arm("recipe", 0.05)})
    assert [(a.name, a.role, a.seed_offset) for a in again] == [
        ("plain.confirm", None, CONFIRM_SEED_OFFSET),
        ("k8-narrow.confirm", "recipe", CONFIRM_SEED_OFFSET),
    ]
    assert arm_training_config(cfg, again[1], 0).train.seed_init == CONFIRM_SEED_OFFSET


def test_the_new_arms_join_the_verdict_grid_without_touching_its_baseline() -> None:
    """docs/experiments.md: copy experiment-arms-smelu-k8.yaml's k8-narrow arm and its sweeps into
    experiment-verdict.yaml; every new arm is a candidate, the plain arms stay the baseline's candidates."""
    configs = REPO / "pipelines" / "configs"
    verdict = load_yaml_mapping(configs / "experiment-verdict.yaml")
    extra = load_yaml_mapping(configs / "experiment-arms-smelu-k8.yaml")
    verdict["arms"] += [a for a in extra["arms"] if a["name"] == "k8-narrow"]
    verdict["sweeps"] = extra["sweeps"]
    cfg = load_experiment_config(verdict, base_dir=configs)
    roles = {
        a.name: role_of(a, arm_training_config(cfg, a, 0).to_dict() if a.kind == "model" else {})
        for a in cfg.all_arms()
    }
    assert [n for n, r in roles.items() if r == "plain"] == ["plain-indep", "plain-indep-noembl2"]
    assert {roles[n] for n in ("k8-narrow", "smelu-beta0.1", "smelu-beta1", "smelu-beta10")} == {"recipe"}
    narrow = arm_training_config(cfg, next(a for a in cfg.all_arms() if a.name == "k8-narrow"), 0)
    assert (narrow.model.components, narrow.train.batch_size, narrow.model.anchor) == (8, 1024, "none")


def test_the_confirmation_seeds_can_be_moved_past_seeds_already_looked_at() -> None:
    """A probe that chose the arms on seeds 1000-1001 must not be 'confirmed' on those same seeds."""
    arms = [{"name": "plain"}, {"name": "k8-narrow", "role": "recipe", "set": {"model.components": 8}}]
    cfg = load_experiment_config(config(arms=arms, confirm_seed_offset=2000))
    figures = {"accuracy": {"logloss": {"mean": 0.45}}, "pd": {"pd_rel": {"mean": 0.05}}}
    summaries = {"plain": {"role": "plain", "kind": "model", **figures, "valid": figures},
                 "k8-narrow": {"role": "recipe", "kind": "model", **figures, "valid": figures}}
    again = _confirmation_arms(cfg, summaries)
    assert {a.seed_offset for a in again} == {2000}
    assert arm_training_config(cfg, again[0], 2).train.seed_init == 2002
    with pytest.raises(UserError, match="confirm_seed_offset 2 reuses the main round's seeds"):
        load_experiment_config(config(arms=arms, confirm_seed_offset=2))
