"""``ctr-ad predict``: score raw click logs with a trained bundle, writing one row per input row.

Output columns: ``file`` (only with several inputs), ``line`` (line number in its file), ``label`` (when
the input has one), ``ctr`` (ensemble probability), ``component_std``, ``p_0`` … ``p_{K-1}``.
Rows the reader quarantines (malformed lines) are not scored: their count and reasons are printed,
and with ``--quarantine PATH`` written as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ctr_ad.schema import SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="RUN_DIR or RUN_DIR/bundle")
    parser.add_argument("--input", required=True, nargs="+", help="raw log file(s)")
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="raw format of the input")
    parser.add_argument("--out", required=True, help="output Parquet file")
    parser.add_argument("--quarantine", help="also write quarantined rows here (JSON lines)")


def _reason_kind(record: dict) -> str:
    reason = str(record.get("reason", "unknown"))
    return reason.split(":", 1)[0].strip() or "unknown"


def run(args: argparse.Namespace) -> int:
    import polars as pl

    from ctr_ad.bundle import load
    from ctr_ad.errors import UserError
    from ctr_ad.ingest.reader import read_raw

    bundle = load(args.bundle)
    paths = [Path(p) for p in args.input]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
    frames: list[pl.DataFrame] = []
    quarantine: list[dict] = []
    for i, path in enumerate(paths):
        try:
            raw, bad = read_raw([path], args.source)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from None
        quarantine.extend({"file": str(path), **rec} for rec in bad)
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
    out = pl.concat(frames, how="vertical")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out.write_parquet(out_path)
    print(f"ctr-ad predict: wrote {out.height} rows to {out_path}", file=sys.stderr)
    if quarantine:
        kinds = Counter(_reason_kind(r) for r in quarantine)
        summary = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
        print(f"ctr-ad predict: {len(quarantine)} row(s) quarantined, not scored ({summary})", file=sys.stderr)
        if args.quarantine:
            with open(args.quarantine, "w") as f:
                for rec in quarantine:
                    f.write(json.dumps(rec, default=str) + "\n")
    return 0
