"""Offline evaluation report of an experiment: ``EXP_DIR/report.html`` (self-contained) + ``report.md``.

Everything is read from the experiment directory (``results.json``, each replica's
``predictions.parquet``) and from the ingested data it names (``test.parquet``/``train.parquet`` for
the PD-by-category-frequency view). Plots are matplotlib PNGs embedded as base64 data URIs, so the
HTML file can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import yaml

from ctr_ad import metrics as M
from ctr_ad.artifacts import Verdict
from ctr_ad.experiment import component_logits, load_results
from ctr_ad.layout import ExperimentDir

MAX_LINES = 6  # arms drawn in the per-arm line plots
FREQ_EDGES = (10, 100, 1000)  # train-count bucket edges of the rarest categorical value of a row


# --------------------------------------------------------------------------------------------- helpers
def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x != 0 and abs(x) < 10 ** -(digits - 1):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _pm(stat: dict[str, float], digits: int = 4) -> str:
    if stat.get("n", 0) == 0 or stat.get("mean") is None or math.isnan(stat["mean"]):
        return "n/a"
    return f"{_fmt(stat['mean'], digits)} ± {_fmt(stat['std'], digits)}"


def _predictions(exp_dir: Path, arm: str, replicas: int) -> list[pl.DataFrame]:
    return [pl.read_parquet(ExperimentDir(exp_dir).replica(arm, r).predictions) for r in range(replicas)]


def key_arms(results: dict[str, Any]) -> list[str]:
    """Arms drawn in the per-arm plots: best, baseline, the other plain/single/linear arms, then the
    anti-distillation arms with the lowest pd_rel (at most MAX_LINES)."""
    arms = results["arms"]
    chosen: list[str] = []
    for name in (results.get("best"), results.get("baseline")):
        if name and name not in chosen:
            chosen.append(name)
    for role in ("plain", "single", "linear"):
        chosen += [n for n, a in arms.items() if a["role"] == role and n not in chosen]
    ad = sorted(
        (n for n, a in arms.items() if a["role"] == "anti_distillation"), key=lambda n: _pd_rel(arms[n])
    )
    chosen += [n for n in ad if n not in chosen]
    return chosen[:MAX_LINES]


def _pd_rel(arm: dict[str, Any]) -> float:
    return arm["pd"]["pd_rel"]["mean"]


def _logloss(arm: dict[str, Any]) -> float:
    return arm["accuracy"]["logloss"]["mean"]


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (x, y) no other point beats on both coordinates (lower is better)."""
    front = []
    for name, (x, y) in points.items():
        dominated = any(
            (x2 <= x and y2 <= y) and (x2 < x or y2 < y)
            for other, (x2, y2) in points.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def frequency_buckets(data_dir: Path, test: pl.DataFrame | None = None) -> tuple[np.ndarray, list[str]]:
    """Bucket of every test row by the train count of its rarest categorical value.

    Index 1 (out of vocabulary: seen fewer than ``min_count`` times in train, or never) counts as
    rare; index 0 (missing) is ignored. Buckets: OOV, < 10, 10–99, 100–999, ≥ 1000 train rows.
    """
    features = json.loads((data_dir / "features.json").read_text())
    train = pl.read_parquet(data_dir / "train.parquet")
    test = test if test is not None else pl.read_parquet(data_dir / "test.parquet")
    cat_cols = [c for c in train.columns if train.schema[c] in (pl.Int32, pl.Int64) and c != "label"]
    min_count = int(features.get("min_count", 1))
    rarest = np.full(test.height, np.inf)
    for col in cat_cols:
        tr = train[col].to_numpy().astype(np.int64)
        te = test[col].to_numpy().astype(np.int64)
        counts = np.bincount(tr, minlength=int(max(tr.max(initial=0), te.max(initial=0))) + 1).astype(float)
        row_count = counts[te]
        row_count[te == 1] = 0.0
        row_count[te == 0] = np.inf
        rarest = np.minimum(rarest, row_count)
    labels = ["OOV value", f"{min_count}–9", "10–99", "100–999", "≥ 1000"]
    bucket = np.where(rarest <= 0, 0, 1 + np.searchsorted(FREQ_EDGES, rarest, side="right"))
    return bucket.astype(np.int64), labels


# --------------------------------------------------------------------------------------------- plots
def plot_pd_vs_lambda(results: dict[str, Any]) -> str | None:
    arms = results["arms"]
    ad = [a for a in arms.values() if a["role"] == "anti_distillation"]
    if not ad:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    for a in ad:
        key = (a["penalty"], a["data_order"], a["activation"])
        series.setdefault(key, []).append((a["lambda"], _pd_rel(a), a["pd"]["pd_rel"]["std"]))
    plain = {(a["data_order"], a["activation"]): a for a in arms.values() if a["role"] == "plain"}
    for (penalty, order, act), pts in sorted(series.items()):
        pts.sort()
        lam, pd, sd = map(np.array, zip(*pts))
        label = f"{penalty} ({order}{', ' + act if act != 'relu' else ''})"
        ax.errorbar(lam, pd, yerr=sd, marker="o", capsize=3, label=label)
    x_min = min(pt[0] for pts in series.values() for pt in pts)
    for (order, act), a in sorted(plain.items()):
        ax.axhline(_pd_rel(a), color="black", lw=1.0, ls="--" if order == "shared" else "-.")
        label = f" plain {order}{' ' + act if act != 'relu' else ''}"
        ax.text(x_min, _pd_rel(a), label, va="bottom", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("λ (penalty weight, log scale)")
    ax.set_ylabel("pd_rel between replicas (mean ± std over pairs)")
    ax.set_title("Prediction difference against λ, per penalty (black lines: plain ensembles, λ = 0)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_tradeoff(results: dict[str, Any]) -> tuple[str, list[str]]:
    arms = results["arms"]
    points = {n: (_logloss(a), _pd_rel(a)) for n, a in arms.items()}
    front = pareto_front(points)
    colors = {"single": "tab:gray", "plain": "black", "anti_distillation": "tab:blue", "linear": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for role, color in colors.items():
        names = [n for n, a in arms.items() if a["role"] == role]
        if not names:
            continue
        ax.errorbar(
            [points[n][0] for n in names],
            [points[n][1] for n in names],
            xerr=[arms[n]["accuracy"]["logloss"]["std"] for n in names],
            yerr=[arms[n]["pd"]["pd_rel"]["std"] for n in names],
            fmt="o",
            color=color,
            alpha=0.75,
            capsize=2,
            label=role.replace("_", "-"),
        )
    fx, fy = zip(*(points[n] for n in front))
    ax.plot(fx, fy, "r-", lw=1.2, label="Pareto front")
    ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="red")
    for n in arms:
        if n in front or n in (results.get("best"), results.get("baseline")):
            ax.annotate(n, points[n], fontsize=7, xytext=(4, 4), textcoords="offset points")
    best = results.get("best")
    if best:
        ax.scatter(
            *points[best], marker="*", s=250, color="gold", edgecolors="black", zorder=5, label="best arm"
        )
    ax.set_xlabel("test logloss (mean over replicas; lower is better)")
    ax.set_ylabel("pd_rel (mean over replica pairs; lower is better)")
    # Collapsed arms (e.g. a constant prediction at a large λ) would squash the plot: cut the x axis
    # at 6 % above the most accurate arm and name the arms beyond it.
    x_best = min(x for x, _ in points.values())
    x_cut = x_best * 1.06
    beyond = sorted(n for n, (x, _) in points.items() if x > x_cut)
    title = "Accuracy against reproducibility, every arm"
    if beyond:
        ax.set_xlim(right=x_cut)
        shown = ", ".join(beyond[:4]) + (f" and {len(beyond) - 4} more" if len(beyond) > 4 else "")
        title += f"\n(off the plot, logloss > 6 % above the best: {shown})"
    ax.set_title(title, fontsize=9 if beyond else 12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig), front


def plot_abs_diff(exp_dir: Path, results: dict[str, Any]) -> str:
    arms = results["arms"]
    names = sorted(arms, key=lambda n: _pd_rel(arms[n]))
    data = []
    for n in names:
        preds = [f["p"].to_numpy() for f in _predictions(exp_dir, n, arms[n]["replicas"])]
        d = np.concatenate([M.abs_diff(a, b) for i, a in enumerate(preds) for b in preds[i + 1 :]])
        data.append(np.maximum(d, 1e-7))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.5))
    ax.boxplot(data, orientation="horizontal", whis=(1, 99), showfliers=False, widths=0.6)
    ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("|p1 − p2| per test row, all replica pairs (box: quartiles, whiskers: 1st–99th percentile)")
    ax.set_title("Distribution of the per-row prediction difference (arms sorted by pd_rel)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def _pairs_by_group(
    exp_dir: Path, arm: dict[str, Any], name: str, groups_of: Any, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    preds = [f["p"].to_numpy() for f in _predictions(exp_dir, name, arm["replicas"])]
    mean_p = np.mean(preds, axis=0)
    groups = groups_of(mean_p)
    rel = []
    for i, a in enumerate(preds):
        for b in preds[i + 1 :]:
            rel.append(M.pd_by_group(a, b, groups, n_groups)[1])
    counts = np.bincount(groups, minlength=n_groups)
    return np.mean(rel, axis=0), counts


def plot_pd_by_group(
    exp_dir: Path,
    results: dict[str, Any],
    names: list[str],
    groups_of: Any,
    labels: list[str],
    title: str,
    xlabel: str,
) -> tuple[str, list[list[str]]]:
    arms = results["arms"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    table: list[list[str]] = []
    counts = None
    for n in names:
        rel, counts = _pairs_by_group(exp_dir, arms[n], n, groups_of, len(labels))
        keep = counts > 0
        ax.plot(np.arange(len(labels))[keep], rel[keep], marker="o", label=n)
        table.append([n, *(_fmt(v) if c > 0 else "no rows" for v, c in zip(rel, counts))])
    assert counts is not None
    table.append(["test rows", *(str(int(c)) for c in counts)])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pd_rel (mean over replica pairs)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig), table


def plot_calibration(exp_dir: Path, results: dict[str, Any], names: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    hi = 0.0
    for n in names:
        frame = _predictions(exp_dir, n, 1)[0]
        mp, my, _ = M.calibration_curve(frame["label"].to_numpy(), frame["p"].to_numpy(), bins=10)
        hi = max(hi, float(mp.max()), float(my.max()))
        ax.plot(mp, my, marker="o", label=n)
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlabel("mean prediction (10 equal-mass bins, replica 0)")
    ax.set_ylabel("observed click rate")
    ax.set_title("Calibration curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_component_corr(exp_dir: Path, results: dict[str, Any], names: list[str]) -> str | None:
    names = [n for n in names if results["arms"][n]["components"] > 1]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.3), squeeze=False)
    for ax, n in zip(axes[0], names):
        corr = M.component_correlation_matrix(component_logits(_predictions(exp_dir, n, 1)[0]))
        im = ax.imshow(corr, vmin=-1, vmax=1, cmap="RdBu_r")
        for (i, j), v in np.ndenumerate(corr):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(n, fontsize=8)
        ax.set_xticks(range(corr.shape[0]))
        ax.set_yticks(range(corr.shape[0]))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="Pearson correlation of component logits")
    fig.suptitle("Correlation of the components' test logits (replica 0)", fontsize=10)
    return _png(fig)


# --------------------------------------------------------------------------------------------- tables
# The answer first: pd_rel and logloss (and their ratios to the baseline) before the details, so
# they are visible at 1280 px without scrolling sideways.
ARM_COLUMNS = [
    "arm",
    "role",
    "pd_rel",
    "pd_rel ÷ baseline",
    "logloss",
    "logloss ÷ baseline",
    "AUC",
    "K",
    "penalty",
    "λ",
    "data order",
    "activation",
    "calibration",
    "ECE",
    "pd_abs",
    "pd_rms",
    "|Δp| q99",
    "|Δp| max",
]


def _ratio_to(arm: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    if base is None:
        return "n/a"
    node = "pd" if key == "pd_rel" else "accuracy"
    value, ref = arm[node][key]["mean"], base[node][key]["mean"]
    if value is None or ref is None or ref == 0:
        return "n/a"
    return f"{value / ref:.2f}" if key == "pd_rel" else f"{value / ref:.4f}"


def arms_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    churn = [k for k in next(iter(results["arms"].values()))["pd"] if k.startswith("churn")]
    header = [*ARM_COLUMNS, *churn, "spearman", "component corr", "component spread", "wall s / replica"]
    base = results["arms"].get(results.get("baseline") or "")
    rows = []
    for n, a in sorted(results["arms"].items(), key=lambda kv: _pd_rel(kv[1])):
        acc, pd, comp = a["accuracy"], a["pd"], a["component"]
        rows.append(
            [
                n,
                a["role"].replace("_", "-"),
                _pm(pd["pd_rel"]),
                _ratio_to(a, base, "pd_rel"),
                _pm(acc["logloss"], 5),
                _ratio_to(a, base, "logloss"),
                _pm(acc["auc"]),
                str(a["components"]),
                a["penalty"],
                f"{a['lambda']:g}",
                a["data_order"],
                a["activation"],
                _pm(acc["calibration"], 3),
                _pm(acc["ece"]),
                _pm(pd["pd_abs"]),
                _pm(pd["pd_rms"]),
                _pm(pd["pd_q99"]),
                _pm(pd["pd_max"]),
                *(_pm(pd[c], 3) for c in churn),
                _pm(pd["spearman"]),
                _pm(comp["component_corr"], 3),
                _pm(comp["component_spread"]),
                _pm(a["wall_s"], 1),
            ]
        )
    return header, rows


def verdict(results: dict[str, Any]) -> Verdict | None:
    """The verdict ``ctr-ad experiment`` stored in results.json (None for results without one)."""
    stored = results.get("verdict")
    return Verdict.model_validate(stored) if stored else None


def _html_table(header: list[str], rows: list[list[str]], highlight: dict[str, str] | None = None) -> str:
    highlight = highlight or {}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cls = highlight.get(row[0], "")
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row)
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _kv_rows(d: dict[str, Any]) -> list[list[str]]:
    return [[str(k), str(v) if v not in (None, "") else "none"] for k, v in d.items()]


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.6em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}
th{background:#f0f0f0}
tr.best{background:#fff3b0;font-weight:bold} tr.baseline{background:#dceeff}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.scroll{overflow-x:auto} pre{background:#f7f7f7;padding:0.6em;font-size:11px;overflow-x:auto}
.verdict{font-size:15px;padding:0.6em;border-left:4px solid #888;background:#fafafa}
"""

GLOSSARY = [
    ["pd_abs", "mean over test rows of |p1 − p2| between two retrained replicas (same data, config, code)"],
    ["pd_rel", "mean of 2|p1 − p2| / (p1 + p2): the relative prediction difference, the headline metric"],
    ["pd_rms / pd_q99 / pd_max", "root mean square, 99th percentile and maximum of |p1 − p2|"],
    ["churn_topK", "1 − overlap of the top K % test rows ranked by the two replicas (0 = same top rows)"],
    ["spearman", "rank correlation of the two replicas' predictions (1 = same ranking)"],
    ["logloss / AUC", "accuracy on the test split; calibration = mean prediction / click rate (1 is ideal)"],
    ["ECE", "expected calibration error over 10 equal-mass prediction bins"],
    [
        "component corr / spread",
        "within one ensemble: mean correlation between components' logits, "
        "and mean std of the components' probabilities per row",
    ],
    ["± values", "std over R replicas (accuracy) or over the R·(R−1)/2 replica pairs (PD)"],
]


# --------------------------------------------------------------------------------------------- report
def _ratio_text(ratio: float | None, ci: list[float] | None, ll: float | None) -> str:
    if ratio is None:
        return "n/a"
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"pd_rel × {ratio:.2f}{interval} at logloss × {ll:.4f}"


def verdict_sentence(v: Verdict) -> str:
    """One sentence that answers the question: the recipe against the baseline, with its interval."""
    where = (f"on the test rows of {v.confirm_replicas} fresh replicas per arm (confirmation round)"
             if v.confirmed else "on the test rows of the same replicas (no confirmation round)")
    goal = f"goal ≤ {v.pd_rel_goal:g} × at logloss ≤ {1 + v.logloss_tolerance:g} ×"
    if v.recipe_arm is None or v.baseline_arm is None:
        return "Verdict: no arm qualifies (no plain ensemble to compare with, or none within the logloss tolerance)."
    call = f" — {v.call}" if v.call else ""
    ratio = _ratio_text(v.pd_rel_ratio, v.pd_rel_ratio_ci, v.logloss_ratio)
    return (
        f"Verdict: <b>{html.escape(v.recipe_arm)}</b> gives {ratio}"
        f" of the baseline <b>{html.escape(v.baseline_arm)}</b>{call} ({goal}: <b>{'met' if v.goal_met else 'not met'}"
        f"</b>). Chosen on validation rows, stated {where}."
    )


def summary_lines(results: dict[str, Any], v: Verdict | None) -> list[str]:
    """The first screen's sentences (HTML): the verdict, best arm, rule, baseline, and the AD arm."""
    arms = results["arms"]
    best, base = results.get("best"), results.get("baseline")
    lines = [verdict_sentence(v)] if v is not None else []
    if best:
        a = arms[best]
        lines.append(
            f"Best arm: <b>{html.escape(best)}</b> — pd_rel {_pm(a['pd']['pd_rel'])}, "
            f"test logloss {_pm(a['accuracy']['logloss'], 5)}, AUC {_pm(a['accuracy']['auc'])}."
        )
    else:
        lines.append("No deep-model arm met the logloss tolerance: no best arm.")
    lines.append(f"Rule: {html.escape(results['best_rule'])}.")
    if base:
        b = arms[base]
        lines.append(
            f"Baseline (best ensemble without anti-distillation): <b>{html.escape(base)}</b> — pd_rel "
            f"{_pm(b['pd']['pd_rel'])}, logloss {_pm(b['accuracy']['logloss'], 5)}."
        )
    if v is not None and v.ad_arm is not None and v.ad_pd_rel_ratio is not None:
        ad_ratio = _ratio_text(v.ad_pd_rel_ratio, v.ad_pd_rel_ratio_ci, v.ad_logloss_ratio)
        lines.append(
            f"Best anti-distillation arm within {v.logloss_tolerance:.1%} logloss of the baseline: "
            f"<b>{html.escape(v.ad_arm)}</b>: {ad_ratio}"
            + (f" — {v.ad_call}" if v.ad_call else "")
            + f". Goal (pd_rel ≤ {v.pd_rel_goal:g} × with logloss ≤ {1 + v.logloss_tolerance:g} ×): "
            f"<b>{'met' if v.ad_goal_met else 'not met'}</b>."
        )
    elif v is not None and base:
        lines.append("No anti-distillation arm is within the logloss tolerance of the baseline.")
    return lines


def _first_screen(results: dict[str, Any], lines: list[str], header: list[str], rows: list[list[str]],
                  highlight: dict[str, str]) -> list[tuple[str, str]]:
    """The sections a reader sees first: the verdict, the confirmation round, the arms, the glossary."""
    sections = [("Summary", "<div class='verdict'>" + "<br>".join(lines) + "</div>")]
    if results.get("confirmation"):
        c_header, c_rows = arms_table({"arms": results["confirmation"], "baseline": results.get("baseline")})
        sections.append(
            (
                "Confirmation round (fresh seeds; the verdict's test figures)",
                f"<div class='scroll'>{_html_table(c_header, c_rows, highlight)}</div>",
            )
        )
    sections.append(
        (
            "Arms (chosen on validation rows; test figures, sorted by pd_rel; best arm in yellow, baseline in blue)",
            f"<div class='scroll'>{_html_table(header, rows, highlight)}</div>",
        )
    )
    sections.append(("How to read this report", _html_table(["term", "meaning"], GLOSSARY)))
    return sections


def write_report(exp_dir: str | Path) -> Path:
    """Write ``report.html`` and ``report.md`` into ``exp_dir``; returns the HTML path."""
    exp_dir = Path(exp_dir)
    results = load_results(exp_dir)
    arms = results["arms"]
    data_dir = Path(results["data_dir"])
    best, base = results.get("best"), results.get("baseline")
    names = key_arms(results)
    header, rows = arms_table(results)
    v = verdict(results)
    highlight = {n: c for n, c in ((base, "baseline"), (best, "best")) if n}

    lines = summary_lines(results, v)

    sections = _first_screen(results, lines, header, rows, highlight)
    img = plot_pd_vs_lambda(results)
    if img:
        sections.append(("PD against λ per penalty", _img(img, "pd_rel against lambda")))
    trade, front = plot_tradeoff(results)
    sections.append(
        (
            "Trade-off: logloss against pd_rel",
            _img(trade, "trade-off")
            + f"<p>Pareto front (no arm is better on both): {html.escape(', '.join(front))}.</p>",
        )
    )
    sections.append(("Distribution of |p1 − p2|", _img(plot_abs_diff(exp_dir, results), "abs diff")))
    dec_img, dec_table = plot_pd_by_group(
        exp_dir,
        results,
        names,
        lambda p: M.deciles(p, 10),
        [f"D{i + 1}" for i in range(10)],
        "PD by decile of the prediction (mean over replicas)",
        "prediction decile (D1 = lowest CTR)",
    )
    sections.append(
        (
            "PD by prediction decile",
            _img(dec_img, "pd by decile")
            + _html_table(["arm", *[f"D{i + 1}" for i in range(10)]], dec_table),
        )
    )
    freq_section = _frequency_section(exp_dir, results, names, data_dir)
    if freq_section:
        sections.append(("PD by category frequency (rare vs frequent IDs)", freq_section))
    sections.append(("Calibration curves", _img(plot_calibration(exp_dir, results, names), "calibration")))
    corr_img = plot_component_corr(exp_dir, results, [n for n in (base, best) if n] or names)
    if corr_img:
        sections.append(("Component correlation matrix", _img(corr_img, "component correlation")))
    sections.append(("Data fingerprint, configuration and environment", _provenance(results, best)))

    body = "".join(f"<h2>{html.escape(t)}</h2>{c}" for t, c in sections)
    title = f"ctr-ad reproducibility report — {html.escape(data_dir.name)}"
    doc = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{CSS}</style></head><body><h1>{title}</h1>"
        f"<p>Experiment <code>{html.escape(str(exp_dir.resolve()))}</code>: {len(arms)} arms × "
        f"{next(iter(arms.values()))['replicas']} replicas, "
        f"data <code>{html.escape(str(data_dir))}</code>.</p>"
        f"{body}</body></html>"
    )
    out = ExperimentDir(exp_dir).report_html
    out.write_text(doc)
    _write_markdown(exp_dir, results, header, rows, lines, front)
    return out


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _frequency_section(
    exp_dir: Path, results: dict[str, Any], names: list[str], data_dir: Path
) -> str | None:
    if not (data_dir / "train.parquet").is_file() or not (data_dir / "test.parquet").is_file():
        return None
    buckets, labels = frequency_buckets(data_dir)
    img, table = plot_pd_by_group(
        exp_dir,
        results,
        names,
        lambda p: buckets,
        labels,
        "PD by the train frequency of the row's rarest categorical value",
        "train count of the rarest categorical value of the row",
    )
    note = (
        "<p>Each test row is bucketed by the number of training rows that share its rarest categorical "
        "value (missing values ignored; 'OOV value' = a value below the vocabulary's min count).</p>"
    )
    return note + _img(img, "pd by frequency") + _html_table(["arm", *labels], table)


def _provenance(results: dict[str, Any], best: str | None) -> str:
    manifest = results.get("manifest") or {}
    fp = {
        "data directory": results["data_dir"],
        "fingerprint": manifest.get("fingerprint", "unknown"),
        "source": manifest.get("source", "unknown"),
        "splits (rows)": ", ".join(f"{k} {v}" for k, v in (manifest.get("splits") or {}).items())
        or "unknown",
        "inputs": ", ".join(
            str(i.get("path", i)) if isinstance(i, dict) else str(i) for i in (manifest.get("inputs") or [])
        )
        or "unknown",
    }
    run = results.get("run", {})
    parts = [
        "<h3>Data</h3>",
        _html_table(["field", "value"], _kv_rows(fp)),
        "<h3>Environment and run times</h3>",
        _html_table(["field", "value"], _kv_rows({**results.get("environment", {}), **run})),
        "<h3>Experiment configuration</h3>",
        f"<pre>{html.escape(yaml.safe_dump(results['experiment'], sort_keys=False))}</pre>",
    ]
    if best:
        parts += [
            f"<h3>Resolved training configuration of the best arm ({html.escape(best)})</h3>",
            f"<pre>{html.escape(yaml.safe_dump(results['arms'][best]['config'], sort_keys=False))}</pre>",
        ]
    parts += ["<h3>manifest.json</h3>", f"<pre>{html.escape(json.dumps(manifest, indent=1)[:20000])}</pre>"]
    return "".join(parts)


def _write_markdown(
    exp_dir: Path,
    results: dict[str, Any],
    header: list[str],
    rows: list[list[str]],
    lines: list[str],
    front: list[str],
) -> None:
    import re

    plain = [html.unescape(re.sub(r"</?b>", "**", ln)) for ln in lines]
    manifest = results.get("manifest") or {}
    md = [
        f"# ctr-ad reproducibility report — {Path(results['data_dir']).name}",
        "",
        *[f"- {ln}" for ln in plain],
        f"- Pareto front (logloss vs pd_rel): {', '.join(front)}",
        f"- Data fingerprint: `{manifest.get('fingerprint', 'unknown')}`",
        "",
        "## Arms (sorted by pd_rel)",
        "",
        _md_table(header, rows),
        "",
        "Plots (PD vs λ, trade-off, |p1 − p2| distributions, PD by decile and category frequency, "
        "calibration, component correlations) are in `report.html`.",
        "",
    ]
    ExperimentDir(exp_dir).report_md.write_text("\n".join(md))
