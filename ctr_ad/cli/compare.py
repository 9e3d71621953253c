"""``ctr-ad compare EXP_DIR``: every arm's test pd_rel ratio to the baseline, with its 95 % interval.

Prints a Markdown table (or, with ``--json``, the rows) for the main round or the confirmation round;
the verdict in ``results.json`` covers only the arms the protocol chose, this covers them all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("exp_dir", type=Path, metavar="EXP_DIR", help="output of `ctr-ad experiment`")
    parser.add_argument(
        "--round",
        choices=["main", "confirmation"],
        default="main",
        help="the main round's replicas or the confirmation round's fresh seeds (default: main)",
    )
    parser.add_argument("--baseline", help="the arm to divide by (default: the experiment's baseline)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.comparison import compare_arms, markdown_table
    from ctr_ad.experiment import load_results
    from ctr_ad.files import finite_or_none

    results = load_results(args.exp_dir)
    rows = compare_arms(args.exp_dir, args.round, args.baseline, results)
    baseline = args.baseline or results["baseline"]
    print(json.dumps(finite_or_none(rows), allow_nan=False) if args.json else markdown_table(rows, baseline))
    return 0
