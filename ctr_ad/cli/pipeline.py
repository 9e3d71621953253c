"""``ctr-ad pipeline run FILE``: ingest → experiment → report → publish, skipping unchanged steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run_p = sub.add_parser("run", help="run a pipeline file (e.g. pipelines/demo.yaml)")
    run_p.add_argument("file", type=Path, metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.pipeline import run_pipeline

    result = run_pipeline(args.file)
    print(
        json.dumps(
            {"bundle": result["bundle"], "reports": result["reports"], "offline_pd_rel": result["published"]["pd_rel"]},
            indent=1,
        )
    )
    print(f"serve: ctr-ad serve --bundle {result['bundle']}")
    return 0
