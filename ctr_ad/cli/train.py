"""``ctr-ad train``: train an (anti-distilled) ensemble on ingested data into a run directory."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ctr_ad.config import load_config
from ctr_ad.files import finite_or_none
from ctr_ad.tracking import TrackingConfig


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: config values over the YAML's."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. {example}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="directory written by `ctr-ad ingest`")
    parser.add_argument("--config", help="YAML config (see pipelines/configs/); default: built-in defaults")
    parser.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl, bundle/)")
    add_override_argument(parser, "--set model.components=4 --set anti_distillation.lambda=0.1")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (bit-identical reruns)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--mlflow", nargs="?", const="", metavar="EXPERIMENT",
                        help="log the run to MLflow ($MLFLOW_TRACKING_URI, else ./mlruns), optionally naming the "
                             "MLflow experiment; the config's tracking section does the same")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.train import TrainingInterrupted, train

    # The convenience flags are spelled as the --set overrides they stand for: one override path.
    shorthands = {"train.device": args.device, "train.deterministic": True if args.deterministic else None,
                  "train.progress": False if args.no_progress else None}
    overrides = [*args.overrides, *(f"{k}={str(v).lower()}" for k, v in shorthands.items() if v is not None)]
    cfg = load_config(args.config, overrides)
    try:
        result = train(args.data, cfg, args.out, resume=args.resume)
    except TrainingInterrupted as exc:
        print(f"ctr-ad train: {exc}", file=sys.stderr)
        return 143
    summary = {
        "run_dir": str(result.run_dir),
        "bundle": str(result.bundle_dir) if result.bundle_dir else None,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "valid": result.valid_metrics,
        "test": result.test_metrics,
    }
    if os.environ.get("RANK", "0") != "0":  # under torchrun: one summary line and one MLflow run, from the
        return 0                             # rank that wrote the bundle
    tracking = tracking_from(cfg.tracking, args.mlflow)
    if tracking is not None:
        from ctr_ad.tracking import log_training

        summary["mlflow_run_id"] = log_training(tracking, result.run_dir, cfg.to_dict(), result)
    print(json.dumps(finite_or_none(summary), allow_nan=False))
    return 0


def tracking_from(section: TrackingConfig | None, flag: str | None) -> TrackingConfig | None:
    """The config's tracking section, or (``--mlflow [EXPERIMENT]``) the defaults, the flag's
    experiment name replacing the section's."""
    if flag is None:
        return section
    base = section or TrackingConfig()
    return base.model_copy(update={"experiment": flag}) if flag else base
