"""``ctr-ad predict``: score raw click logs with a trained bundle, writing one row per input row.

Output columns: ``file`` (only with several inputs), ``line`` (line number in its file), ``label`` (when
the input has one), ``ctr`` (ensemble probability), ``component_std``, ``p_0`` … ``p_{K-1}``.
Rows the reader quarantines (malformed lines) are not scored: their count and reasons are printed,
and with ``--quarantine PATH`` written as JSON lines. As in ``ctr-ad ingest``, more than
``--max-bad-fraction`` of bad rows (e.g. a log of another format than ``--source``) is an error, and
nothing is written. ``predict`` reads no data directory (only a bundle, verified by its checksums,
and raw logs), so there is no dataset manifest to check here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ctr_ad.errors import UserError
from ctr_ad.schema import SOURCES, TABLE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="RUN_DIR or RUN_DIR/bundle")
    parser.add_argument("--input", required=True, nargs="+", help="raw log file(s)")
    parser.add_argument("--source", required=True, choices=sorted([*SOURCES, TABLE]),
                        help="raw format of the input; table: the schema the bundle was trained with")
    parser.add_argument("--schema", help="with --source table: read the input by this schema file instead "
                        "(its features must be the bundle's)")
    parser.add_argument("--out", required=True, help="output Parquet file (written atomically)")
    parser.add_argument("--quarantine", help="also write quarantined rows here (JSON lines)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of rows is quarantined (as ingest)")


def _reason_kind(record: dict) -> str:
    reason = str(record.get("reason", "unknown"))
    return reason.split(":", 1)[0].strip() or "unknown"


def _check_out(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a directory; {flag} names the output file")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{path.parent}: is not a directory; cannot write {path.name} there")


def _source(args: argparse.Namespace, features):
    """The built-in source's name, or the spec of the declared schema (``--source table``)."""
    if args.source != TABLE:
        if args.schema:
            raise UserError(f"--schema is read with --source table only (not with --source {args.source})")
        return args.source
    from ctr_ad.table_schema import TableSchema

    if args.schema:
        schema = TableSchema.load(args.schema)
    elif features.schema is not None:
        schema = TableSchema.of(features.schema, origin=f"{args.bundle}: features.json schema")
    else:
        raise UserError(f"{args.bundle}: was not trained on a declared schema (source "
                        f"{features.source!r}); use --source {features.source}")
    declared = (list(schema.categorical), sorted(schema.numeric))
    if declared[0] != list(features.categorical) or not set(declared[1]) <= set(features.dense):
        raise UserError(f"{args.schema}: its features differ from the bundle's ({', '.join(features.raw_fields)})")
    return schema.to_spec()


def run(args: argparse.Namespace) -> int:
    import polars as pl

    from ctr_ad.bundle import load
    from ctr_ad.files import atomic_write_text, atomic_write_with
    from ctr_ad.ingest.quarantine import quarantine_summary, reason_kind, too_many_bad
    from ctr_ad.ingest.reader import read_raw

    if not 0 <= args.max_bad_fraction <= 1:
        raise UserError(f"--max-bad-fraction {args.max_bad_fraction}: must be in [0, 1]")
    out_path = Path(args.out)
    _check_out(out_path, "--out")
    if args.quarantine:
        _check_out(Path(args.quarantine), "--quarantine")
    bundle = load(args.bundle)
    source = _source(args, bundle.features)
    paths = [Path(p) for p in args.input]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
    frames: list[pl.DataFrame] = []
    quarantine: list[dict] = []
    read = 0
    for i, path in enumerate(paths):
        try:
            raw, bad = read_raw([path], source)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from None
        read += raw.height + len(bad)
        quarantine.extend({"file": str(path), **rec} for rec in bad)
        if raw.height == 0:  # every row quarantined: nothing to score in this file
            continue
        pred = bundle.predict_raw(raw)
        cols: dict[str, object] = {}
        if len(paths) > 1:
            cols["file"] = pl.Series("file", [i] * raw.height, dtype=pl.Int32)
        if "_line" in raw.columns:
            cols["line"] = raw.get_column("_line")
        if "label" in raw.columns:
            cols["label"] = raw.get_column("label").cast(pl.Float32)
        cols["ctr"] = pred.ctr
        cols["component_std"] = pred.component_std
        for k in range(bundle.components):
            cols[f"p_{k}"] = pred.components[:, k]
        frames.append(pl.DataFrame(cols))
    if args.quarantine and quarantine:
        Path(args.quarantine).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.quarantine, "".join(json.dumps(rec, default=str) + "\n" for rec in quarantine))
    if too_many_bad(read, len(quarantine), args.max_bad_fraction):
        where = args.quarantine or "--quarantine PATH (not given)"
        raise UserError(f"{', '.join(map(str, paths))}: nothing written. " + quarantine_summary(
            Counter(reason_kind(r["reason"]) for r in quarantine), quarantine, read, len(quarantine),
            args.max_bad_fraction, where=where))
    out = pl.concat(frames, how="vertical") if frames else pl.DataFrame()
    if out.height == 0:
        raise UserError(f"{', '.join(map(str, paths))}: no valid rows to score")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out_path, out.write_parquet)
    print(f"ctr-ad predict: wrote {out.height} rows to {out_path}", file=sys.stderr)
    if quarantine:
        kinds = Counter(_reason_kind(r) for r in quarantine)
        summary = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
        print(f"ctr-ad predict: {len(quarantine)} row(s) quarantined, not scored ({summary})", file=sys.stderr)
    return 0
