"""Every arm of a finished experiment against its baseline, on test rows, with the protocol's interval.

The verdict (``ctr_ad/protocol.py``) states the ratios of the arms the protocol *chose*; this table
states them for every arm, so a reader can see whether the arms it did not choose differ from the
baseline beyond noise. Nothing here chooses: the columns are descriptive, the choice stays the
verdict's (made on validation rows). The interval is the verdict's own bootstrap over test rows and
replica pairs (:func:`ctr_ad.protocol.bootstrap_ratio_ci`, the experiment's seed), so for a chosen arm
the confirmation round's row repeats the verdict's figures exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from ctr_ad.errors import UserError
from ctr_ad.experiment import CONFIRM_SUFFIX, load_results
from ctr_ad.layout import ExperimentDir
from ctr_ad.protocol import bootstrap_ratio_ci, call_of, logloss_of, pair_rel_diffs, pd_rel_of

Round = Literal["main", "confirmation"]


def _test_probs(exp: ExperimentDir, arm: str, replicas: int) -> list[np.ndarray]:
    return [pl.read_parquet(exp.replica(arm, r).predictions, columns=["p"])["p"].to_numpy() for r in range(replicas)]


def compare_arms(
    exp_dir: str | Path, round: Round = "main", baseline: str | None = None, results: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per arm of ``round`` (the main round, or the confirmation's fresh seeds): its validation
    figures, test pd_rel, the ratio of its test pd_rel to ``baseline``'s (default: the experiment's)
    with the 95 % interval and call, and the test logloss ratio; sorted by the ratio."""
    exp = ExperimentDir(Path(exp_dir))
    results = results or load_results(exp_dir)
    arms: dict[str, dict[str, Any]] = results["arms"] if round == "main" else results.get("confirmation") or {}
    if not arms:
        raise UserError(f"{exp.results}: no {round} round to compare")
    base = baseline or results.get("baseline")
    if base not in arms:
        raise UserError(f"{exp.results}: baseline {base!r} is not an arm of the {round} round; known: {sorted(arms)}")
    stored = {name: name + CONFIRM_SUFFIX if round == "confirmation" else name for name in arms}
    seed = int(results.get("experiment", {}).get("seed", 0))
    base_rows = pair_rel_diffs(_test_probs(exp, stored[base], arms[base]["replicas"]))
    rows = []
    for name, arm in arms.items():
        ratio, ci = bootstrap_ratio_ci(pair_rel_diffs(_test_probs(exp, stored[name], arm["replicas"])), base_rows, seed)
        rows.append(
            {
                "arm": name,
                "role": arm["role"],
                "replicas": arm["replicas"],
                "valid_pd_rel": pd_rel_of(arm, "valid"),
                "valid_logloss": logloss_of(arm, "valid"),
                "test_pd_rel": pd_rel_of(arm),
                "test_pd_rel_std": arm["pd"]["pd_rel"]["std"],
                "test_logloss": logloss_of(arm),
                "pd_rel_ratio": ratio,
                "pd_rel_ratio_ci": ci,
                "call": call_of(ci),
                "logloss_ratio": logloss_of(arm) / logloss_of(arms[base]),
            }
        )
    return sorted(rows, key=lambda r: r["pd_rel_ratio"])


def markdown_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """The rows as a Markdown table (the form docs/experiments.md quotes)."""
    lines = [
        f"| arm | role | valid pd_rel | valid logloss | test pd_rel ± std | pd_rel ÷ `{baseline}` [95 % CI] | call "
        "| test logloss (÷ baseline) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["pd_rel_ratio_ci"]
        lines.append(
            f"| `{r['arm']}` | {r['role']} | {r['valid_pd_rel']:.4f} | {r['valid_logloss']:.5f} "
            f"| {r['test_pd_rel']:.4f} ± {_std(r['test_pd_rel_std'])} "
            f"| {r['pd_rel_ratio']:.2f} [{low:.2f}, {high:.2f}] | {r['call']} "
            f"| {r['test_logloss']:.5f} ({r['logloss_ratio']:.4f}) |"
        )
    return "\n".join(lines)


def _std(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"  # None / NaN: fewer than 2 pairs
