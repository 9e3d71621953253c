"""The ``ctr-ad`` command.

Each subcommand lives in its own module of this package (``ctr_ad/cli/<name>.py``; ingest and serve
beside their code) exposing ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their subcommand runs, so ``ctr-ad ingest`` never pays for torch. Library modules report
progress through ``logging``; this is the one place that decides how it is printed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ctr_ad.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("ctr_ad.ingest.command", "turn raw click logs into Parquet splits + features.json"),
    "synth": ("ctr_ad.cli.synth", "write a Criteo-like synthetic click log"),
    "train": ("ctr_ad.cli.train", "train an (anti-distilled) ensemble on ingested data"),
    "predict": ("ctr_ad.cli.predict", "score a raw log with a trained bundle"),
    "export": ("ctr_ad.cli.export", "export a bundle to another format (ONNX)"),
    "experiment": ("ctr_ad.cli.experiment", "run replicated arms and measure reproducibility"),
    "report": ("ctr_ad.cli.report", "write report.html / report.md for an experiment"),
    "compare": ("ctr_ad.cli.compare", "every arm's test pd_rel ratio to the baseline, with its interval"),
    "capacity": ("ctr_ad.cli.capacity", "count a model's parameters; size K' components to the same budget"),
    "pipeline": ("ctr_ad.cli.pipeline", "run a batch pipeline (ingest → experiment → report)"),
    "serve": ("service.command", "serve a bundle over REST"),
}


def configure_logging(command: str, level: int = logging.INFO) -> None:
    """Progress lines of the library go to stderr as ``[command] message``; results go to stdout."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{command}] %(message)s"))
    root = logging.getLogger("ctr_ad")
    root.handlers[:] = [handler]
    root.setLevel(level)


def describe_os_error(exc: OSError) -> str:
    """``FILE: reason`` on one line for an OSError (or its message when it names no file)."""
    if exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


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
    configure_logging(name)
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"ctr-ad {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, I/O error, …: one line naming the file, not a traceback
        print(f"ctr-ad {name}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ctr-ad {name}: interrupted", file=sys.stderr)
        return 130
