"""``ctr-ad synth``: write a Criteo-like synthetic click log with a planted click model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ctr_ad.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, required=True, help="number of rows to write")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.tsv[.gz]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="default", choices=["default", "criteo1tb"],
                        help="categorical cardinalities: default (3 to 2M values per field) or criteo1tb "
                             "(Criteo 1TB's published per-field sizes, up to 40M values; Zipf-distributed)")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.synthetic import write_synthetic

    if args.rows < 1:
        raise UserError("--rows must be at least 1")
    started = time.time()
    n = write_synthetic(args.out, args.rows, args.seed, progress=sys.stderr.isatty(), profile=args.profile)
    print(f"{args.out}: {n} synthetic Criteo-like rows (seed {args.seed}, profile {args.profile}) "
          f"in {time.time() - started:.1f}s")
    return 0
