"""The ``ctr-ad`` command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``ctr-ad ingest`` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ctr_ad.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("ctr_ad.ingest.command", "turn raw click logs into Parquet splits + features.json"),
    "synth": ("ctr_ad.synthetic_command", "write a Criteo-like synthetic click log"),
    "train": ("ctr_ad.train_command", "train an (anti-distilled) ensemble on ingested data"),
    "predict": ("ctr_ad.predict_command", "score a raw log with a trained bundle"),
    "experiment": ("ctr_ad.experiment_command", "run replicated arms and measure reproducibility"),
    "report": ("ctr_ad.report_command", "write report.html / report.md for an experiment"),
    "pipeline": ("ctr_ad.pipeline_command", "run a batch pipeline (ingest → experiment → report)"),
    "serve": ("service.command", "serve a bundle over REST"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ctr-ad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"ctr-ad {name}: not available in this build", file=sys.stderr)
            return 2
        raise
    cmd_parser = argparse.ArgumentParser(prog=f"ctr-ad {name}", description=help_text)
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"ctr-ad {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctr-ad {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
