"""Every arm against the baseline with the protocol's bootstrap interval (ctr_ad/comparison.py, ctr-ad compare)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ctr_ad.artifacts import write_document
from ctr_ad.cli import main as ctr_ad_main
from ctr_ad.comparison import compare_arms
from ctr_ad.errors import UserError
from ctr_ad.experiment import write_predictions
from ctr_ad.layout import ExperimentDir
from ctr_ad.protocol import pair_rel_diffs

ROWS = 400


def summary(role: str, logloss: float, replicas: int = 3) -> dict:
    figures = {"accuracy": {"logloss": {"mean": logloss}}, "pd": {"pd_rel": {"mean": 0.1, "std": 0.01}}}
    return {"role": role, "kind": "model", "replicas": replicas, **figures, "valid": figures}


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """Replicas whose logits move by noise × scale around one model: `half` moves half as far as `base`."""
    root = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(0)
    labels = (rng.random(ROWS) < 0.25).astype(np.float32)
    center, noise = rng.normal(-1.0, 1.0, ROWS), rng.normal(0.0, 1.0, (3, ROWS))
    scales = {"base": 0.2, "half": 0.1, "same": 0.2}
    probs: dict[str, list[np.ndarray]] = {}
    for stored in ("base", "half", "same", "base.confirm", "half.confirm"):
        scale = scales[stored.split(".")[0]]
        probs[stored] = []
        for r in range(3):
            path = ExperimentDir(root).replica(stored, r).predictions
            path.parent.mkdir(parents=True)
            frame = write_predictions(path, labels, (center + scale * noise[r]).reshape(1, -1), "mean_prob")
            probs[stored].append(frame["p"].to_numpy())
    arms = {"base": summary("plain", 0.40), "half": summary("recipe", 0.41), "same": summary("recipe", 0.40)}
    write_document(
        ExperimentDir(root).results,
        {
            "baseline": "base",
            "experiment": {"seed": 0},
            "arms": arms,
            "confirmation": {"base": arms["base"], "half": arms["half"]},
        },
    )
    return root, probs


def test_every_arm_gets_its_ratio_interval_and_call(exp_dir: tuple[Path, dict]) -> None:
    root, probs = exp_dir
    rows = {r["arm"]: r for r in compare_arms(root)}
    assert list(rows) == ["half", "base", "same"] or list(rows) == ["half", "same", "base"]  # sorted by ratio
    expected = pair_rel_diffs(probs["half"]).mean() / pair_rel_diffs(probs["base"]).mean()
    assert rows["half"]["pd_rel_ratio"] == pytest.approx(expected) and 0.45 < expected < 0.55
    low, high = rows["half"]["pd_rel_ratio_ci"]
    assert low < expected < high < 1.0 and rows["half"]["call"] == "better"
    assert rows["half"]["logloss_ratio"] == pytest.approx(0.41 / 0.40)
    # The same replicas as the baseline: ratio 1 and an interval around it — not distinguishable.
    assert rows["same"]["pd_rel_ratio"] == pytest.approx(1.0) and rows["same"]["call"] == "not distinguishable"
    assert rows["base"]["pd_rel_ratio"] == 1.0


def test_confirmation_round_reads_the_fresh_seed_replicas(exp_dir: tuple[Path, dict]) -> None:
    root, probs = exp_dir
    rows = {r["arm"]: r for r in compare_arms(root, "confirmation")}
    assert set(rows) == {"base", "half"}
    expected = pair_rel_diffs(probs["half.confirm"]).mean() / pair_rel_diffs(probs["base.confirm"]).mean()
    assert rows["half"]["pd_rel_ratio"] == pytest.approx(expected)
    with pytest.raises(UserError, match=r"baseline 'same' is not an arm of the confirmation round"):
        compare_arms(root, "confirmation", baseline="same")


def test_compare_command_prints_the_table_and_json(exp_dir: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    root, _ = exp_dir
    assert ctr_ad_main(["compare", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| arm | role |") and "÷ `base`" in table[0] and len(table) == 2 + 3
    assert table[2].startswith("| `half` | recipe |") and "| better |" in table[2]
    assert ctr_ad_main(["compare", str(root), "--baseline", "same", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["arm"]: r["pd_rel_ratio"] for r in rows}["same"] == pytest.approx(1.0)
    assert ctr_ad_main(["compare", str(root / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
