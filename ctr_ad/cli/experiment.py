"""``ctr-ad experiment``: train every arm R times and measure accuracy and reproducibility (PD)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="output of `ctr-ad ingest`")
    parser.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="FILE",
        help="experiment config (e.g. pipelines/configs/experiment-demo.yaml)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="EXP_DIR",
        help="experiment directory; a rerun skips finished replicas",
    )
    parser.add_argument("--arms", nargs="+", metavar="NAME", help="run only these arms")
    parser.add_argument("--replicas", type=int, metavar="R", help="override the config's replica count")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="train nothing: summarise the arms whose replicas are all finished",
    )
    parser.add_argument("--report", action="store_true", help="also write report.html / report.md")
    parser.add_argument("--mlflow", nargs="?", const="", metavar="EXPERIMENT",
                        help="log params, per-arm metrics, the verdict and artifacts to MLflow "
                             "($MLFLOW_TRACKING_URI, else ./mlruns); the config's tracking section does the same")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.errors import UserError
    from ctr_ad.experiment import load_experiment_config, run_experiment

    cfg = load_experiment_config(args.config)
    if args.replicas is not None:
        if args.replicas < 2:
            raise UserError("--replicas must be at least 2 (PD needs a pair)")
        cfg = cfg.model_copy(update={"replicas": args.replicas})
    results = run_experiment(
        args.data, cfg, args.out, only=args.arms, device=args.device, train_missing=not args.summarise_only
    )
    print(f"{args.out / 'results.json'}: {len(results['arms'])} arms, best arm {results['best']}")
    if args.report:
        from ctr_ad.report import write_report

        html_path = write_report(args.out)
        print(f"report: {html_path}")
    from ctr_ad.cli.train import tracking_from

    tracking = tracking_from(cfg.tracking, args.mlflow)
    if tracking is not None:
        from ctr_ad.tracking import log_experiment

        print(f"mlflow run: {log_experiment(tracking, args.out, results)}")
    return 0
