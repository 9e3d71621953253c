"""``ctr-ad ingest``: raw click logs -> Parquet splits, features.json, manifest.json, quarantine.jsonl."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctr_ad.errors import UserError
from ctr_ad.ingest.options import IngestOptions
from ctr_ad.schema import SOURCES

DESCRIPTION_EPILOG = """\
The output directory is replaced only by a complete, successful run: the dataset is written to a
hidden staging directory beside it and swapped in as a whole, manifest.json last. A failed or
interrupted run leaves an existing dataset untouched (its bad lines go to OUT.failed-quarantine.jsonl).
--out must be a new or empty directory, or a dataset written by ctr-ad ingest: other files in it are
refused rather than silently kept or deleted."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = DESCRIPTION_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    fields = IngestOptions.model_fields

    def default(name: str):
        return fields[name].default

    def help_of(name: str) -> str:
        return fields[name].description or ""

    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="raw log format")
    parser.add_argument("--input", required=True, nargs="+", type=Path, metavar="PATH",
                        help="log files (plain or .gz); with --split files: train, valid, test")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="dataset directory, replaced only by a complete, successful run")
    parser.add_argument("--split", default=default("split"), choices=["sequential", "random", "files"],
                        help=help_of("split"))
    parser.add_argument("--valid-frac", type=float, default=default("valid_frac"), help=help_of("valid_frac"))
    parser.add_argument("--test-frac", type=float, default=default("test_frac"), help=help_of("test_frac"))
    parser.add_argument("--min-count", type=int, default=default("min_count"), help=help_of("min_count"))
    parser.add_argument("--max-vocab", default=None, metavar="N|FIELD=N,...|FILE.yaml", help=help_of("max_vocab"))
    parser.add_argument("--count-memory-mib", type=int, default=default("count_memory_mib"),
                        help=help_of("count_memory_mib"))
    parser.add_argument("--seed", type=int, default=default("seed"), help=help_of("seed"))
    parser.add_argument("--max-bad-fraction", type=float, default=default("max_bad_fraction"),
                        help=help_of("max_bad_fraction"))
    parser.add_argument("--workers", type=int, default=default("workers"), help=help_of("workers"))
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")


def parse_max_vocab(text: str | None) -> int | dict[str, int] | None:
    """``--max-vocab``: ``N`` (every categorical field), ``FIELD=N,FIELD=N`` or a YAML file whose
    ``max_vocab`` key holds either form. Field names are checked against the source by the ingest."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        from ctr_ad.strict import load_yaml_mapping

        data = load_yaml_mapping(text, "--max-vocab file")
        extra = sorted(set(data) - {"max_vocab"})
        if extra or "max_vocab" not in data:
            raise UserError(f"{text}: expected one key, max_vocab (a number or FIELD: N), "
                            f"got {', '.join(map(repr, extra)) or 'none'}")
        return data["max_vocab"]
    caps: dict[str, int] = {}
    for item in text.split(","):
        field, sep, n = item.partition("=")
        field, n = field.strip(), n.strip()
        if not sep or not field or not n.isdigit():
            raise UserError(f"--max-vocab: {item.strip()!r} is not FIELD=N (a whole number); use N, "
                            f"FIELD=N,FIELD=N or a YAML file")
        caps[field] = int(n)
    return caps


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which tests and callers may swap), not the one at setup."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(quiet: bool) -> None:
    """Messages of ``ctr_ad.ingest`` as ``[ingest] …`` lines on stderr (warnings only with --quiet)."""
    logger = logging.getLogger("ctr_ad.ingest")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[ingest] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def run(args: argparse.Namespace) -> int:
    from ctr_ad.ingest.run import run_ingest

    configure_logging(args.quiet)
    values = {name: getattr(args, name) for name in IngestOptions.model_fields}
    values["max_vocab"] = parse_max_vocab(args.max_vocab)
    options = IngestOptions.of(values, origin="ctr-ad ingest")
    manifest = run_ingest(args.input, args.source, args.out, options, quiet=args.quiet)
    rows = manifest["rows"]
    print(f"{args.out}: {rows['written']} rows written "
          f"({', '.join(f'{k} {v}' for k, v in manifest['splits'].items())}), "
          f"{rows['quarantined']} quarantined (see quarantine.jsonl), "
          f"fingerprint {manifest['fingerprint'][:12]}")
    return 0
