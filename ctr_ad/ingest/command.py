"""``ctr-ad ingest``: raw click logs -> Parquet splits, features.json, manifest.json, quarantine.jsonl."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ctr_ad.errors import UserError
from ctr_ad.ingest.options import IngestOptions
from ctr_ad.schema import SOURCES, TABLE

DESCRIPTION_EPILOG = """\
The output directory is replaced only by a complete, successful run: the dataset is written to a
hidden staging directory beside it and swapped in as a whole, manifest.json last. A failed or
interrupted run leaves an existing dataset untouched (its bad lines go to OUT.failed-quarantine.jsonl).
--out must be a new or empty directory, or a dataset written by ctr-ad ingest: other files in it are
refused rather than silently kept or deleted.

--source table reads your own CSV/TSV (plain or .gz) or Parquet log by a declared schema: a YAML file
(--schema FILE; see docs/ingest-your-own-log.md) and/or the schema flags above, which replace the
file's keys. With a declared time column the default split is --split time.

Criteo 1TB: --split days --resume --input day_0.gz … day_23.gz trains on days 0-22 and splits day 23
into test (first half, rounded up) and valid (second half), as the DLRM and MLPerf references do; see
docs/criteo-1tb.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = DESCRIPTION_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    fields = IngestOptions.model_fields

    def default(name: str):
        return fields[name].default

    def help_of(name: str) -> str:
        return fields[name].description or ""

    parser.add_argument("--source", required=True, choices=sorted([*SOURCES, TABLE]),
                        help="raw log format; table: your own log, by a declared schema")
    parser.add_argument("--input", required=True, nargs="+", type=Path, metavar="PATH",
                        help="log files (plain or .gz); with --split files: train, valid, test; with "
                        "--split days: one file per day, in day order (day_0.gz … day_23.gz)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="dataset directory, replaced only by a complete, successful run")
    parser.add_argument("--split", default=None, choices=["sequential", "random", "files", "time", "days"],
                        help=help_of("split") + f" (default: time with a declared time column, else "
                        f"{default('split')})")
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
    parser.add_argument("--engine", choices=["local", "ray"], default=default("engine"), help=help_of("engine"))
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="per-file progress bar on stderr with rows/s and ETA (default: only on a "
                        "terminal and without --quiet)")
    parser.add_argument("--resume", action="store_true",
                        help="keep per-file checkpoints in .OUT.ingest-resume beside OUT, so that rerunning "
                        "the same command after a kill restarts from the last finished file; the output is "
                        "byte-identical to an uninterrupted run; removed when the run succeeds")
    add_schema_arguments(parser.add_argument_group("declared schema (--source table)"))


def add_schema_arguments(group: argparse._ArgumentGroup) -> None:
    """The schema file and the flags that declare (or override) its keys."""
    group.add_argument("--schema", type=Path, metavar="FILE", help="YAML schema of the log")
    group.add_argument("--label", metavar="COLUMN", help="label column (schema key label.column)")
    group.add_argument("--label-reading", choices=["binary", "boolean", "threshold"],
                       help="how the label reads: 0/1, true/false, or a number >= --label-threshold")
    group.add_argument("--label-threshold", type=float, metavar="X", help="with --label-reading threshold")
    for flag, what in (("categorical", "categorical feature columns"), ("numeric", "numeric feature columns"),
                       ("ignore", "columns to ignore")):
        group.add_argument(f"--{flag}", metavar="A,B,…", help=f"{what}, comma-separated")
    group.add_argument("--time", metavar="COLUMN", help="time column (for --split time)")
    group.add_argument("--header", choices=["true", "false", "auto"], help="does line 1 name the columns")
    group.add_argument("--columns", metavar="A,B,…", help="the file's columns in order (needed without a header)")
    group.add_argument("--separator", metavar="CHAR", help="field separator of a text log (\\t for tab)")


def schema_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Schema keys given as flags (they replace the schema file's keys)."""
    out: dict[str, Any] = {}
    if args.label or args.label_reading or args.label_threshold is not None:
        label: dict[str, Any] = {"column": args.label} if args.label else {}
        if args.label_reading:
            label["reading"] = args.label_reading
        if args.label_threshold is not None:
            label["threshold"] = args.label_threshold
        if args.schema and not args.label:  # complete the file's label with the flags
            from ctr_ad.strict import load_yaml_mapping

            base = load_yaml_mapping(args.schema, "schema file").get("label")
            base = {"column": base} if isinstance(base, str) else dict(base or {})
            label = {**base, **label}
        out["label"] = label
    for key in ("categorical", "numeric", "ignore", "columns"):
        value = getattr(args, key)
        if value is not None:
            out[key] = [c.strip() for c in value.split(",") if c.strip()]
    if args.time:
        out["time"] = args.time
    if args.header:
        out["header"] = {"true": True, "false": False}.get(args.header, args.header)
    if args.separator:
        out["separator"] = "\t" if args.separator in ("\\t", "tab") else args.separator
    return out


def declared_schema(args: argparse.Namespace):
    """The TableSchema of ``--source table`` (None for a built-in source)."""
    from ctr_ad.table_schema import TableSchema

    overrides = schema_overrides(args)
    if args.source != TABLE:
        if args.schema or overrides:
            raise UserError(f"--schema and the schema flags are read with --source table only "
                            f"(not with --source {args.source})")
        return None
    if not args.schema and not overrides:
        raise UserError("--source table needs a declared schema: --schema FILE and/or --label, "
                        "--categorical, --numeric, …")
    return TableSchema.load(args.schema, overrides)


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
    schema = declared_schema(args)
    if args.split is None:
        timed = schema is not None and schema.time is not None
        args.split = "time" if timed else IngestOptions.model_fields["split"].default
    values = {name: getattr(args, name) for name in IngestOptions.model_fields}
    values["max_vocab"] = parse_max_vocab(args.max_vocab)
    options = IngestOptions.of(values, origin="ctr-ad ingest")
    manifest = run_ingest(args.input, args.source, args.out, options, quiet=args.quiet, schema=schema,
                          resume=args.resume, progress=args.progress)
    rows = manifest["rows"]
    print(f"{args.out}: {rows['written']} rows written "
          f"({', '.join(f'{k} {v}' for k, v in manifest['splits'].items())}), "
          f"{rows['quarantined']} quarantined (see quarantine.jsonl), "
          f"fingerprint {manifest['fingerprint'][:12]}")
    return 0
