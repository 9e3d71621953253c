"""``ctr-ad report EXP_DIR``: write EXP_DIR/report.html (self-contained) and EXP_DIR/report.md."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("exp_dir", type=Path, metavar="EXP_DIR", help="output of `ctr-ad experiment`")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.report import write_report

    path = write_report(args.exp_dir)
    print(f"report: {path} (and {path.with_suffix('.md')})")
    return 0
