"""The honest protocol: choose on validation, state on test, confirm on fresh replicas.

An arm summary (``ctr_ad.experiment.summarise_arm``) carries test figures at its top level and the same
figures on the validation rows under ``"valid"``. Every choice here — the baseline, the recipe arm, the
best anti-distillation arm — reads the validation figures only; the test rows never pick a winner.
The ratios of the chosen arms to the baseline are then taken on test rows (of a confirmation round
when there is one), with a bootstrap interval that resamples test rows and replica pairs together.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from ctr_ad.artifacts import Verdict

AD_ROLE = "anti_distillation"
BOOTSTRAP_SAMPLES = 1000


def logloss_of(arm: dict[str, Any], split: str = "test") -> float:
    node = arm["valid"] if split == "valid" else arm
    value = node["accuracy"]["logloss"]["mean"]
    return math.inf if value is None else value


def pd_rel_of(arm: dict[str, Any], split: str = "test") -> float:
    node = arm["valid"] if split == "valid" else arm
    value = node["pd"]["pd_rel"]["mean"]
    return math.inf if value is None else value


def select_baseline(arms: dict[str, dict[str, Any]], tolerance: float, split: str = "valid") -> str | None:
    """The best ensemble without anti-distillation: among plain arms (K > 1, no penalty) whose logloss is
    within (1 + tolerance) of the most accurate plain arm, the one with the lowest pd_rel — so a plain
    arm cannot become the baseline by being reproducibly worse."""
    plain = [n for n, a in arms.items() if a["role"] == "plain"]
    if not plain:
        return None
    limit = min(logloss_of(arms[n], split) for n in plain) * (1 + tolerance)
    ok = [n for n in plain if logloss_of(arms[n], split) <= limit + 1e-12]
    return min(ok, key=lambda n: pd_rel_of(arms[n], split))


def select_best(arms: dict[str, dict[str, Any]], tolerance: float, split: str = "valid",
                roles: tuple[str, ...] | None = None) -> tuple[str | None, str]:
    """The lowest pd_rel among deep-model arms (of ``roles``, default any) whose logloss is at most
    (1 + tolerance) × the baseline's. Returns (name, the rule in words)."""
    baseline = select_baseline(arms, tolerance, split)
    candidates = [n for n, a in arms.items() if a["kind"] == "model" and (roles is None or a["role"] in roles)]
    rows = "validation" if split == "valid" else "test"
    rule = (
        f"chosen on {rows} rows: lowest mean pd_rel among deep-model arms whose mean logloss ≤ (1 + {tolerance:g}) "
        f"× that of the baseline '{baseline}' (among plain ensembles — no anti-distillation, any data order — "
        "within the same tolerance of the most accurate one, the one with the lowest pd_rel); "
        "the logistic regression is the reproducible reference, not a candidate"
    )
    if baseline is None:
        rule = f"chosen on {rows} rows: lowest mean pd_rel among deep-model arms (no plain ensemble to bound logloss)"
        limit = math.inf
    else:
        limit = logloss_of(arms[baseline], split) * (1 + tolerance)
    ok = [n for n in candidates if logloss_of(arms[n], split) <= limit + 1e-12]
    if not ok:
        return None, rule
    return min(ok, key=lambda n: pd_rel_of(arms[n], split)), rule


def pair_rel_diffs(probs: list[np.ndarray]) -> np.ndarray:
    """[pairs, N] of 2|p_i − p_j| / (p_i + p_j) for every replica pair (the rows of pd_rel)."""
    rows = []
    for a, b in itertools.combinations(probs, 2):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rows.append(2.0 * np.abs(a64 - b64) / np.maximum(a64 + b64, 1e-12))
    return np.stack(rows)


def bootstrap_ratio_ci(arm: np.ndarray, base: np.ndarray, seed: int = 0,
                       samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, list[float]]:
    """pd_rel(arm) / pd_rel(base) and its 95 % interval; ``arm``/``base`` are [pairs, N] rel diffs on the
    same N test rows. Each sample draws the rows (shared by both arms) and each arm's pairs with
    replacement, so the interval covers both row sampling and the replica-to-replica spread."""
    rng = np.random.default_rng(seed)
    n = arm.shape[1]
    point = float(arm.mean() / base.mean()) if base.mean() > 0 else math.nan
    ratios = np.empty(samples)
    for i in range(samples):
        rows = rng.integers(0, n, n)
        pa = rng.integers(0, arm.shape[0], arm.shape[0])
        pb = rng.integers(0, base.shape[0], base.shape[0])
        num, den = arm[pa][:, rows].mean(), base[pb][:, rows].mean()
        ratios[i] = num / den if den > 0 else math.nan
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return point, [float(low), float(high)]


def call_of(ci: list[float]) -> str:
    if ci[1] < 1.0:
        return "better"
    if ci[0] > 1.0:
        return "worse"
    return "not distinguishable"


def _compare(probs: dict[str, list[np.ndarray]], arms: dict[str, dict[str, Any]], name: str, base: str,
             seed: int) -> tuple[float, list[float], float, str]:
    ratio, ci = bootstrap_ratio_ci(pair_rel_diffs(probs[name]), pair_rel_diffs(probs[base]), seed)
    ll = logloss_of(arms[name]) / logloss_of(arms[base])
    return ratio, ci, ll, call_of(ci)


def decide_verdict(arms: dict[str, dict[str, Any]], tolerance: float, goal: float,
                   test_probs: dict[str, list[np.ndarray]] | None = None,
                   confirmation: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                   select_tolerance: float | None = None) -> Verdict:
    """Choose on validation (``arms``); state the ratios on test rows of ``confirmation`` (arms keyed by
    the same names, retrained with fresh seeds) or, without one, of ``arms`` themselves.
    ``test_probs`` maps arm name → the test probabilities of its replicas (of the confirmation round
    when there is one); without it the intervals are left out. The arms are chosen within
    ``select_tolerance`` (default ``tolerance``) on validation; the goal is judged with ``tolerance``."""
    chosen_with = tolerance if select_tolerance is None else select_tolerance
    recipe, rule = select_best(arms, chosen_with, "valid")
    base = select_baseline(arms, chosen_with, "valid")
    ad, _ = select_best(arms, chosen_with, "valid", roles=(AD_ROLE,))
    stated = confirmation if confirmation else arms
    verdict = Verdict(recipe_arm=recipe, baseline_arm=base, ad_arm=ad, rule=rule, logloss_tolerance=tolerance,
                      pd_rel_goal=goal, confirmed=bool(confirmation))
    if confirmation:
        verdict.confirm_replicas = next(iter(confirmation.values()))["replicas"]
    if base is None or base not in stated:
        return verdict
    limit = 1 + tolerance + 1e-12
    for name, prefix in ((recipe, ""), (ad, "ad_")):
        if name is None or name not in stated:
            continue
        if test_probs and name in test_probs and base in test_probs:
            ratio, ci, ll, call = _compare(test_probs, stated, name, base, seed)
        else:
            ratio = pd_rel_of(stated[name]) / pd_rel_of(stated[base])
            ci, ll, call = None, logloss_of(stated[name]) / logloss_of(stated[base]), None
        setattr(verdict, f"{prefix}pd_rel_ratio", ratio)
        setattr(verdict, f"{prefix}pd_rel_ratio_ci", ci)
        setattr(verdict, f"{prefix}logloss_ratio", ll)
        setattr(verdict, f"{prefix}call", call)
        setattr(verdict, f"{prefix}goal_met", bool(ratio <= goal and ll <= limit))
    return verdict
