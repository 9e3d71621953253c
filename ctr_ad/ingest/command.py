"""``ctr-ad ingest``: raw click logs -> Parquet splits, features.json, manifest.json, quarantine.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path

from ctr_ad.schema import SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="raw log format")
    parser.add_argument("--input", required=True, nargs="+", type=Path, metavar="PATH",
                        help="log files (plain or .gz); with --split files: train, valid, test")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--split", default="sequential", choices=["sequential", "random", "files"],
                        help="sequential keeps file order (test = latest rows); random is seeded")
    parser.add_argument("--valid-frac", type=float, default=0.1)
    parser.add_argument("--test-frac", type=float, default=0.1)
    parser.add_argument("--min-count", type=int, default=2,
                        help="categorical values seen fewer times in train map to out-of-vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of rows is quarantined")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.ingest.run import run_ingest

    manifest = run_ingest(
        args.input, args.source, args.out, split=args.split, valid_frac=args.valid_frac,
        test_frac=args.test_frac, min_count=args.min_count, seed=args.seed,
        max_bad_fraction=args.max_bad_fraction, workers=args.workers, quiet=args.quiet,
    )
    rows = manifest["rows"]
    print(f"{args.out}: {rows['written']} rows written "
          f"({', '.join(f'{k} {v}' for k, v in manifest['splits'].items())}), "
          f"{rows['quarantined']} quarantined (see quarantine.jsonl), "
          f"fingerprint {manifest['fingerprint'][:12]}")
    return 0
